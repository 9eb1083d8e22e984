"""The one way every `dp-<command>` starts: Hydra config, typed schema, one-line user errors.

A command is a function of its composed config, handed over as an instance of the command's
schema (a dataclass, built once here: `command`). Mistakes a user can make (a missing file, a
store of another task, an unknown task, a misspelt key, a value of the wrong type) are printed
as one line, `dp-<command>: <message>`, with exit code 2 and no traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import signal
import sys
import tempfile
import time
import threading
from pathlib import Path
from typing import Any, Callable, Iterator


def _conf_dir() -> Path:
    """The commands' Hydra configs: the copy an installed package carries (the wheel puts the
    repository's conf/ at common/conf), else the checkout's conf/ (a checkout or an editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "sampler").is_dir():
            return candidate
    return here.parent / "conf"  # neither: every command says so in one line (`command`)


CONF_DIR = _conf_dir()

# Hydra writes neither logs nor an output directory for our commands: they write only `out=`.
# A multirun (-m) always saves its `multirun.yaml` in the sweep directory: a temporary one.
HYDRA_QUIET = [
    "hydra/job_logging=disabled",
    "hydra/hydra_logging=disabled",
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    f"hydra.sweep.dir={Path(tempfile.gettempdir()) / 'parapolicy-multirun'}",
    "hydra.sweep.subdir=.",
]


@contextlib.contextmanager
def workers_ignore_ctrl_c() -> Iterator[None]:
    """Worker processes started in the block see no Ctrl-C until they ignore it
    (`ignore_ctrl_c_in_worker`, their initializer's first call), and this process answers a
    Ctrl-C that came during the block once it ends, not never.

    The terminal's Ctrl-C reaches the whole process group; a worker answering it would print a
    traceback of whatever it was importing. Ignoring SIGINT here while the workers start (they
    would inherit that) would drop a Ctrl-C of those milliseconds. Instead SIGINT is blocked in
    this thread (a blocked signal stays blocked across fork and exec) and, should another thread
    take it, only noted; after the block it is raised again under the handler of before."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread: elsewhere, workers start as they are
        return
    from multiprocessing import resource_tracker

    # Started now if it is not running: starting it unblocks SIGINT in this thread afterwards.
    resource_tracker.ensure_running()
    noted: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        # Unblock first, under the noting handler: one held back is delivered now and noted. The
        # other order can lose every later Ctrl-C: a signal another thread took during the block
        # runs its Python handler in this thread at the first chance, which may be just after
        # `before` is back; a KeyboardInterrupt there would skip the unblocking for good.
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, before)
    if noted:
        signal.raise_signal(signal.SIGINT)


def ignore_ctrl_c_in_worker() -> None:
    """In a worker started under `workers_ignore_ctrl_c`: ignore SIGINT from now on (the parent
    answers it and stops the workers), then unblock it, dropping one held back while starting."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def fail(command: str, message: str, code: int = 2) -> None:
    print(f"{command}: {message}", file=sys.stderr)
    if int(os.environ.get("RANK", "0")) > 0:  # data parallel: let process 0, which meets the same error
        time.sleep(3.0)                       # and speaks for all, fail first (`policy.distributed.launch`)
    sys.exit(code)


def _check_group_choices(command: str, argv: list[str]) -> None:
    """An override `group=value` naming a config group with no such option fails in one line
    (Hydra's own message spans a screen)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = CONF_DIR / key
        if sep and group.is_dir() and "," not in value and not (group / f"{value}.yaml").exists():
            known = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
            fail(command, f"unknown {key} {value!r}; known: {known}")


def _alias(arg: str, aliases: dict[str, str]) -> str:
    key, sep, value = arg.partition("=")
    return f"{aliases[key]}={value}" if sep and key in aliases else arg


def _keys(schema: type | None) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)] if schema is not None else []


def _unknown_key(key: str, schema: type | None) -> str:
    return f"unknown key {key!r} (keys: {', '.join(_keys(schema))})"


def _config_message(err: BaseException, schema: type | None) -> str:
    """One line for a Hydra/OmegaConf error: the key at fault first, then what is wrong."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from hydra.errors import OverrideParseException

    cause = err
    while cause.__cause__ is not None and not isinstance(cause, OverrideParseException):
        cause = cause.__cause__
    if isinstance(cause, OverrideParseException) and "=" in cause.override:
        return _quoting_hint(cause.override, " ".join(cause.message.split()))
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
            return _unknown_key(key, schema)
        text = getattr(cause, "msg", None) or str(cause)
        return f"{key}: {text.splitlines()[0]}" if key else text.splitlines()[0]
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _quoting_hint(override: str, message: str) -> str:
    """A command-line `key=value` Hydra's override grammar cannot read: its value unquoted holds a
    character the grammar reserves or does not know (a non-ASCII letter in a path: `dätä`, `模型`,
    a leading `~`, `#`, `=`, parentheses); quoted it is taken as it is."""
    key, _, value = override.lstrip("+~").partition("=")
    quote = '"' if "'" in value else "'"
    outer = "'" if quote == '"' else '"'
    return (f"{key}: Hydra cannot read {value!r} unquoted ({message.split(' See https')[0]}); quote it: "
            f"{outer}{key}={quote}{value}{quote}{outer} (non-ASCII letters and ~ # = ( ) need quotes)")


@contextlib.contextmanager
def _config_errors_in_one_line(name: str, schema: type | None) -> Iterator[None]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # Hydra prints its config errors over several lines and exits 1; told that a full error is
    # wanted, it raises them instead, and we print them our way.
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except (HydraException, OmegaConfBaseException) as err:
        fail(name, _config_message(err, schema))
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


@contextlib.contextmanager
def _user_errors_in_one_line(name: str) -> Iterator[None]:
    """A mistake a user can fix, met while the command runs, ends it in one line (`fail`)."""
    from omegaconf.errors import MissingMandatoryValue

    from common.errors import UserError

    try:
        yield
    except UserError as err:
        fail(name, str(err))
    except MissingMandatoryValue as err:
        fail(name, f"{err.full_key}: required")
    except FileNotFoundError as err:
        fail(name, f"{err.filename}: no such file or directory")
    except OSError as err:  # a file that cannot be written or read (permissions, a full disk)
        if err.filename is None:
            raise
        full = err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        fail(name, f"{err.filename}: {err.strerror or err}"
                   + (" (the disk is full or a file-size limit was reached)" if full else ""))
    except KeyboardInterrupt:
        fail(name, "interrupted; nothing incomplete was left at the output path", 130)


def command(config_name: str, schema: type | None = None, aliases: dict[str, str] | None = None,
            before: Callable[[Any], None] | None = None,
            ) -> Callable[[Callable[[Any], Any]], Callable[[], None]]:
    """Make `fn(cfg)` a console-script entry point reading `conf/<config_name>.yaml`.

    `schema`, a dataclass, is registered as `<config_name>_schema` so the YAML can put it first
    in its defaults list: a misspelt key or a wrong type then fails before any work starts.
    `fn` receives an instance of `schema`, built once here (`OmegaConf.to_object`: nested
    dataclasses too, their `__post_init__` checks run), so a value left `???` is one line
    `<key>: required` and a check's UserError one line too. `before(cfg)`, given, checks the
    composed config ahead of that conversion (dp-import names what is missing with its usage).
    `aliases` maps a command-line key to the config key it sets: a key named like a config group
    (`sampler=ddim` for dp-align, where `conf/sampler/` holds presets) would otherwise be taken by
    Hydra as a choice of that group.
    """
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if schema is not None:
        ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    name = f"dp-{config_name}"

    def wrap(fn: Callable[[Any], Any]) -> Callable[[], None]:
        @functools.wraps(fn)
        def task(cfg):
            # Hydra lets `+key=value` add a key even to a typed config; we have no use for one.
            extra = [k for k in cfg if schema is not None and k not in _keys(schema)]
            if extra:
                fail(name, _unknown_key(str(extra[0]), schema))
            with _user_errors_in_one_line(name):
                if before is not None:
                    before(cfg)
                return fn(OmegaConf.to_object(cfg) if schema is not None else cfg)

        hydra_main = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)

        def main() -> None:
            if not (CONF_DIR / f"{config_name}.yaml").is_file():
                fail(name, f"{CONF_DIR / config_name}.yaml: no such file; this installation lacks its "
                           "configs (conf/ in a checkout, common/conf in an installed package): "
                           "reinstall parapolicy")
            argv = [_alias(arg, aliases) for arg in sys.argv[1:]] if aliases else sys.argv[1:]
            _check_group_choices(name, argv)
            sys.argv = [name, *argv, *HYDRA_QUIET]
            with _config_errors_in_one_line(name, schema):
                hydra_main()

        return main

    return wrap
