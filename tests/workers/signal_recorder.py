"""Record the first signal this worker gets to OUT/signal-<rank>, then exit 0; announce readiness in OUT/ready-<rank>.

Usage: signal_recorder.py OUT
"""

import os
import signal
import sys

out, rank = sys.argv[1], os.environ["RANK"]


def record(signum, _frame):
    with open(os.path.join(out, f"signal-{rank}"), "w") as f:
        f.write(signal.Signals(signum).name)
    sys.exit(0)


for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, record)
open(os.path.join(out, f"ready-{rank}"), "w").close()
while True:
    signal.pause()
