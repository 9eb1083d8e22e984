"""dp-eval on Ray (`launcher=ray`, the optional extra `cluster`; uv's dev group installs Ray for
the tests, so none skips for want of it): a local Ray, one task an episode; a worker killed
mid-episode is retried and every episode is recorded exactly once, with the results of the
process pool on the same seeds. With --runslow: a Hydra multirun over a
two-node cluster that `ray start` makes on loopback."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from commands import dp


def _episode_workers() -> list[int]:
    """Pids of Ray worker processes running an episode task (Ray titles them ray::<task>)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::_episode"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_ray_run_with_a_worker_killed_records_every_episode_once_as_the_pool_does(checkpoint, tmp_path):
    common = [f"checkpoint={checkpoint}", "samplers=['ddim5:steps=2']", "episodes=3", "threads=1",
              "horizon=100", "progress=false"]  # 100 of lift's 400 steps: long enough to be killed in
    pool = dp("dp-eval", *common, "workers=1", f"out={tmp_path / 'pool'}")
    assert pool.returncode == 0, pool.stderr
    exe = Path(sys.executable).with_name("dp-eval")
    run = subprocess.Popen([str(exe), *common, "launcher=ray", "workers=2", f"out={tmp_path / 'ray'}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.monotonic() + 240
    while killed is None and run.poll() is None and time.monotonic() < deadline:
        pids = _episode_workers()
        if pids:
            time.sleep(0.5)  # mid-episode
            try:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
            except ProcessLookupError:
                continue
        time.sleep(0.1)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-2000:]
    assert killed is not None, "no episode task was seen running"
    records = [json.loads(line) for line in (tmp_path / "ray" / "episodes.jsonl").read_text().splitlines()]
    keys = [(r["sampler"], r["seed"]) for r in records]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 3  # every episode exactly once
    want = {r["seed"]: r
            for r in map(json.loads, (tmp_path / "pool" / "episodes.jsonl").read_text().splitlines())}
    for r in records:  # deterministic episodes: the pool's outcome, seed by seed
        p = want[r["seed"]]
        assert ((r["success"], r["length"], r["return_"], r["error"])
                == (p["success"], p["length"], p["return_"], p["error"]))
        assert [q["step"] for q in r["plans"]] == [q["step"] for q in p["plans"]]


def test_ray_launcher_refuses_unknown_launchers_in_one_line(checkpoint, tmp_path):
    r = dp("dp-eval", f"checkpoint={checkpoint}", "launcher=slurm", "episodes=1", f"out={tmp_path / 'x'}")
    assert r.returncode == 2 and "launcher: 'slurm' is not one of pool, ray" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raylet_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise OSError(pid)


@pytest.fixture
def ray_cluster(tmp_path):
    """A Ray cluster of two nodes on loopback, as docs/cluster.md makes one on real machines: a
    head and one worker node joining it, one CPU each, with token authentication (the token a
    file every node and the driver read). Yields the head's address and the environment that
    joins it."""
    ray = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--disable-usage-stats", "--block"]
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    nodes = [subprocess.Popen([ray, "start", "--head", f"--port={port}", "--include-dashboard=false",
                               *common],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine takes a while
        while time.monotonic() < deadline:  # the head's GCS answers
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        nodes.append(subprocess.Popen([ray, "start", f"--address={address}", *common],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        while time.monotonic() < deadline:  # both nodes registered
            status = subprocess.run([ray, "status", f"--address={address}"], capture_output=True, text=True,
                                    env=env)
            if status.stdout.count(" node_") >= 2:
                break
            time.sleep(1)
        else:
            pytest.fail(f"the Ray cluster at {address} did not come up with two nodes")
        yield address, env
    finally:
        for node in reversed(nodes):  # `ray start --block` drains and stops its node on SIGTERM
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()


# ~2 min on 2 cores (two nodes, two runs that start their workers anew); CI runs the local-Ray test
@pytest.mark.slow
def test_a_multirun_sweep_fans_out_over_a_two_node_cluster_each_episode_once(checkpoint, tmp_path,
                                                                              ray_cluster):
    """`dp-eval -m ... launcher=ray ray_address=HEAD`: every run of the Hydra sweep sends its
    episodes to the cluster that `ray start` made, and its episodes run on both nodes."""
    address, env = ray_cluster
    exe = Path(sys.executable).with_name("dp-eval")
    run = subprocess.Popen([str(exe), "-m", f"checkpoint={checkpoint}", "samplers=['paraddim15:steps=4']",
                            "options.tol=0.05,0.1", "episodes=2", "threads=1", "progress=false",
                            "launcher=ray", f"ray_address={address}", f"out={tmp_path}/tol${{options.tol}}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    raylets, deadline = set(), time.monotonic() + 300
    # which node's raylet started each episode worker
    while run.poll() is None and time.monotonic() < deadline:
        for pid in _episode_workers():
            try:
                raylets.add(_raylet_of(pid))
            except OSError:
                continue
        time.sleep(0.1)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err[-2000:]
    for tol in ("0.05", "0.1"):
        records = [json.loads(line)
                   for line in (tmp_path / f"tol{tol}" / "episodes.jsonl").read_text().splitlines()]
        assert sorted(r["seed"] for r in records) == [100000, 100001]  # every episode of this run, once
        assert {r["sampler"] for r in records} == {f"paraddim15:steps=4,tol={tol}"}, records[0]["sampler"]
        assert not any(r["error"] for r in records)
    assert len(raylets) == 2, f"episodes ran under raylets {raylets}: not on both nodes"


# --- ray_address: what answers must be a Ray head, not any TCP listener ------------------------------

@pytest.fixture
def listener():
    """A TCP server on loopback that takes connections and answers each with `reply` (None: says
    nothing and keeps it open): a wrong port, as far as Ray is concerned. Yields start(reply) -> port."""
    import threading

    sockets = []

    def start(reply: bytes | None) -> int:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        sockets.append(server)

        def serve():
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                sockets.append(conn)
                if reply is not None:
                    conn.sendall(reply)

        threading.Thread(target=serve, daemon=True).start()
        return server.getsockname()[1]

    yield start
    for s in sockets:
        s.close()


@pytest.mark.parametrize("reply, says", [
    (None, "takes connections but said nothing in 5 s: not a Ray head"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "answers, but not as a Ray head does (it does not speak gRPC)"),
    (b"SSH-2.0-OpenSSH_9.6\r\n", "answers, but not as a Ray head does"),
])
def test_dp_eval_refuses_a_tcp_listener_that_is_not_a_ray_head_before_writing(tmp_path, listener, reply,
                                                                              says):
    """A wrong port passed the TCP probe, and dp-eval then hung in Ray's join for more than 120 s
    with out/ written."""
    port = listener(reply)
    out = tmp_path / "eval"
    start = time.monotonic()
    r = dp("dp-eval", f"checkpoint={tmp_path / 'never-read'}", "launcher=ray",
           f"ray_address=127.0.0.1:{port}", "episodes=1", "progress=false", f"out={out}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("dp-eval: ")]
    assert len(lines) == 1 and f"ray_address: cannot join the Ray cluster at 127.0.0.1:{port}" in lines[0]
    assert says in lines[0] and time.monotonic() - start < 30 and not out.exists()


def _grpc_server(handler):
    import grpc
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(2), handlers=[handler] if handler else [])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_the_probe_tells_a_ray_head_from_another_grpc_server():
    """The GCS's bootstrap call answered (or refused for a token, which is ray.init's matter) is a
    Ray head; a gRPC server without it is not."""
    import grpc

    from common.errors import UserError
    from rollouts.cluster import check_address

    def gcs(context_says):
        def get_cluster_id(request, context):
            if context_says is not None:
                context.abort(context_says, "InvalidAuthToken: Authentication token is missing or incorrect")
            return b"\n\x00"

        method = grpc.unary_unary_rpc_method_handler(get_cluster_id, request_deserializer=bytes,
                                                     response_serializer=bytes)
        return grpc.method_handlers_generic_handler("ray.rpc.NodeInfoGcsService", {"GetClusterId": method})

    for handler in (gcs(None), gcs(grpc.StatusCode.UNAUTHENTICATED)):
        server, port = _grpc_server(handler)
        try:
            check_address(f"127.0.0.1:{port}", timeout=2)
        finally:
            server.stop(None)
    server, port = _grpc_server(None)
    try:
        with pytest.raises(UserError, match=f"127.0.0.1:{port} speaks gRPC but is not a Ray head's GCS"):
            check_address(f"127.0.0.1:{port}", timeout=2)
        with pytest.raises(UserError, match="speaks gRPC but is not a Ray Client server"):
            check_address(f"ray://127.0.0.1:{port}", timeout=2)
    finally:
        server.stop(None)
