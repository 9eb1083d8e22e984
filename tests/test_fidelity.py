"""dp-bench fidelity=true: each sampler's plans against DDPM-100's, offline, on a shipped policy."""

import json

import pytest
import torch

from rollouts.fidelity import energy_distance

from commands import dp


def test_energy_distance_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    same = [energy_distance(torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g))
            for _ in range(50)]
    assert abs(sum(same) / len(same)) < 0.05  # unbiased: no positive floor from the sample size
    x = torch.randn(64, 8, generator=g)
    assert energy_distance(x, x + 1.0) > 1.0 > energy_distance(x, x + 0.1)


def test_the_fidelity_table_puts_one_step_ddim_above_the_floor_and_exact_paradigms_on_it(mh_store, tmp_path):
    out = tmp_path / "fid"
    r = dp("dp-bench", "checkpoint=zoo/square", "fidelity=true", f"data={mh_store}",
           # an explicit window: `auto` would first time every window at tolerance 0 (a minute here)
           "samplers=[ddim1,'paraddpm100:tol=0,window=16']", "states=1", "draws=6", f"out={out}")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads((out / "results.json").read_text())}
    assert list(rows) == ["ddpm100", "ddim1", "paraddpm100:tol=0,window=16"]
    floor = rows["ddpm100"]["distance"]
    assert all(row["floor"] == floor for row in rows.values())
    # tolerance 0: DDPM-100's own samples from the same noise, so its distance is the floor's
    assert rows["paraddpm100:tol=0,window=16"]["distance"] == pytest.approx(floor, abs=1e-3)
    assert rows["ddim1"]["distance"] > floor + 10 * rows["ddim1"]["distance_se"] > floor
    context = json.loads((out / "context.json").read_text())
    assert context["histories"] == 1 and context["decision_states"] >= 1 and context["draws"] == 6
    modes = rows["ddpm100"]["modes"]
    assert set(modes) == {"clockwise", "counterclockwise", "between"}
    assert sum(modes.values()) == pytest.approx(1)
    assert (out / "fidelity.png").read_bytes()[:4] == b"\x89PNG"
    assert "mode_clockwise" in (out / "results.csv").read_text().splitlines()[0]
    assert "floor" in r.stdout and "decision states" in r.stdout


def test_fidelity_numbers_are_checked_at_start_up(tmp_path):
    r = dp("dp-bench", "checkpoint=zoo/square", "fidelity=true", "draws=1", f"out={tmp_path}/x")
    assert r.returncode == 2 and "draws" in r.stderr and len(r.stderr.strip().splitlines()) == 1
