"""dp-serve on loopback, driven by the real openpi-client package: metadata on connect, actions
out, one-line errors that leave the connection serving, size limit, disconnects, several
clients, health check, and the wire encoding byte for byte."""

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import pytest
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from rollouts import wire

from commands import dp

# openpi-client 0.1.2 calls websockets' connect() outside a `with`, which websockets >= 16 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager"
                                        ":DeprecationWarning")


def _obs(service, **kw):
    p = service.policy
    return {"obs_history": np.zeros((p.cfg.n_obs_steps, p.obs_dim), np.float32), **kw}


def test_openpi_client_gets_metadata_and_actions(start_server):
    service, port = start_server()
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    meta = client.get_server_metadata()
    p = service.policy
    assert meta["obs_key"] == "obs_history" and meta["obs_shape"] == [p.cfg.n_obs_steps, p.obs_dim]
    assert meta["action_dim"] == p.action_dim and meta["sampler"]["name"] == "ddim"
    out = client.infer(_obs(service))
    assert out["actions"].shape == (p.cfg.n_action_steps, p.action_dim) and out["actions"].dtype == np.float32
    assert out["policy_timing"]["model_evals"] == 5 and out["server_timing"]["infer_ms"] > 0
    assert service.served == 1


@pytest.mark.parametrize("bad, message", [
    ({"obs_history": np.zeros((3, 3), np.float32)}, r"obs_history: shape \(3, 3\), expected"),
    ({"obs_history": "zeros"}, "obs_history: expected a float array"),
    ({"state": np.zeros(3)}, "request: missing key 'obs_history'"),
])
def test_bad_observation_gets_one_line_error_and_the_connection_keeps_serving(start_server, bad, message):
    service, port = start_server()
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    with pytest.raises(RuntimeError, match=message):
        client.infer(bad)
    assert client.infer(_obs(service))["actions"].shape[0] == service.policy.cfg.n_action_steps


def test_wrong_dtype_is_named(start_server):
    service, port = start_server()
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    p = service.policy
    with pytest.raises(RuntimeError, match="obs_history: dtype int64 is not a float type"):
        client.infer({"obs_history": np.zeros((p.cfg.n_obs_steps, p.obs_dim), np.int64)})


def test_a_request_may_ask_for_more_of_the_chunk(start_server):
    """An asynchronous loop asks for the rest of the chunk: the first n_action_steps of it are the
    plain reply's (same noise)."""
    service, port = start_server()
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    p = service.policy
    assert (client.get_server_metadata()["max_actions"] == p.max_actions
            == p.cfg.horizon - p.cfg.n_obs_steps + 1)
    obs = _obs(service)
    p.seed(3)
    short = client.infer(obs)["actions"]
    p.seed(3)
    long = client.infer({**obs, "n_actions": p.max_actions})["actions"]
    assert long.shape == (p.max_actions, p.action_dim)
    np.testing.assert_array_equal(long[: p.cfg.n_action_steps], short)
    for bad in (0, p.max_actions + 1, "15", 2.0, True):
        with pytest.raises(RuntimeError, match=rf"n_actions: .* is not an integer in 1\.\.{p.max_actions}"):
            client.infer({**obs, "n_actions": bad})


def test_malformed_and_oversized_messages(start_server):
    service, port = start_server(max_message_mb=0.01)
    with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
        ws.recv()  # metadata
        ws.send(b"\xc1\xc1 not msgpack")
        assert ws.recv().startswith("request: not msgpack")
        ws.send("hello")
        assert "text frame" in ws.recv()
        ws.send(wire.packb(_obs(service)))
        assert "actions" in wire.unpackb(ws.recv())
    with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
        ws.recv()
        ws.send(b"\x00" * 20_000)  # over 0.01 MB
        with pytest.raises(ConnectionClosed) as info:
            ws.recv()
        assert info.value.rcvd.code == 1009  # message too big
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)  # and others are still served
    assert "actions" in client.infer(_obs(service))


def test_client_leaving_mid_request_does_not_break_the_server(start_server):
    service, port = start_server()
    for _ in range(3):
        with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
            ws.recv()
            ws.send(wire.packb(_obs(service)))
        # closed before the reply
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    assert "actions" in client.infer(_obs(service))


def test_several_clients_at_once_are_all_answered(start_server):
    service, port = start_server()
    p = service.policy

    def session(i):
        client = WebsocketClientPolicy(host="127.0.0.1", port=port)
        obs = {"obs_history": np.full((p.cfg.n_obs_steps, p.obs_dim), i / 10, np.float32)}
        return [client.infer(obs)["actions"].shape for _ in range(10)]

    with ThreadPoolExecutor(4) as pool:
        shapes = [s for r in pool.map(session, range(4)) for s in r]
    assert shapes == [(p.cfg.n_action_steps, p.action_dim)] * 40
    assert service.served == 40


def test_health_check(start_server):
    _, port = start_server()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
        assert r.status == 200 and r.read() == b"OK\n"


def test_wire_encoding_is_openpi_clients_byte_for_byte():
    obj = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.float64(2.5), "c": [1, "x"],
           "d": {"e": np.ones(2, np.int16)}}
    assert wire.packb(obj) == msgpack_numpy.packb(obj)
    back = wire.unpackb(msgpack_numpy.packb(obj))
    np.testing.assert_array_equal(back["a"], obj["a"])
    assert back["b"] == 2.5 and back["d"]["e"].dtype == np.int16
    with pytest.raises(ValueError, match="unsupported dtype object"):
        wire.packb({"x": np.array([object()])})


def test_dp_serve_bad_checkpoint_is_one_line(tmp_path):
    r = dp("dp-serve", f"checkpoint={tmp_path / 'nope'}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "no such checkpoint" in r.stderr


def test_own_client_and_a_small_load_test(start_server):
    from rollouts.client import PolicyClient, PolicyServerError, load_test

    service, port = start_server()
    p = service.policy
    with PolicyClient("127.0.0.1", port) as client:
        assert client.metadata["obs_shape"] == [p.cfg.n_obs_steps, p.obs_dim]
        actions = client.plan(np.zeros((p.cfg.n_obs_steps, p.obs_dim)))
        assert actions.shape == (p.cfg.n_action_steps, p.action_dim)
        assert client.last["policy_timing"]["model_evals"] == 5
        with pytest.raises(PolicyServerError, match="obs_history: shape"):
            client.plan(np.zeros(3))
    report = load_test("127.0.0.1", port, clients=4, requests=25)
    assert (report["answered"], report["lost"], report["wrong"]) == (100, 0, 0)
    assert report["p99_ms"] >= report["p50_ms"] > 0
    assert service.served == 1 + 100


def test_a_request_with_committed_actions_gets_a_chunk_that_starts_with_them(start_server):
    """Real-Time Chunking through dp-serve: `committed` and `frozen` in the request; a request
    without them (openpi-client's) is a free plan; a bad prefix is one line and the connection serves on."""
    service, port = start_server()
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    p = service.policy
    # actions the policy could have planned: spread over its trained range (outside it they are refused)
    spread = torch.linspace(-0.9, 0.9, 5 * p.action_dim).reshape(5, p.action_dim)
    committed = p.normalizer.unnormalize("action", spread).numpy().astype(np.float32)
    out = client.infer({**_obs(service), "n_actions": 8, "committed": committed, "frozen": 3})
    np.testing.assert_allclose(out["actions"][:3], committed[:3], atol=1e-5)
    free = client.infer(_obs(service))["actions"]
    assert np.abs(free[:3] - committed[:3]).max() > 1e-3
    with pytest.raises(RuntimeError, match="frozen: 9 is not in 0..5"):
        client.infer({**_obs(service), "committed": committed, "frozen": 9})
    with pytest.raises(RuntimeError, match="committed: expected a float array"):
        client.infer({**_obs(service), "committed": [1, 2]})
    assert client.infer(_obs(service))["actions"].shape[0] == p.cfg.n_action_steps


def test_a_request_naming_features_the_policy_lacks_or_sending_both_forms_is_refused(start_server):
    """A policy of an imported dataset takes its features by name; a request naming one it does
    not have, or sending obs_history besides, gets a one-line error (not a plan that dropped one
    of them unseen), and the connection keeps serving."""
    service, port = start_server()
    p = service.policy
    p.meta.update(features={"features": {}, "obs": None, "action": "action", "fps": 20},
                  obs_layout={"observation.state": [0, 10], "observation.environment_state": [10, p.obs_dim]})
    client = WebsocketClientPolicy(host="127.0.0.1", port=port)
    named = {"observation.state": np.zeros(10, np.float32),
             "observation.environment_state": np.zeros(p.obs_dim - 10, np.float32)}
    by_name = client.infer(named)["actions"]
    with pytest.raises(RuntimeError, match=r"request: names 1 observation feature\(s\) this policy does "
                                           r"not have: 'observation.images.top' \(its features: "
                                           r"observation.state, observation.environment_state"):
        client.infer({**named, "observation.images.top": np.zeros((8, 8, 3), np.uint8)})
    with pytest.raises(RuntimeError, match=r"request: sends both 'obs_history' and the features "
                                           r"observation.state, observation.environment_state; send one"):
        client.infer({**_obs(service), **named})
    with pytest.raises(RuntimeError, match="does not have: 'observation.stat' "):
        client.infer({**_obs(service), "observation.stat": np.zeros(10, np.float32)})  # a typo is named too
    assert client.infer(named)["actions"].shape == by_name.shape == (p.cfg.n_action_steps, p.action_dim)
    assert client.infer({**_obs(service), "n_actions": 3})["actions"].shape[0] == 3  # other fields: as before
