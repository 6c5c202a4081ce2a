"""One training per run folder: ``OUTPUT/.lock``.

The lock is an advisory ``flock`` on ``OUTPUT/.lock``, which also records who holds it (process id,
host, start time, command). The kernel drops an ``flock`` when its process dies, however it dies,
so a lock file left by a killed run is recognised as stale, taken over, and said so; a live holder
makes a second training into the same folder fail at once, naming the process. Where ``flock`` is
not available the recorded process id is checked instead (same host only).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys

__all__ = ["RunLock", "LOCK_NAME"]

LOCK_NAME = ".lock"

try:
    import fcntl
except ImportError:  # pragma: no cover  (not POSIX)
    fcntl = None


def _usage_error(msg: str):
    from ..cli import UsageError
    return UsageError(msg)


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The lock of one run folder, held from :meth:`acquire` to :meth:`release`. ``notice`` is the
    line to show when a stale lock was taken over (else None)."""

    def __init__(self, path: str, fd: int, notice: str | None):
        self.path, self.fd, self.notice = path, fd, notice

    @classmethod
    def acquire(cls, folder: str, flag: str = "--output") -> "RunLock":
        path = os.path.join(folder, LOCK_NAME)
        for _ in range(5):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            held = cls._try_lock(fd)
            if held is not None:
                os.close(fd)
                raise _usage_error(
                    f"{folder} is in use by {held}; two trainings must not write into one folder: wait for it to "
                    f"end (or stop it), or pass another {flag}")
            try:  # the holder may have removed the file between our open and our lock: lock the file that is there
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:  # pragma: no cover  (a folder where lock files come and go this fast is not usable)
            raise _usage_error(f"could not lock {path}; is another program removing it?")
        old = _read(fd)
        notice = None
        if old.get("pid") not in (None, os.getpid()):
            notice = (f"note: {folder} was locked by {cls._describe(old)}, which is no longer running (a run killed "
                      "before it could clean up); taking the lock over")
        info = dict(pid=os.getpid(), host=socket.gethostname(),
                    started=datetime.datetime.now().isoformat(timespec="seconds"),
                    command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:500])
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        return cls(path, fd, notice)

    @staticmethod
    def _describe(info: dict) -> str:
        who = f"process {info.get('pid', '?')}"
        if info.get("host") and info["host"] != socket.gethostname():
            who += f" on {info['host']}"
        if info.get("started"):
            who += f" (started {info['started']})"
        return who

    @classmethod
    def _try_lock(cls, fd: int) -> str | None:
        """None when ``fd`` is now locked by us, else who holds it."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                return cls._describe(_read(fd))
            except OSError:  # a file system without flock: fall back to the recorded process
                pass
        info = _read(fd)
        pid = info.get("pid")
        if (isinstance(pid, int) and pid != os.getpid() and info.get("host") in (None, socket.gethostname())
                and _pid_alive(pid)):
            return cls._describe(info)
        return None

    def release(self):
        """Remove the lock file (while still holding the lock, so no one locks a removed file) and unlock."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
