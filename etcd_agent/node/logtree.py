"""The agent's private log tree under ``--log-dir``: made by the agent, private, never followed through a symlink.

The tree is ``<log_dir>/<run_id>/...``; ``worker_logs`` and ``warm`` name what lies below. Guarantees:

- ``--log-dir`` itself may be shared (a world-writable directory with the sticky bit, such as /tmp, is fine; the
  path is the user's, so a symlink there is followed). It is made with mode 0700 when missing. One that any user
  may write and that has no sticky bit is refused: another user could swap the run's directory for one of theirs
  between two lookups of a worker's file by path.
- Every directory below it, from ``<run_id>`` on, is made by the agent with mode 0700 and opened with
  ``O_DIRECTORY | O_NOFOLLOW`` relative to its parent's descriptor (never by a path), and must then be a real
  directory owned by the agent's user that no one else may write (an existing one keeps the read permissions its
  owner gave it). Files are opened relative to their directory's descriptor with ``O_NOFOLLOW``, made with mode
  0600, and must be regular files of the agent's user.
- Anything else in the tree (a symlink, another user's directory or file, a directory others may write) is a
  ``ConfigError`` naming ``--log-dir`` and the path; nothing is created, written or truncated through it.

Imports only ``errors`` from the package.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import IO, Iterator

from ..errors import ConfigError

DIR_MODE = 0o700
FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _refuse(path: str, why: str) -> ConfigError:
    return ConfigError(f"--log-dir: {path} {why}; the agent writes worker logs only into directories it made "
                       "itself (remove it, or choose another --log-dir)")


def _what(parent: int, name: str) -> str:
    """What is at ``name`` in ``parent``, looked at without following it, for an error message."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError as exc:
        return f"cannot be opened ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    return "is not a directory" if not stat.S_ISDIR(st.st_mode) else "cannot be opened"


def _check(fd: int, path: str, directory: bool) -> None:
    """Refuse what the agent's user does not own, what others may write, and (for files) what is not a file."""
    st = os.fstat(fd)
    if not directory and not stat.S_ISREG(st.st_mode):
        raise _refuse(path, "is not a regular file")
    if st.st_uid != os.geteuid():
        raise _refuse(path, f"belongs to user id {st.st_uid}, not to this agent's ({os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _refuse(path, f"may be written by other users (mode {stat.S_IMODE(st.st_mode):04o})")


def open_top(log_dir: str) -> int:
    """A descriptor of ``--log-dir`` (made 0700 when missing); ConfigError when others could swap what is in it."""
    try:
        os.makedirs(log_dir, mode=DIR_MODE, exist_ok=True)
        fd = os.open(log_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"--log-dir: cannot use {log_dir} as the log directory: {exc.strerror or exc}") from exc
    mode = os.fstat(fd).st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        os.close(fd)
        raise ConfigError(f"--log-dir: {log_dir} may be written by any user and has no sticky bit (mode "
                          f"{stat.S_IMODE(mode):04o}), so another user could replace what the agent makes there; "
                          "add the sticky bit (chmod +t) or choose a directory of your own")
    return fd


def subdir(parent: int, name: str, path: str) -> int:
    """A descriptor of directory ``name`` in ``parent``, made 0700 when missing; ``path`` names it in errors."""
    try:
        os.mkdir(name, DIR_MODE, dir_fd=parent)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"--log-dir: cannot make {path}: {exc.strerror or exc}") from exc
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        raise _refuse(path, _what(parent, name)) from exc
    try:
        _check(fd, path, directory=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def opened(log_dir: str, parts: list[str] | tuple[str, ...]) -> Iterator[int]:
    """The descriptor of ``<log_dir>/<parts...>``, every part made or checked as the module says; closed on exit."""
    fd = open_top(log_dir)
    path = log_dir
    try:
        for name in parts:
            path = os.path.join(path, name)
            child = subdir(fd, name, path)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def open_append(dir_fd: int, name: str, path: str) -> IO[bytes]:
    """File ``name`` of ``dir_fd`` for appending, unbuffered, made 0600 when missing; never through a symlink."""
    try:
        fd = os.open(name, _APPEND_FLAGS, FILE_MODE, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise _refuse(path, "is a symbolic link") from exc
        raise
    try:
        _check(fd, path, directory=False)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "ab", buffering=0)


def unlink(dir_fd: int, name: str) -> None:
    """Remove ``name`` from ``dir_fd`` (a link itself, never what it points to); missing is fine."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def open_read(path: str) -> IO[bytes]:
    """``path`` for reading, refusing a symbolic link as its last part (OSError): a file the agent reads back."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")
