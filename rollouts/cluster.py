"""dp-eval's episodes on a Ray cluster (`launcher=ray`; the optional extra `cluster`).

Each (sampler, seed) episode is one Ray task. A worker process builds its policy and env once
(`rollouts.worker.init_worker`) and keeps them for every later task it runs, as a pool worker
does. The driver alone appends to the episode log, in the order episodes finish; a task whose
worker dies is run again by Ray (`max_retries`), and its episode is recorded once, when it
returns. Episodes are deterministic, so the results equal the process pool's on the same seeds.

    uv run --extra cluster dp-eval checkpoint=zoo/lift launcher=ray              # a local Ray
    uv run --extra cluster dp-eval checkpoint=zoo/lift launcher=ray ray_address=HEAD:6379
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from common.errors import UserError

if TYPE_CHECKING:
    from rollouts.worker import WorkerInit


def check_installed() -> None:
    """launcher=ray's one-line refusal where the optional extra is not installed (checked before any work)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UserError("launcher: ray needs the optional extra 'cluster' "
                        "(uv run --extra cluster dp-eval ..., or pip install 'parapolicy[cluster]')")


PROBE_TIMEOUT_S = 5.0  # the head's GCS port answers a TCP connect at once; a silent host is given this long
# What a Ray head's port answers: the GCS's bootstrap call (it needs no cluster id); a Ray Client
# server (ray://) its ClusterInfo PING, the client's own first call (the request: type=PING, as
# protobuf bytes). Any answer but "no such method" is Ray's.
_PROBE = {False: ("/ray.rpc.NodeInfoGcsService/GetClusterId", b""),
          True: ("/ray.rpc.RayletDriver/ClusterInfo", b"\x08\x06")}


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (or `ray://host:port`, `[v6]:port`) of a Ray head, checked; a one-line
    `UserError` naming `ray_address` otherwise. `auto` (the `ray start` cluster of this machine,
    found by Ray) is not parsed here."""
    text = str(address).strip()
    rest = text[len("ray://"):] if text.startswith("ray://") else text
    host, sep, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit():
        raise UserError(f"ray_address: {address!r} is not host:port (e.g. HEAD_HOST:6379)")
    if not 1 <= int(port) <= 65535:
        raise UserError(f"ray_address: port {port} of {address!r} is not in 1..65535")
    return host, int(port)


def check_address(address: str | None, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse, in one line and within about twice `timeout` seconds, a `ray_address` that is not
    host:port, where nothing answers a TCP connect, or where what answers is not a Ray head (a
    wrong port: a listener that says nothing, or speaks something other than Ray's gRPC). Ray's
    own join retries an unreachable head for many minutes (829 s for 127.0.0.1:1) before it gives
    up, and waits on a silent listener for longer than 120 s."""
    import socket

    if address is None or str(address).strip() == "auto":
        return
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as err:
        why = f"host {host!r} does not resolve: {err.strerror or err}"
    except TimeoutError:
        why = (f"no answer from {host}:{port} within {timeout:g} s; is the head running, and its port open "
               "to this machine?")
    except ConnectionRefusedError:
        why = (f"connection refused: nothing listens at {host}:{port}; "
               f"start the head with `ray start --head --port={port}`")
    except OSError as err:
        why = f"{err.strerror or err}"
    else:
        why = _not_a_head(host, port, str(address).strip().startswith("ray://"), timeout)
        if why is None:
            return
    raise UserError(f"ray_address: cannot join the Ray cluster at {address} ({why})") from None


def _not_a_head(host: str, port: int, client: bool, timeout: float) -> str | None:
    """Why what listens at host:port is not a Ray head (or, `client`, a Ray Client server), or
    None if it answered Ray's bootstrap call as one does: with a reply, or a refusal of that call
    (a token it wants is `ray.init`'s matter). By grpcio (installed with tensorboard, a
    dependency of the package); under RAY_USE_TLS, over Ray's own TLS channel."""
    check_installed()
    import grpc

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # as run_on_ray: read at import
        from ray._private.grpc_utils import init_grpc_channel

        channel = init_grpc_channel(target)
    else:
        channel = grpc.insecure_channel(target)
    try:
        method, request = _PROBE[client]
        call = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
        call(request, timeout=timeout)
    except grpc.RpcError as err:
        code, where = err.code(), f"{host}:{port}"
        hint = ("is this the head's Ray Client port (default 10001)?" if client else
                "is this the head's port (`ray start --head --port=P`, default 6379)?")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{where} takes connections but said nothing in {timeout:g} s: not a Ray head; {hint}"
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"{where} answers, but not as a Ray head does (it does not speak gRPC); {hint}"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            kind = "a Ray Client server" if client else "a Ray head's GCS"
            return f"{where} speaks gRPC but is not {kind}; {hint}"
    finally:
        channel.close()
    return None


def _episode(init: WorkerInit, job: dict) -> dict:
    from rollouts import worker

    if worker.state.init != init:  # this worker process's first task of this evaluation
        worker.init_worker(init)
    return worker.run_job(job)


def run_on_ray(jobs: list[dict], keep: Callable[[dict], None], init: WorkerInit, workers: int,
               address: str | None = None, max_retries: int = 3) -> None:
    """Run `jobs` as Ray tasks (`workers` at a time on a local Ray; as many as the cluster's
    CPUs allow, `threads` CPUs each, at `address`), calling `keep` with each record as it returns."""
    # Under `uv run`, Ray (>= 2.43) starts each worker through `uv run` again by default, which
    # fails where uv cannot resolve anew (CI, no network): the workers take this interpreter, the
    # driver's environment, instead. Read when ray is imported; a user's own setting wins.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    check_installed()
    import ray

    threads = init.threads
    started = not ray.is_initialized()
    if started:
        # a head that went away since start-up: one line now, not Ray's minutes of retries
        check_address(address)
        # address="local": a Ray of its own, even where a `ray start` cluster runs on this machine
        # (a bare ray.init() would join that one, and refuse num_cpus).
        options = ({"address": address} if address else
                   {"address": "local", "num_cpus": workers * threads, "include_dashboard": False})
        try:
            ray.init(log_to_driver=False, **options)
        except (ConnectionError, ValueError, RuntimeError, ray.exceptions.RayError) as err:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            if address:
                hint = ("" if os.environ.get("RAY_AUTH_MODE") == "token" else
                        "; a cluster with token authentication needs RAY_AUTH_MODE=token and its token here "
                        "too, see docs/cluster.md")
                message = f"ray_address: cannot join the Ray cluster at {address} ({why}{hint})"
                raise UserError(message) from None
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
