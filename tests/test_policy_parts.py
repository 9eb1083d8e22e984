"""Network contract, normalizer and training windows (issue 3 groundwork)."""

import numpy as np
import torch

from policy.network import ConditionalUnet1D, UNetConfig
from policy.normalizer import Normalizer
from policy.windows import episode_split, gather, window_index


def test_network_contract_float_steps_and_batch_independence():
    torch.manual_seed(0)
    net = ConditionalUnet1D(7, 10, UNetConfig(down_dims=[16, 32, 64], step_embed_dim=32)).eval()
    x, cond = torch.randn(4, 16, 7), torch.randn(4, 10)
    t = torch.tensor([0.0, 10.5, 37.25, 99.0])
    with torch.no_grad():
        eps = net(x, t, cond)
        assert eps.shape == x.shape and torch.isfinite(eps).all()
        # each sample depends only on its own inputs (no batch statistics)
        one = net(x[1:2], t[1:2], cond[1:2])
        torch.testing.assert_close(one, eps[1:2], atol=1e-5, rtol=1e-4)
        # a non-integer step is a different input from its neighbours
        assert not torch.allclose(net(x[1:2], torch.tensor([10.0]), cond[1:2]), one)


def test_normalizer_round_trip_and_range():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(500, 5)) * [1, 10, 0.1, 3, 0] + [0, 5, -2, 1, 7]  # last dim constant
    norm = Normalizer.fit({"action": data})
    x = torch.as_tensor(data, dtype=torch.float32)
    y = norm.normalize("action", x)
    assert y[:, :4].min() >= -1 - 1e-5 and y[:, :4].max() <= 1 + 1e-5
    assert (torch.allclose(y[:, :4].amin(0), torch.tensor(-1.0))
            and torch.allclose(y[:, :4].amax(0), torch.tensor(1.0)))
    assert torch.all(y[:, 4] == 0)  # a constant dimension is centred, not blown up
    restored = Normalizer.from_state_dict(norm.state_dict()).unnormalize("action", y)
    torch.testing.assert_close(restored, x, atol=1e-4, rtol=1e-5)


def test_windows_pad_with_the_episode_edges():
    ends = np.array([5, 9])  # episodes of 5 and 4 steps
    data = np.arange(9)[:, None]
    rows = window_index(ends, np.array([0, 1]), horizon=4, n_obs=2, n_action=2)
    # starts -1..3 for episode 0 (5 windows), -1..2 for episode 1 (4 windows)
    assert len(rows) == 9
    first = gather(data, rows[:1], 4)[0, :, 0]
    assert first.tolist() == [0, 0, 1, 2]  # history padded with the first observation
    last0 = gather(data, rows[4:5], 4)[0, :, 0]
    assert last0.tolist() == [3, 4, 4, 4]  # actions padded with the last one, never episode 1's
    first1 = gather(data, rows[5:6], 4)[0, :, 0]
    assert first1.tolist() == [5, 5, 6, 7]


def test_split_is_by_episode_and_seeded():
    train, val = episode_split(10, 0.2, seed=0)
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val)
    assert np.array_equal(episode_split(10, 0.2, seed=0)[1], val)
    assert len(episode_split(1, 0.5, seed=0)[0]) == 1  # never an empty training split
