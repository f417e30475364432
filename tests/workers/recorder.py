"""Stand-in training script for the torchrun compatibility suite (stdlib only, no torch).

Records what the launcher gave this worker to ``$COMPAT_RECORD_DIR/rank<RANK>-pid<PID>.json``: the interpreter command
line (``sys.orig_argv``), ``sys.argv``, the working directory, the whole environment and a few process facts; then
prints one marker line to stdout and one to stderr, so the caller can tell where each stream went (console, prefixed
or not, a log file, nowhere), and exits 0.

Runs as a script (``recorder.py``), as a module (``-m recorder`` from this directory), through ``runpy.run_path``
(torchrun ``--run-path``) and behind an executable wrapper (``--no-python``).
"""

import json
import os
import sys


def main() -> int:
    out = os.environ.get("COMPAT_RECORD_DIR")
    rank = os.environ.get("RANK", "?")
    pid = os.getpid()
    facts = {
        "orig_argv": list(getattr(sys, "orig_argv", [])),
        "argv": list(sys.argv),
        "executable": sys.executable,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "pid": pid,
        "ppid": os.getppid(),
        "name": __name__,
        "node": os.environ.get("COMPAT_NODE", "0"),
    }
    if out:
        path = os.path.join(out, f"rank{rank}-pid{pid}.json")
        with open(path + ".part", "w") as f:
            json.dump(facts, f)
        os.replace(path + ".part", path)  # a reader never sees half a record
    # One write(2) per line: workers share the console, and print() under ``python -u`` writes the text and the
    # newline separately, so two workers' lines could interleave.
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, f"COMPAT-OUT rank={rank} pid={pid}\n".encode())
    os.write(2, f"COMPAT-ERR rank={rank} pid={pid}\n".encode())
    return 0


if __name__ == "__main__":
    # Not sys.exit(main()): under torchrun --run-path the script runs in the launcher's child through runpy, and
    # a SystemExit(0) is fine there too, but returning normally is the most ordinary ending.
    code = main()
    if code:
        sys.exit(code)
