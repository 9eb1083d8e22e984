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
import time
from collections.abc import Iterator
from pathlib import Path

from common.errors import UserError

NAME = ".lock"


def _holder(path: Path) -> str:
    try:
        who = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        who = {}
    if not who:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who.get("since", 0)))
    return f"{who.get('command', 'a command')} (pid {who.get('pid', '?')}, since {since})"


@contextlib.contextmanager
def exclusive(out: str | Path, command: str) -> Iterator[Path]:
    """Hold the lock on the folder `out` (made if missing) for the block; UserError naming the
    holder if another process holds it."""
    out = Path(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out}: in use by {_holder(path)}; wait for it to finish, "
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
