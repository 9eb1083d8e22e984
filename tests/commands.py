"""Run a `dp-*` command in the test's own process, as its console script would run: the entry
point from the package metadata, `sys.argv`, exit code, stdout and stderr. A process of its own
costs 5-10 s of imports (torch, hydra, robosuite) per call; tests of what a command says and
writes use this, and tests of processes (signals, kills, worker pools dying) start real ones."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from importlib.metadata import entry_points


def _absl_keeps_its_stream() -> None:
    """absl.logging (which `import openvino` brings in) binds `sys.stderr` when it is imported and
    closes that stream when its handler is closed unless it is the current `sys.stderr`. Hydra's
    logging set-up closes every handler, and `dp` runs a command with `sys.stderr` redirected: the
    stream closed would be pytest's capture file. Bound to the process's own stderr, it is left open
    (a command run as a process never redirects, so this is a test-harness matter only)."""
    try:
        import absl.logging
    except ImportError:
        return
    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


def dp(command: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """`command args...` in this process; the result as `subprocess.run(..., capture_output=True,
    text=True)` would give it. An exception the command lets escape (a traceback a user would
    see) propagates, and fails the test."""
    import torch

    _absl_keeps_its_stream()
    (point,) = entry_points(group="console_scripts", name=command)
    main = point.load()
    argv, here, threads = sys.argv, os.getcwd(), torch.get_num_threads()
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = [command, *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
        torch.set_num_threads(threads)  # commands set their own; the tests run on one
    return subprocess.CompletedProcess([command, *map(str, args)], code, out.getvalue(), err.getvalue())


def one_line_error(r: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    """`r` failed as a user's mistake should: exit code 2, exactly one line `command: ...` holding
    every fragment, and no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.startswith(f"{command}: ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Files this process writes are limited to `limit` bytes (RLIMIT_FSIZE, with SIGXFSZ ignored
    so that a write past it fails with EFBIG, as a write to a full disk fails with ENOSPC)."""
    import resource
    import signal

    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)
