"""Writes a reader never sees half done: a file written beside its destination and renamed into
place, a directory built in a hidden partial directory and renamed into place when complete.

A store or checkpoint is built in `.<name>.<pid>-<random>.partial` beside its destination and
renamed into place when complete. A process killed with SIGKILL cannot remove its own; the next
run that writes to the same place removes those whose process is gone (`remove_stale_partials`),
and never one that a live process is still writing.
"""

from __future__ import annotations

import contextlib
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
    puts it in place of `final` (replacing what was there); with an error it is removed and
    `final` is left as it was."""
    tmp = make_partial(final.parent, final.name)
    try:
        yield tmp
        # mkdtemp made it 0700: a checkpoint or zoo folder is as readable as any folder made here
        os.chmod(tmp, directory_mode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure to `path` (PNG) atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
