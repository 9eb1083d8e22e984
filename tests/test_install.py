"""The package as a robot program would have it: the wheel installed (not editable) into a fresh
environment outside the checkout, its `dp-*` commands run from elsewhere (issue 31).

The wheel's dependencies are installed at uv.lock's versions (a constraints file exported from
it), so the test needs nothing uv's cache lacks and a new upstream release cannot fail it; the
install takes a few seconds (uv links the cached wheels)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from commands import dp, one_line_error

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "zoo" / "lift"


def run(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, (f"{' '.join(map(str, cmd))}: exit {r.returncode}\n{r.stdout[-2000:]}\n"
                               f"{r.stderr[-3000:]}")
    return r


def wait_for_address(log: Path, proc: subprocess.Popen, timeout: float) -> tuple[str, int]:
    """HOST, PORT from dp-serve's `listening on ws://HOST:PORT` line in `log`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if "listening on ws://" in line:
                host, port = line.split("ws://")[1].split()[0].rsplit(":", 1)
                return host, int(port)
        assert proc.poll() is None, f"dp-serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"dp-serve did not listen within {timeout} s:\n{log.read_text()[-3000:]}")


def test_wheel_installs_and_commands_run_from_elsewhere(tmp_path):
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("needs uv (to build the wheel and make a fresh environment)")
    assert not tmp_path.resolve().is_relative_to(ROOT)
    run([uv, "build", "--wheel", "--out-dir", tmp_path / "dist"], 300, cwd=ROOT)
    (wheel,) = (tmp_path / "dist").glob("parapolicy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "common/conf/bench.yaml" in names and "common/conf/sampler/ddim10.yaml" in names
    assert not [n for n in names if n.startswith(("zoo/", "conf/", "experiments/"))]

    run([uv, "export", "--frozen", "--no-hashes", "--no-emit-project", "--all-extras", "--quiet",
         "--output-file", tmp_path / "lock.txt"], 60, cwd=ROOT)
    venv = tmp_path / "venv"
    run([uv, "venv", "--quiet", "--python", sys.executable, venv], 120, cwd=tmp_path)
    started = time.monotonic()
    run([uv, "pip", "install", "--quiet", "--python", venv / "bin" / "python", "-c", tmp_path / "lock.txt",
         wheel], 600, cwd=tmp_path)
    print(f"install: {time.monotonic() - started:.1f} s")

    # Nothing of the checkout leaks in: no PYTHONPATH, no active environment, a directory elsewhere.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["MUJOCO_GL"] = env.get("MUJOCO_GL", "egl")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = run([venv / "bin" / "python", "-c", "import common.cli; print(common.cli.CONF_DIR)"], 60,
                cwd=cwd, env=env)
    conf = Path(where.stdout.strip())
    assert conf.is_relative_to(venv) and (conf / "serve.yaml").is_file(), conf

    # dp-serve starts (seconds of imports) while dp-bench runs; both from the fresh environment.
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([venv / "bin" / "dp-serve", f"checkpoint={ZOO}", "sampler=ddim10", "port=0",
                                   "host=127.0.0.1", "threads=1"], stdout=out, stderr=subprocess.STDOUT,
                                  cwd=cwd, env=env)
    try:
        bench = tmp_path / "bench"
        run([venv / "bin" / "dp-bench", f"checkpoint={ZOO}", "plans=2", "samplers=[ddim10]", "warmup=0",
             "batch_sizes=[1]", "overhead_plans=1", "threads=1", f"out={bench}"], 300, cwd=cwd, env=env)
        (row,) = json.loads((bench / "results.json").read_text())
        assert row["name"] == "ddim10" and row["model_evals_mean"] == 10 and row["latency_ms_p50"] > 0

        host, port = wait_for_address(log, server, 180)
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10) as reply:
            assert reply.status == 200
        from rollouts.client import PolicyClient

        obs = np.load(ZOO / "histories.npz")["obs"][0]
        with PolicyClient(host, port, timeout=60) as client:
            actions = client.plan(obs)
            assert actions.shape == (client.metadata["n_action_steps"], client.metadata["action_dim"])
        assert np.isfinite(actions).all()
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def test_missing_configs_fail_in_one_line(monkeypatch, tmp_path):
    import common.cli

    monkeypatch.setattr(common.cli, "CONF_DIR", tmp_path / "conf")
    one_line_error(dp("dp-export", "out=x"), "dp-export", "export.yaml: no such file", "reinstall parapolicy")
