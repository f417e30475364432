"""Exit with the code given (``3``) or kill itself with the signal given (``SIGKILL``); stderr says so first."""

import os
import signal
import sys

what = sys.argv[1]
for i in range(30):
    print(f"stderr line {i}", file=sys.stderr)
print(f"about to end with {what}", file=sys.stderr, flush=True)
if what.startswith("SIG"):
    os.kill(os.getpid(), signal.Signals[what])
    signal.pause()
sys.exit(int(what))
