"""Checks for what a command writes, made before any work starts, and the errors of writing.

Every command that writes files (``train --output``, ``bench --json/--plot``, ``viz --out``,
``demo --out``, ...) calls :func:`check_output_dir` or :func:`check_output_file` first, so that a
folder that cannot be written (permissions, a read-only mount, an immutable flag, a path through a
file) is one line naming the path and the fix, exit code 2, before an hour of training. A full
disk while writing is :func:`disk_full_error`: the folder, the space needed and the space free.
All are :class:`OutputError`, a :class:`~condensevit.cli.UsageError`.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile

from .cli import UsageError

__all__ = ["OutputError", "check_output_dir", "check_output_file", "check_figure_file", "figure_formats", "disk_full_error", "is_disk_full", "user_umask",
           "apply_umask"]


class OutputError(UsageError):
    """A file or folder that cannot be written (one line, exit code 2 on the command line)."""


def _existing_ancestor(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _reason(e: OSError, path: str, flag: str) -> str:
    if e.errno == errno.EROFS:
        return f"it is on a read-only file system; pass another {flag}"
    if e.errno == errno.EPERM:
        return (f"the operation is not permitted (an immutable folder? `lsattr -d {path}` shows it, `chattr -i` "
                f"clears it); fix it or pass another {flag}")
    if e.errno == errno.EACCES:
        return f"permission denied; make it writable (chmod u+w {path}) or pass another {flag}"
    if is_disk_full(e):
        return f"no space left on its device; free some space or pass another {flag}"
    return f"{os.strerror(e.errno) if e.errno else e}; pass another {flag}"


def _probe_folder(folder: str, shown: str, flag: str):
    """Create and remove a temporary file in ``folder``: the one test every file system answers
    truthfully (``os.access`` ignores read-only mounts on some systems and ACLs on others)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".condensevit-write-check-")
    except OSError as e:
        raise OutputError(f"cannot write to {shown}: {_reason(e, folder, flag)}") from None
    os.close(fd)
    os.unlink(tmp)


def check_output_dir(path: str, flag: str = "--output", *, _for: str | None = None) -> str:
    """The absolute ``path`` of an output folder that can be written, or an :class:`OutputError`
    naming it and the fix. A folder that does not exist yet is not created: its nearest existing
    parent must be a writable folder."""
    path = os.path.abspath(os.fspath(path))
    target = _for or path
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{flag} {target}: {path} is a file, not a folder; pass another {flag}")
    base = _existing_ancestor(path)
    if not os.path.isdir(base):
        raise OutputError(f"cannot create {flag} {target}: {base} is a file, not a folder; pass another {flag}")
    _probe_folder(base, target if base == target else f"{target} (in {base})", flag)
    return path


def check_output_file(path: str, flag: str) -> str:
    """The absolute ``path`` of an output file that can be written (its folder writable, the file
    itself, when it exists, a writable file), or an :class:`OutputError`."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise OutputError(f"{flag} {path} is a folder; give a file name")
    check_output_dir(os.path.dirname(path), flag, _for=path)
    if os.path.exists(path):
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            raise OutputError(f"cannot write {flag} {path}: {_reason(e, path, flag)}") from None
    return path


def figure_formats() -> list[str]:
    """The file extensions matplotlib can save a figure as (png, pdf, svg, jpg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase
    return sorted(FigureCanvasBase.get_supported_filetypes())


def check_figure_file(path: str, flag: str) -> str:
    """:func:`check_output_file` for a figure: its extension must name a format matplotlib writes.
    A name without one is refused rather than completed (``savefig`` would write ``NAME.png`` while
    the command printed ``NAME``), so the file written is always the file named."""
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    formats = figure_formats()
    if not ext:
        raise OutputError(f"{flag} {path} has no extension; name the figure's format, e.g. {path}.png "
                          f"(matplotlib writes {', '.join(f for f in ('png', 'pdf', 'svg', 'jpg') if f in formats)}, "
                          "...)")
    if ext not in formats:
        stem = os.path.splitext(os.fspath(path))[0]
        raise OutputError(f"{flag} {path}: matplotlib cannot write .{ext} figures; use one of {', '.join(formats)} "
                          f"(e.g. {stem}.png)")
    return check_output_file(path, flag)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_full_error(folder: str, needed_bytes: int | None, what: str, flag: str = "--output",
                    kept: str | None = None) -> OutputError:
    """The one-line error for a full disk: the folder, the space ``what`` needs and what is free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    need = f"it needs about {_mb(needed_bytes)}" if needed_bytes else "it needs more space"
    have = f", {_mb(free)} free" if free is not None else ""
    tail = f"; {kept}" if kept else ""
    return OutputError(f"no space left in {folder} to write {what}: {need}{have}; free some space or pass another "
                       f"{flag}{tail}")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n < 10 * 2**30 else f"{n / 2**30:.1f} GB"


def user_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore
    os.umask(mask)
    return mask


def apply_umask(fd: int, mode: int = 0o666):
    """Give a file opened by ``tempfile.mkstemp`` (always 0600) the mode an ordinary ``open``
    would: ``mode`` less the user's umask."""
    os.fchmod(fd, mode & ~user_umask())
