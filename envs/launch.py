"""The console scripts' entry points: each imports its command only once it can answer a Ctrl-C.

A command's module imports torch, Hydra and often robosuite: seconds in which a Ctrl-C would
otherwise print a traceback of whatever import it interrupted. Here the import and the run are
inside one handler, so an interrupt anywhere ends in one line and exit code 130 (a command's own
handler, `common.cli`, says more once it runs). Nothing here imports more than the standard library.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "dp-collect": "envs.collect", "dp-import": "envs.importers", "dp-train": "policy.train",
    "dp-distill": "policy.distill",
    "dp-rollout": "rollouts.rollout", "dp-bench": "rollouts.bench", "dp-align": "rollouts.align",
    "dp-serve": "rollouts.serve", "dp-eval": "rollouts.evaluate", "dp-report": "rollouts.report",
    "dp-quickstart": "rollouts.quickstart", "dp-export": "policy.zoo",
    "dp-devicecheck": "rollouts.devicecheck", "dp-export-lerobot": "envs.lerobot",
}


def run(command: str) -> None:
    """Import `command`'s module and call its `main`; a Ctrl-C before or after the command's own
    handling is one line, exit 130."""
    try:
        importlib.import_module(COMMANDS[command]).main()
    except SystemExit:  # the command's own exit (its one line already printed)
        raise
    except BaseException as err:
        if not _interrupted(err):
            raise
        print(f"{command}: interrupted; nothing incomplete was left at the output path", file=sys.stderr)
        sys.exit(130)


def _interrupted(err: BaseException) -> bool:
    """A Ctrl-C, or an error raised because of one: an import interrupted inside a library's own
    set-up can surface as that library's error (numpy: "Unable to configure default
    ndarray.__str__") with the KeyboardInterrupt as its cause."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def dp_collect() -> None:
    run("dp-collect")


def dp_import() -> None:
    run("dp-import")


def dp_export_lerobot() -> None:
    run("dp-export-lerobot")


def dp_train() -> None:
    run("dp-train")


def dp_distill() -> None:
    run("dp-distill")


def dp_rollout() -> None:
    run("dp-rollout")


def dp_bench() -> None:
    run("dp-bench")


def dp_align() -> None:
    run("dp-align")


def dp_serve() -> None:
    run("dp-serve")


def dp_eval() -> None:
    run("dp-eval")


def dp_report() -> None:
    run("dp-report")


def dp_quickstart() -> None:
    run("dp-quickstart")


def dp_export() -> None:
    run("dp-export")


def dp_devicecheck() -> None:
    run("dp-devicecheck")
