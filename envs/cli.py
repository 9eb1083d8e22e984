"""The one way every `dp-<command>` starts: Hydra config, typed schema, one-line user errors.

A command is a function of its composed config. Mistakes a user can make (a missing file, a
store of another task, an unknown task) raise `UserError`; they are printed as one line,
`dp-<command>: <message>`, with exit code 2 and no traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Hydra writes neither logs nor an output directory for our commands: they write only `out=`.
HYDRA_QUIET = [
    "hydra/job_logging=disabled",
    "hydra/hydra_logging=disabled",
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
]


def fail(command: str, message: str, code: int = 2) -> None:
    print(f"{command}: {message}", file=sys.stderr)
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


def command(config_name: str, schema: type | None = None) -> Callable[[Callable[[Any], Any]], Callable[[], None]]:
    """Make `fn(cfg)` a console-script entry point reading `conf/<config_name>.yaml`.

    `schema`, a dataclass, is registered as `<config_name>_schema` so the YAML can put it first
    in its defaults list: a misspelt key or a wrong type then fails before any work starts.
    """
    import hydra
    from hydra.core.config_store import ConfigStore

    from envs.errors import UserError

    if schema is not None:
        ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    name = f"dp-{config_name}"

    def wrap(fn: Callable[[Any], Any]) -> Callable[[], None]:
        @functools.wraps(fn)
        def task(cfg):
            try:
                return fn(cfg)
            except UserError as err:
                fail(name, str(err))
            except FileNotFoundError as err:
                fail(name, f"{err.filename}: no such file or directory")
            except KeyboardInterrupt:
                fail(name, "interrupted; nothing incomplete was left at the output path", 130)

        hydra_main = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)

        def main() -> None:
            argv = sys.argv[1:]
            _check_group_choices(name, argv)
            sys.argv = [name, *argv, *HYDRA_QUIET]
            hydra_main()

        return main

    return wrap
