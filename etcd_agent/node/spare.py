"""A warm spare: a Python interpreter started ahead of a round, that imports the ``--preload`` modules, waits, and
then becomes one worker (``--warm-restart``; the agent's side is ``warm.py``).

Run by the agent as ``python -u <this file> FD CONFIG`` with the part of the worker's environment that is known
before the round (``warm.known_env``). FD is its end of a Unix socket pair; CONFIG a JSON object with ``preload``
(module names), ``module`` (the entrypoint is a ``-m`` module), ``entrypoint`` and ``local_rank``. A spare for a
later round runs at the lowest CPU and I/O priority from its first instruction (the agent sets it between fork and
exec, ``priority.py``) and is given the agent's own back, every thread, before the agent sends it the handoff.

1. It sets ``sys.path[0]`` as ``python script.py`` (the script's real directory) or ``python -m module`` (the
   current directory) would, so the preloaded modules are found where the worker would find them, then imports
   them. A module whose import fails, or an import that initialised CUDA (a spare must never touch a GPU before it
   is handed a round), is reported instead of "ready".
2. It sends one JSON line: ``{"ready": true, "modules": {name: file}}`` or ``{"error": "..."}``.
3. It waits for the handoff: ``<length>\\n<JSON>`` with the worker's stdout and stderr as two file descriptors
   (SCM_RIGHTS). The socket closing first ends it quietly (exit 0). A thread of its own receives the handoff while
   the imports still run: when they have not finished ``cold_after`` seconds (the handoff says how many) after the
   handoff arrived, that thread sends ``{"cold": "..."}`` and makes this process the cold worker: the handed
   descriptors become its stdout and stderr and it ``exec``s the cold command line with the worker's environment
   (the same pid, process group, parent-death signal and priority; the hung import is gone with the old image).
4. It becomes the worker, as the cold command line would have started it: the two descriptors replace its stdout
   and stderr, ``os.environ`` becomes exactly the worker's environment, the signal handlers are those the
   interpreter started with, ``sys.argv``/``sys.orig_argv`` are the cold command line's, and the entrypoint runs
   in a fresh ``__main__`` module (script: ``__file__``, ``__loader__``, ``__spec__ = None``, as ``python
   script.py``; module: through ``runpy._run_module_as_main``, which is what ``python -m`` calls). An uncaught
   exception is printed by ``sys.excepthook`` without this file's frames and exits 1; ``SystemExit`` and
   ``KeyboardInterrupt`` end the process as they would end the script's own interpreter.

What a script can still see: the preloaded modules (and this file's few standard-library imports) are already in
``sys.modules``, and ``/proc/self/cmdline`` (``ps``) shows this file's command line.

Standard library only, and nothing of the ``etcd_agent`` package: it runs under the workers' interpreter, which
need not have etcd-agent installed.
"""

import json
import os
import signal
import socket
import sys
import threading

_HANDOFF_MAX = 64 * 1024 * 1024  # a handoff message larger than this is not one the agent sent


def _handlers() -> dict:
    """The interpreter's signal handlers as it started (SIGINT: default_int_handler; SIGPIPE, SIGXFSZ ignored)."""
    out = {}
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (ValueError, OSError):
            continue
        if handler is not None:
            out[sig] = handler
    return out


def _path0(conf: dict) -> str | None:
    """What the cold interpreter puts first on sys.path; None with PYTHONSAFEPATH/-P (it puts nothing there)."""
    if sys.flags.safe_path:
        return None
    if conf["module"]:
        return os.getcwd()
    return os.path.dirname(os.path.realpath(conf["entrypoint"]))


def _preload(names: list) -> tuple[dict, str | None]:
    """Import each module; ``({name: file}, None)``, or ``({}, "what failed")``."""
    import importlib
    import traceback

    found = {}
    for name in names:
        try:
            mod = importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - SystemExit in a module's import is a failure too
            lines = traceback.format_exception_only(type(exc), exc)
            return {}, f"import {name} failed: {''.join(lines).strip()}"
        found[name] = getattr(mod, "__file__", None) or ""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        touched = bool(cuda is not None and cuda.is_initialized())
    except Exception:  # noqa: BLE001 - a half-imported torch: nothing was initialised through it
        touched = False
    if touched:
        return {}, (f"importing {', '.join(names)} initialised CUDA; a spare must not touch a GPU before it is "
                    "handed a round")
    return found, None


def _receive(sock: socket.socket) -> tuple[dict | None, list]:
    """The handoff message and its descriptors; ``(None, [])`` when the agent closed the socket instead."""
    data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 2)
    if not data:
        return None, fds
    while b"\n" not in data:
        more = sock.recv(65536)
        if not more:
            return None, fds
        data += more
    head, _, body = data.partition(b"\n")
    length = int(head)
    if not 0 < length <= _HANDOFF_MAX:
        raise ValueError(f"bad handoff length {length}")
    while len(body) < length:
        more = sock.recv(min(1 << 20, length - len(body)))
        if not more:
            return None, fds
        body += more
    return json.loads(body[:length]), fds


class _Handoff:
    """Receives the round on a thread of its own while the main thread imports; a round whose ``cold_after`` passes
    before the imports finish makes this process the cold worker instead (``_exec_cold``)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.msg: dict | None = None
        self.fds: list = []
        self.received = threading.Event()
        self.finished = threading.Event()  # the imports finished and were reported
        self._lock = threading.Lock()
        self._cold = False
        self.thread = threading.Thread(target=self._run, name="etcd-agent-spare-handoff", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.msg, self.fds = _receive(self.sock)
        except (OSError, ValueError):
            self.msg, self.fds = None, []  # the agent is gone or discarded this spare
        self.received.set()
        limit = (self.msg or {}).get("cold_after")
        if limit is None or self.finished.wait(float(limit)):
            return
        with self._lock:
            if self.finished.is_set():
                return
            self._cold = True
        _exec_cold(self.msg, self.fds, self.sock, float(limit))

    def report(self, report: dict) -> None:
        """The imports finished: tell the agent, unless the round already went cold (then wait for the exec)."""
        with self._lock:
            cold = self._cold
            if not cold:
                try:
                    self.sock.sendall(json.dumps(report).encode() + b"\n")
                except OSError:
                    pass  # the agent handed this spare a round and closed its end: the handoff is readable
                self.finished.set()
        if cold:
            threading.Event().wait()  # the handoff thread replaces this process

    def wait(self) -> tuple[dict | None, list]:
        self.received.wait()
        self.thread.join()
        return self.msg, self.fds


def _exec_cold(msg: dict, fds: list, sock: socket.socket, limit: float) -> None:
    """Become the cold worker: tell the agent why, take the worker's stdout and stderr, exec its command line."""
    word = {"cold": f"had not finished importing --preload {limit:.1f} s after it was handed the round"}
    try:
        sock.sendall(json.dumps(word).encode() + b"\n")
    except OSError:
        pass
    sock.close()
    for target, fd in zip((1, 2), fds):
        os.dup2(fd, target)
        if fd not in (1, 2):
            os.close(fd)
    argv = list(msg["orig_argv"])
    try:
        os.execvpe(argv[0], argv, msg["env"])
    except OSError as exc:
        print(f"etcd-agent: this warm spare could not start the worker cold ({argv[0]}): {exc}", file=sys.stderr,
              flush=True)
    os._exit(127)


def _become(msg: dict, fds: list, handlers: dict) -> None:
    """Take the worker's streams, environment, signal handlers and command line."""
    for target, fd in zip((1, 2), fds):
        os.dup2(fd, target)
        if fd not in (1, 2):
            os.close(fd)
    os.environ.clear()
    os.environ.update(msg["env"])
    for sig, handler in handlers.items():
        try:
            if signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        except (ValueError, OSError, TypeError):
            pass
    sys.orig_argv = list(msg["orig_argv"])


def _trim(tb):
    """The traceback without this file's frames (the worker's own traceback, as the cold interpreter prints it)."""
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


def _run(conf: dict, args: list) -> None:
    """Run the entrypoint in a fresh ``__main__``, as ``python -u script.py ARGS`` / ``python -u -m module ARGS``."""
    import builtins
    import types

    main = types.ModuleType("__main__")
    main.__dict__.update(__annotations__={}, __builtins__=builtins)
    sys.modules["__main__"] = main
    if conf["module"]:
        import runpy

        sys.argv = ["-m", *args]  # what python -m shows while it looks for the module; runpy sets argv[0]
        runpy._run_module_as_main(conf["entrypoint"], alter_argv=True)  # noqa: SLF001 - python -m's own entry
        return
    from importlib.machinery import SourceFileLoader

    path = os.path.abspath(conf["entrypoint"])
    main.__dict__.update(__file__=path, __cached__=None, __loader__=SourceFileLoader("__main__", path),
                         __spec__=None, __package__=None)
    sys.argv = [conf["entrypoint"], *args]
    with open(path, "rb") as f:  # bytes: compile() honours the file's coding cookie, as the interpreter does
        source = f.read()
    code = compile(source, path, "exec", dont_inherit=True)
    del source
    exec(code, main.__dict__)  # noqa: S102 - running the user's script is the point


def main() -> int:
    handlers = _handlers()
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.set_inheritable(False)  # a process a preload starts must not keep the agent's end from seeing our exit
    conf = json.loads(sys.argv[2])
    path0 = _path0(conf)
    if path0 is not None and sys.path:
        sys.path[0] = path0  # was this file's directory
    handoff = _Handoff(sock)
    modules, error = _preload(conf["preload"])
    handoff.report({"ready": True, "modules": modules} if error is None else {"error": error})
    msg, fds = handoff.wait()
    sock.close()
    if msg is None:
        return 0
    if msg.get("entrypoint") != conf["entrypoint"] or bool(msg.get("module")) != conf["module"]:
        print(f"etcd-agent: this warm spare was started for {conf['entrypoint']!r} and was handed "
              f"{msg.get('entrypoint')!r}", file=sys.stderr)
        return 1
    _become(msg, fds, handlers)
    del handlers, sock, fds, modules, handoff
    if error is not None:  # handed over before the agent read the failure: fail as the worker, with the reason
        print(f"etcd-agent: this warm worker could not preload (--preload): {error}", file=sys.stderr, flush=True)
        return 1
    try:
        _run(conf, list(msg["args"]))
    except SystemExit:
        raise
    except KeyboardInterrupt as exc:  # the interpreter prints it and ends by SIGINT, as for the cold worker
        raise exc.with_traceback(_trim(exc.__traceback__))
    except BaseException as exc:  # noqa: BLE001 - printed as the interpreter prints an uncaught exception
        exc.with_traceback(_trim(exc.__traceback__))  # the hook prints the exception's own traceback
        sys.excepthook(type(exc), exc, exc.__traceback__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
