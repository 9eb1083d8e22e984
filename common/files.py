"""Writes a reader never sees half done: a file written beside its destination and renamed into
place, a directory built in a hidden partial directory and renamed into place when complete.

A store or checkpoint is built in `.<name>.<pid>-<random>.partial` beside its destination and
renamed into place when complete. A process killed with SIGKILL cannot remove its own; the next
run that writes to the same place removes those whose process is gone (`remove_stale_partials`),
and never one that a live process is still writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

SUFFIX = ".partial"
_OWNER = re.compile(r"\.(\d+)-[^.]+\.partial$")


def make_partial(parent: Path, name: str) -> Path:
    """A new empty hidden directory in `parent` for building `name`, owned by this process (mode
    0700 while it is built; `building` gives the finished directory the usual mode)."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}-", suffix=SUFFIX, dir=parent))


def unwritable(path: str | Path) -> str | None:
    """Why nothing can be built at `path` (the nearest existing folder on the way to it named),
    or None if a folder can be made there. Probed by making a folder, as the writers do:
    permission bits alone do not say (root, read-only mounts)."""
    d = Path(path).absolute()
    while not d.exists():
        d = d.parent
    if not d.is_dir():
        return f"{d}: not a folder, so nothing can be written under it"
    try:
        os.rmdir(make_partial(d, "write-probe"))
    except OSError as err:
        return f"{d}: cannot write here ({err.strerror or err})"
    return None


def check_writable(path: str | Path, key: str = "out") -> None:
    """A one-line `UserError` naming `key` unless a folder can be made at `path` and written.
    Commands that write only at their end call it at their start."""
    from common.errors import UserError

    problem = unwritable(path)
    if problem is not None:
        raise UserError(f"{key}: {problem}; choose another {key}=")


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError raised in the block that names no file is raised again naming `path`: a write
    to an open file that fails (a full disk, a file-size limit) names none, and the commands print
    an OSError that names its file in one line (`common.cli`)."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


def _umask() -> int:
    """This process's umask, read without changing it where the kernel says it (Linux 4.7+):
    setting it to read it back would race with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def directory_mode() -> int:
    """The mode `mkdir` gives a new directory here: 0777 less the umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """A partial directory to build the directory `final` in. Leaving the block without an error
    puts it in place of `final` (replacing what was there, which is deleted only once the new one
    is in place); with an error it is removed and `final` is left as it was."""
    holder = make_partial(final.parent, final.name)
    tmp = holder / "new"
    try:
        tmp.mkdir()
        yield tmp
        os.chmod(tmp, directory_mode())  # as readable as any folder made here
        replace_into(tmp, final, holder)
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)
        raise
    shutil.rmtree(holder, ignore_errors=True)


OLD = "old"  # in a partial directory: the destination's previous contents, moved aside while replaced


def replace_into(built: Path, final: Path, holder: Path) -> None:
    """Put `built` at `final`. What `final` held is first moved to `holder/old` (never deleted
    here): a kill between the two renames leaves it there, and `remove_stale_partials` puts it
    back at `final` if nothing took its place. A failure of the second rename restores it now."""
    if final.exists() or final.is_symlink():
        os.replace(final, holder / OLD)
        try:
            os.replace(built, final)
        except BaseException:
            os.replace(holder / OLD, final)
            raise
    else:
        os.replace(built, final)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(parent: Path, name: str | None = None) -> list[Path]:
    """Remove the partial directories in `parent` (for `name`, or for any name) whose owning
    process no longer runs; returns those removed. Directories of the older unnamed form
    `.<name>.<random>.partial` (no pid) are removed too: no live writer makes them any more."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for p in parent.glob(f".{name if name is not None else '*'}.*{SUFFIX}"):
        owner = _OWNER.search(p.name)
        pid = int(owner.group(1)) if owner is not None else None
        if p.is_dir() and (pid is None or (pid != os.getpid() and not _alive(pid))):
            _restore_old(p, parent)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _restore_old(partial: Path, parent: Path) -> None:
    """A writer killed between moving its destination aside and putting the new one in its place
    left the old contents in `partial/old`: back to the destination, if that is still empty."""
    name = _OWNER.sub("", partial.name)[1:] if _OWNER.search(partial.name) else None
    old = partial / OLD
    if name and (old.exists() or old.is_symlink()):
        final = parent / name
        if not (final.exists() or final.is_symlink()):
            os.replace(old, final)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write the file in; leaving the block without an error
    renames it to `path` (a reader sees the old file or the new one, never half of one), with an
    error removes it. The name holds this process's id, so concurrent writers of one file (workers
    sharing a cache) never write into each other's, and keeps the suffix: `np.savez` appends
    `.npz` to a name without it, and savefig and OpenCV choose the format by it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        with naming(path):  # a failed write names the file it was for
            yield tmp
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data, indent: int = 1) -> None:
    write_text(path, json.dumps(data, indent=indent))


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure to `path` (PNG) atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
        plt.close(fig)


def replace_symlink(link: Path, target: str) -> None:
    """Point the symbolic link `link` at `target`, atomically: a reader following `link` finds the
    old target or the new one, never no link."""
    with atomic_path(link) as tmp:
        tmp.unlink(missing_ok=True)  # one a killed process of the same id left behind
        tmp.symlink_to(target)
