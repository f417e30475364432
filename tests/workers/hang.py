"""Wait forever. ``--ignore-term``: ignore SIGTERM (``--note-term`` as well: notify ``term <pid>`` at each);
``--setsid``: leave the parent's process group first.

Notifies ``ready <pid> <ppid>`` once its signal disposition is in place.
"""

import os
import signal
import sys

from _notify import notify

if "--setsid" in sys.argv:
    os.setsid()
if "--note-term" in sys.argv:
    signal.signal(signal.SIGTERM, lambda *_: notify(f"term {os.getpid()}"))
elif "--ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
notify(f"ready {os.getpid()} {os.getppid()}")
while True:
    signal.pause()
