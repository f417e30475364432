"""Start two grandchildren that ignore SIGTERM (one in our process group, one in its own session), then wait.

Each grandchild notifies ``ready <pid> <ppid>`` itself.
"""

import os
import signal
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
hang = os.path.join(here, "hang.py")
kids = [subprocess.Popen([sys.executable, hang, "--ignore-term"]),
        subprocess.Popen([sys.executable, hang, "--ignore-term", "--setsid"])]
while True:
    signal.pause()
