"""Records what a script can see of how it was started, to compare a cold worker with a warm one field by field.

    identity.py OUT [--go FILE] [ARGS...]

Writes OUT/<round>-<rank>.json with sys.argv, __name__, __file__, the module globals, sys.path, sys.orig_argv, the
environment, the signal handlers, process group and session, cwd, the targets of its open file descriptors,
sys.flags and the stdio set-up. Then, in round 1, rank 1 waits for FILE (when given) and raises RuntimeError (an
uncaught exception: its traceback and exit code 1 are compared too); every other worker exits with code 0 through
sys.exit, after an atexit handler that prints a line.
"""

import atexit
import json
import os
import signal
import sys

_globals = sorted(k for k in globals() if k not in ("atexit", "json", "os", "signal", "sys"))


def fd_targets() -> dict[str, str]:
    out = {}
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used
        kind = "pipe" if target.startswith("pipe:") else "socket" if target.startswith("socket:") else target
        out[fd] = kind
    return out


def handlers() -> dict[str, str]:
    out = {}
    for sig in signal.valid_signals():
        try:
            h = signal.getsignal(sig)
        except (ValueError, OSError):
            continue
        if h is not None:
            out[str(int(sig))] = getattr(h, "__name__", None) or str(h)
    return out


env = dict(os.environ)
rank, rnd = int(env["RANK"]), int(env["ETCD_AGENT_ROUND"])
loader = globals().get("__loader__")
record = {
    "argv": sys.argv, "name": __name__, "file": globals().get("__file__"), "globals": _globals,
    "spec": repr(globals().get("__spec__")) if globals().get("__spec__") is None else globals()["__spec__"].name,
    "package": globals().get("__package__"), "loader": type(loader).__name__,
    "loader_name": getattr(loader, "name", None), "cached": globals().get("__cached__"),
    "path0": sys.path[0], "path": sys.path, "orig_argv": sys.orig_argv, "executable": sys.executable,
    "env": env, "signals": handlers(), "pgid_is_pid": os.getpgid(0) == os.getpid(),
    "sid_is_pid": os.getsid(0) == os.getpid(), "cwd": os.getcwd(), "fds": fd_targets(),
    "flags": list(sys.flags), "stdout_line_buffering": sys.stdout.line_buffering,
    "stdout_write_through": getattr(sys.stdout, "write_through", None), "stdout_encoding": sys.stdout.encoding,
    "stderr_errors": sys.stderr.errors, "main_is_this": sys.modules["__main__"].__dict__ is globals(),
    "frame_is_top": sys._getframe().f_code.co_filename == globals().get("__file__"),
}
out, args = sys.argv[1], sys.argv[2:]
go = args[args.index("--go") + 1] if "--go" in args else None
tmp = os.path.join(out, f"{rnd}-{rank}.json.tmp")
with open(tmp, "w") as f:
    json.dump({**record, "pid": os.getpid()}, f)
os.replace(tmp, os.path.join(out, f"{rnd}-{rank}.json"))
print(f"rank {rank} round {rnd}: recorded", flush=True)
if rnd == 1 and rank == 1:
    if go:
        from etcd_agent.testing import records  # after the record: an import it must not show

        records.wait_path(go)
    raise RuntimeError(f"rank {rank} fails in round {rnd}")
if rnd == 1:
    signal.pause()  # a peer of the failing rank: blocked until the agent stops it
atexit.register(lambda: print(f"rank {rank} round {rnd}: atexit ran", flush=True))
sys.exit(0)
