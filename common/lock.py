"""One output, one writer: an exclusive lock on a command's `out=` folder.

A run that appends to its output (dp-eval's episode log, dp-train's checkpoints, dp-align's
timesteps) holds `out/.lock` while it runs. A second run on the same folder is refused in one
line naming the holder (its command, process id and start time), instead of both writing and one
losing the other's results. The lock is the kernel's (`flock`): it goes with the process that
holds it, so the lock of a killed run is free again at once and the next run takes it over; the
file stays behind, holding the last holder's description.

Written here rather than taken from a library: `filelock` refuses without saying who holds the
lock, and a holder's name is what the user needs to act.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from common.errors import UserError

NAME = ".lock"


def _holder(fd: int) -> str:
    """The holder's description, read through the lock's own descriptor (never by its name again:
    what the name points at may have changed since it was opened)."""
    try:
        who = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        who = {}
    if not isinstance(who, dict):
        who = {}
    if not who:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who.get("since", 0)))
    return f"{who.get('command', 'a command')} (pid {who.get('pid', '?')}, since {since})"


def _not_a_lock(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}, not a lock file this command wrote; remove it, "
                     "or choose another out=")


def _open_lock(path: Path) -> int:
    """A descriptor on the regular file `path` (made if missing), opened without following a
    symlink and without truncating anything: the lock is written only once it is held, and only
    into a file that is this folder's own (not a link to, or another name of, a file elsewhere,
    which the holder's description would overwrite). UserError naming `path` otherwise."""
    try:
        # O_NONBLOCK: a fifo put in the lock's place must not hang the open; no effect on a file
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if path.is_symlink():
            raise _not_a_lock(path, f"a symbolic link (to {os.readlink(path)})") from None
        if path.is_dir():
            raise _not_a_lock(path, "a directory") from None
        raise UserError(f"{path}: cannot open the lock file ({e.strerror})") from None
    st = os.fstat(fd)
    what = (None if stat.S_ISREG(st.st_mode) and st.st_nlink == 1
            else f"a hard link to a file with {st.st_nlink} names" if stat.S_ISREG(st.st_mode)
            else "a fifo" if stat.S_ISFIFO(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file")
    if what is not None:
        os.close(fd)
        raise _not_a_lock(path, what)
    return fd


@contextlib.contextmanager
def exclusive(out: str | Path, command: str) -> Iterator[Path]:
    """Hold the lock on the folder `out` (made if missing) for the block; UserError naming the
    holder if another process holds it."""
    out = Path(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / NAME
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out}: in use by {_holder(fd)}; wait for it to finish, "
                            "or choose another out=") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"command": command, "pid": os.getpid(), "since": time.time()}).encode(), 0)
        try:
            yield out
        finally:
            if made and os.listdir(out) == [NAME]:  # a run that wrote nothing leaves no folder behind
                path.unlink()
                out.rmdir()
    finally:
        os.close(fd)  # releases the lock
