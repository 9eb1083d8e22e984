"""The dp-serve probes of issue 30 (reliability, third round), kept as tests: hostile image
requests cannot stall the server for everyone (item 7), every numeric option is checked at
start-up in one line (item 11), and error texts stay short and `frozen` needs `committed`
(item 15). Item numbers refer to the issue."""

import contextlib
import threading
import time

import msgpack
import numpy as np
import pytest
from websockets.sync.client import connect

from rollouts import wire

from commands import dp, one_line_error

IMAGE_KEYS = ("observation/image", "observation/wrist_image")


def _image_request(shape, rng=None) -> dict:
    rng = rng or np.random.default_rng(0)
    return {**{k: rng.integers(0, 256, shape, dtype=np.uint8) for k in IMAGE_KEYS},
            "observation/state": np.zeros(9, np.float32)}


def _ask(port: int, frame: bytes, timeout: float):
    """One request on a fresh connection: the reply (text or decoded), or TimeoutError."""
    with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None) as ws:
        ws.recv(timeout=timeout)
        ws.send(frame)
        reply = ws.recv(timeout=timeout)
        return reply if isinstance(reply, str) else wire.unpackb(reply)


# --- 7: one client cannot stall the image server for everyone -------------------------------------

def test_hostile_images_are_refused_at_once_and_a_normal_client_is_served(start_server, image_checkpoint):
    """The probe: six clients each send two 1,250,000x1x3 images (7.5 MB, under the 8 MB cap);
    they are refused in one line before any resizing, and a normal client meanwhile gets its
    actions within a few seconds (it waited 106 s behind the resizes)."""
    service, port = start_server(path=image_checkpoint)
    hostile = wire.packb(_image_request((1_250_000, 1, 3)))
    assert len(hostile) < 8 * 2**20
    replies: list = [None] * 6

    def attack(i: int) -> None:
        try:
            replies[i] = _ask(port, hostile, timeout=30)
        except Exception as err:  # a timeout is recorded, and fails the test below
            replies[i] = err

    threads = [threading.Thread(target=attack, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the hostile requests are in
    t0 = time.perf_counter()
    out = _ask(port, wire.packb(_image_request((64, 64, 3))), timeout=10)
    waited = time.perf_counter() - t0
    assert isinstance(out, dict) and out["actions"].shape == (service.policy.cfg.n_action_steps, 7), out
    assert waited < 5, waited
    for t in threads:
        t.join(30)
    for reply in replies:
        assert isinstance(reply, str) and "\n" not in reply, reply
        assert reply.startswith("observation/image: 1250000x1 pixels"), reply
        assert "4096" in reply and "8:1" in reply


@pytest.mark.parametrize("shape, fragment", [
    ((4097, 8, 3), "4097x8 pixels"),
    ((4097, 4097, 3), "4097x4097 pixels"),
    ((9, 1, 3), "9x1 pixels"),
    ((10, 90, 3), "10x90 pixels"),
    ((2, 1, 720, 3), "1x720 pixels"),
    ((0, 5, 3), "0x5 pixels"),
])
def test_an_image_too_large_or_too_narrow_is_refused_in_one_line(start_server, image_checkpoint, shape,
                                                                   fragment):
    _, port = start_server(path=image_checkpoint, max_message_mb=128)
    reply = _ask(port, wire.packb(_image_request(shape)), timeout=30)
    assert isinstance(reply, str) and "\n" not in reply and fragment in reply, reply


def test_images_inside_the_caps_are_resized_once_per_frame(start_server, image_checkpoint, monkeypatch):
    """Frames at the caps (4096 a side, 8:1) are served; a single frame standing for the history is
    resized once, not once per history step."""
    import rollouts.serve as serve_mod

    resized = []
    real = serve_mod.resize

    def counting(frames, size):
        resized.append(frames.shape)
        return real(frames, size)

    monkeypatch.setattr(serve_mod, "resize", counting)
    service, port = start_server(path=image_checkpoint, max_message_mb=128)
    n = service.policy.cfg.n_obs_steps
    for shape in [(4096, 512, 3), (512, 4096, 3), (64, 64, 3)]:
        resized.clear()
        out = _ask(port, wire.packb(_image_request(shape)), timeout=60)
        assert isinstance(out, dict) and np.isfinite(out["actions"]).all(), out
        assert resized == [(1, *shape)] * 2
    resized.clear()
    out = _ask(port, wire.packb(_image_request((n, 48, 64, 3))), timeout=60)
    assert isinstance(out, dict) and resized == [(n, 48, 64, 3)] * 2


def test_a_request_without_images_does_not_queue_behind_other_clients_resizing(start_server, image_checkpoint,
                                                                               monkeypatch):
    """Resizing runs in its own queue, one request at a time in arrival order, and each connection
    has at most one request in it; a request that needs no resizing (the flat history) goes
    straight to the planner. Before, every request shared one small thread pool, and eight
    clients whose frames took long to resize held it."""
    import rollouts.serve as serve_mod

    real = serve_mod.resize

    def slow(frames, size):
        time.sleep(3)
        return real(frames, size)

    monkeypatch.setattr(serve_mod, "resize", slow)
    service, port = start_server(path=image_checkpoint)
    p = service.policy
    request = _image_request((64, 64, 3))
    request["observation/wrist_image"] = np.zeros((32, 32, 3), np.uint8)  # one resize per request
    frame = wire.packb(request)
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(connect(f"ws://127.0.0.1:{port}", compression=None)) for _ in range(8)]
        for ws in conns:
            ws.recv(timeout=30)
            ws.send(frame)
        time.sleep(0.5)
        t0 = time.perf_counter()
        out = _ask(port, wire.packb({"obs_history": np.zeros((p.cfg.n_obs_steps, p.obs_dim), np.float32)}),
                   10)
        waited = time.perf_counter() - t0
        assert isinstance(out, dict) and out["actions"].shape[0] == p.cfg.n_action_steps, out
        assert waited < 2, waited
        first = conns[0].recv(timeout=10)  # the queue moves: the first resized request is answered
        assert isinstance(first, bytes)


# --- 11: dp-serve's numbers, checked at start-up ----------------------------------------------------

@pytest.mark.parametrize("arg, message", [
    ("port=70000", "port: 70000 is not in 0..65535"),
    ("port=-1", "port: -1 is not in 0..65535"),
    ("threads=0", "threads: 0 must be at least 1"),
    ("threads=-3", "threads: -3 must be at least 1"),
    ("max_message_mb=nan", "max_message_mb: nan is not a number in (0, 1024]"),
    ("max_message_mb=inf", "max_message_mb: inf is not a number in (0, 1024]"),
    ("max_message_mb=0", "max_message_mb: 0 is not a number in (0, 1024]"),
    ("max_message_mb=-2", "max_message_mb: -2 is not a number in (0, 1024]"),
    ("max_message_mb=5000", "max_message_mb: 5000 is not a number in (0, 1024]"),
    ("max_message_mb=0.0001", "max_message_mb: 0.0001 MB cannot hold one request for this policy"),
    ("seed=-1", "seed: -1 is not in 0..2**63-1"),
])
def test_dp_serve_refuses_bad_numbers_in_one_line(checkpoint, arg, message):
    # An unresolvable host: a server started in spite of the bad number fails at once (as `host:`)
    # instead of serving.
    r = dp("dp-serve", f"checkpoint={checkpoint}", "host=no-such-host.invalid", arg)
    one_line_error(r, "dp-serve", message)


# --- 15: short error texts; `frozen` needs `committed` ---------------------------------------------

def _text_reply(ws, frame: bytes) -> str:
    ws.send(frame)
    reply = ws.recv(timeout=60)
    assert isinstance(reply, str), reply
    return reply


def test_error_texts_are_short_and_the_connection_serves_on(start_server):
    service, port = start_server()
    p = service.policy
    obs = np.zeros((p.cfg.n_obs_steps, p.obs_dim), np.float32)
    many = {f"k{i}": None for i in range(300_000)}
    with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None) as ws:
        ws.recv()
        reply = _text_reply(ws, wire.packb(many))
        assert reply.startswith("request: missing key 'obs_history' (keys: 'k0', 'k1', 'k2'"), reply[:200]
        assert "... and 299995 more" in reply and len(reply) <= 300, len(reply)
        texts = [reply]
        for frame in [
            wire.packb({"x" * 1_000_000: 1}),  # one huge key
            wire.packb({"obs_history": obs, "n_actions": list(range(100_000))}),
            wire.packb({"obs_history": obs, "advance": "y" * 1_000_000}),
            wire.packb({"obs_history": obs, "committed": np.zeros((3, 7), np.float32),
                        "frozen": "z" * 1_000_000}),
            msgpack.packb({"obs_history": {"__ndarray__": True, "data": b"", "dtype": "q" * 1_000_000,
                                           "shape": [2]}}),
            b"\xc1" * 1_000_000,
        ]:
            texts.append(_text_reply(ws, frame))
        for text in texts:
            assert "\n" not in text and 0 < len(text) <= 300, (len(text), text[:300])
        ws.send(wire.packb({"obs_history": obs}))
        assert isinstance(ws.recv(timeout=60), bytes)


def test_frozen_without_committed_is_refused(start_server):
    service, port = start_server()
    p = service.policy
    obs = np.zeros((p.cfg.n_obs_steps, p.obs_dim), np.float32)
    with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
        ws.recv()
        for frozen in (3, 0):
            assert _text_reply(ws, wire.packb({"obs_history": obs, "frozen": frozen})) == \
                "frozen: given without committed"
        ws.send(wire.packb({"obs_history": obs}))
        assert isinstance(ws.recv(timeout=60), bytes)
