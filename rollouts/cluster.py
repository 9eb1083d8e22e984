"""dp-eval's episodes on a Ray cluster (`launcher=ray`; the optional extra `cluster`).

Each (sampler, seed) episode is one Ray task. A worker process builds its policy and env once
(`rollouts.evaluate._init_worker`) and keeps them for every later task it runs, as a pool worker
does. The driver alone appends to the episode log, in the order episodes finish; a task whose
worker dies is run again by Ray (`max_retries`), and its episode is recorded once, when it
returns. Episodes are deterministic, so the results equal the process pool's on the same seeds.

    uv run --extra cluster dp-eval checkpoint=zoo/lift launcher=ray              # a local Ray
    uv run --extra cluster dp-eval checkpoint=zoo/lift launcher=ray ray_address=HEAD:6379
"""

from __future__ import annotations

import os
from collections.abc import Callable

from envs.errors import UserError


def check_installed() -> None:
    """launcher=ray's one-line refusal where the optional extra is not installed (checked before any work)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UserError("launcher: ray needs the optional extra 'cluster' (uv run --extra cluster dp-eval ..., "
                        "or pip install 'parapolicy[cluster]')")


def _episode(init: tuple, job: dict) -> dict:
    from rollouts import evaluate

    if evaluate._W.get("init") != init:  # this worker process's first task of this evaluation
        evaluate._init_worker(*init)
        evaluate._W["init"] = init
    return evaluate._run_job(job)


def run_on_ray(jobs: list[dict], keep: Callable[[dict], None], init: tuple, workers: int,
               address: str | None = None, max_retries: int = 3) -> None:
    """Run `jobs` as Ray tasks (`workers` at a time on a local Ray; as many as the cluster's
    CPUs allow, `threads` CPUs each, at `address`), calling `keep` with each record as it returns."""
    # Under `uv run`, Ray (>= 2.43) starts each worker through `uv run` again by default, which
    # fails where uv cannot resolve anew (CI, no network): the workers take this interpreter, the
    # driver's environment, instead. Read when ray is imported; a user's own setting wins.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    check_installed()
    import ray

    threads = init[2]
    started = not ray.is_initialized()
    if started:
        # address="local": a Ray of its own, even where a `ray start` cluster runs on this machine
        # (a bare ray.init() would join that one, and refuse num_cpus).
        options = ({"address": address} if address else
                   {"address": "local", "num_cpus": workers * threads, "include_dashboard": False})
        try:
            ray.init(log_to_driver=False, **options)
        except (ConnectionError, ValueError, RuntimeError, ray.exceptions.RayError) as err:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            if address:
                hint = ("" if os.environ.get("RAY_AUTH_MODE") == "token" else "; a cluster with token authentication "
                        "needs RAY_AUTH_MODE=token and its token here too, see docs/cluster.md")
                raise UserError(f"ray_address: cannot join the Ray cluster at {address} ({why}{hint})") from None
            raise UserError(f"launcher: ray could not start a local Ray ({why})") from None
    try:
        task = ray.remote(num_cpus=threads, max_retries=max_retries)(_episode)
        pending = [task.remote(init, job) for job in jobs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            keep(ray.get(done[0]))
    finally:
        if started:
            ray.shutdown()
