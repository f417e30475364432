"""A stand-in for ``ssh -tt HOST COMMAND`` on one machine: runs COMMAND with ``bash -c`` in a new session whose
controlling terminal is a pseudo-terminal, copies its output, and when it is ended (SIGTERM, SIGINT, SIGHUP) closes
the terminal, so the remote side gets the hangup a real ssh -tt gives it. The host name goes into $FAKE_SSH_HOST."""

import os
import pty
import signal
import subprocess
import sys


def main() -> int:
    args = sys.argv[1:]
    while args and args[0].startswith("-"):
        args.pop(0)
    host, command = args[0], " ".join(args[1:])
    master, slave = pty.openpty()
    proc = subprocess.Popen(["bash", "-c", command], stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            env={**os.environ, "FAKE_SSH_HOST": host},
                            preexec_fn=lambda: __import__("fcntl").ioctl(0, __import__("termios").TIOCSCTTY, 0))
    os.close(slave)

    def hang_up(signum, frame):
        os.close(master)  # the terminal hangs up: the session's processes get SIGHUP

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, hang_up)
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
