"""A small client for `dp-serve`, for robot programs without openpi-client, and a load test.

    from rollouts.client import PolicyClient
    with PolicyClient("127.0.0.1", 8000) as client:
        actions = client.plan(obs_history)      # float32 [n_action_steps, action_dim]

`load_test(host, port, clients=8, requests=500)` runs that many clients at once and reports the
round-trip latency percentiles and any lost or wrong replies.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rollouts import wire


class PolicyServerError(RuntimeError):
    """The server refused a request (its one-line reason is the message)."""


class PolicyClient:
    def __init__(self, host: str = "127.0.0.1", port: int = 8000, timeout: float = 30.0):
        from websockets.sync.client import connect

        self.ws = connect(f"ws://{host}:{port}", compression=None, max_size=None, open_timeout=timeout)
        self.timeout = timeout
        self.metadata = wire.unpackb(self.ws.recv(timeout=timeout))
        self.last: dict = {}

    def infer(self, obs: dict) -> dict:
        self.ws.send(wire.packb(obs))
        reply = self.ws.recv(timeout=self.timeout)
        if isinstance(reply, str):
            raise PolicyServerError(reply)
        self.last = wire.unpackb(reply)
        return self.last

    def plan(self, obs_history: np.ndarray) -> np.ndarray:
        return self.infer({self.metadata["obs_key"]: np.asarray(obs_history, np.float32)})["actions"]

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_test(host: str, port: int, clients: int = 8, requests: int = 500) -> dict:
    """`clients` connections at once, each sending `requests` observations and checking every
    reply: p50/p99 round trip, lost replies (errors, timeouts, disconnects) and wrong ones (not an
    action chunk of the advertised shape, or not finite)."""

    def session(i: int) -> tuple[list[float], int, int]:
        times, lost, wrong = [], 0, 0
        try:
            with PolicyClient(host, port) as c:
                shape = tuple(c.metadata["obs_shape"])
                want = (c.metadata["n_action_steps"], c.metadata["action_dim"])
                obs = np.full(shape, i / max(clients, 1), np.float32)
                for _ in range(requests):
                    t0 = time.perf_counter()
                    try:
                        a = c.plan(obs)
                    except Exception:
                        lost += 1
                        continue
                    times.append((time.perf_counter() - t0) * 1e3)
                    wrong += int(a.shape != want or not np.isfinite(a).all())
        except Exception:
            lost += requests - len(times)
        return times, lost, wrong

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(session, range(clients)))
    wall = time.perf_counter() - start
    times = np.concatenate([np.asarray(r[0]) for r in results]) if results else np.zeros(0)
    return {"clients": clients, "requests": clients * requests, "answered": int(len(times)),
            "lost": int(sum(r[1] for r in results)), "wrong": int(sum(r[2] for r in results)),
            "p50_ms": float(np.percentile(times, 50)) if len(times) else None,
            "p99_ms": float(np.percentile(times, 99)) if len(times) else None,
            "throughput_per_s": float(len(times) / wall) if wall > 0 else None}
