"""Wait forever. ``--ignore-term``: ignore SIGTERM; ``--setsid``: leave the parent's process group first.

Notifies ``ready <pid> <ppid>`` once its signal disposition is in place.
"""

import os
import signal
import sys

from _notify import notify

if "--setsid" in sys.argv:
    os.setsid()
if "--ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
notify(f"ready {os.getpid()} {os.getppid()}")
while True:
    signal.pause()
