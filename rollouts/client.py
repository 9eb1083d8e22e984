"""A small client for `dp-serve`, for robot programs without openpi-client, and a load test.

    from rollouts.client import PolicyClient
    with PolicyClient("127.0.0.1", 8000) as client:
        actions = client.plan(obs_history)      # float32 [n_action_steps, action_dim]

`load_test(host, port, clients=8, requests=500)` runs that many clients at once and reports the
round-trip latency percentiles and any lost or wrong replies. `ServerProcess` starts `dp-serve`
in its own process on a free loopback port (what `dp-eval realtime=true` plans through).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common.closing import Closeable
from policy import safety
from rollouts import wire


class PolicyServerError(RuntimeError):
    """The server refused a request (its one-line reason is the message)."""


class PolicyClient(Closeable):
    """One connection to `dp-serve`. A request that gets no reply within `timeout` seconds raises
    TimeoutError and closes the connection: the late reply would otherwise be read as the answer
    to the next request, an action chunk for an older observation. The next request reconnects
    (a new connection starts cold for a warm-started sampler)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, timeout: float = 30.0):
        self.url, self.timeout = f"ws://{host}:{port}", timeout
        self.ws = None
        self.last: dict = {}
        self._connect()

    def _connect(self) -> None:
        from websockets.sync.client import connect

        # Entered like a context manager (closed by `close`): websockets >= 17.1 warns about a
        # connection opened without one.
        self.ws = connect(self.url, compression=None, max_size=None, open_timeout=self.timeout).__enter__()
        self.metadata = wire.unpackb(self.ws.recv(timeout=self.timeout))

    def infer(self, obs: dict) -> dict:
        """The server's reply to one observation dict. Raises PolicyServerError for a refused
        request (`policy.safety.UnsafeActions` when the plan's actions were not finite or left the
        trained range) and TimeoutError, with the connection closed, when no reply came in time."""
        if self.ws is None:
            self._connect()
        self.ws.send(wire.packb(obs))
        try:
            reply = self.ws.recv(timeout=self.timeout)
        except TimeoutError:
            self.close()
            raise TimeoutError(f"{self.url}: no reply within {self.timeout} s; the connection was closed "
                               f"so that the late reply cannot answer a later request") from None
        if isinstance(reply, str):
            # a plan the safety rule refused: its own exception, as in process
            refused = safety.refusal(reply)
            raise refused if refused is not None else PolicyServerError(reply)
        self.last = wire.unpackb(reply)
        return self.last

    def plan(self, obs_history: np.ndarray) -> np.ndarray:
        return self.infer({self.metadata["obs_key"]: np.asarray(obs_history, np.float32)})["actions"]

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None



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


def _die_with_parent() -> None:
    """In the child: be sent SIGTERM when the process that started it dies (Linux), so a server is
    never left behind by a killed evaluation worker."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class ServerProcess(Closeable):
    """`dp-serve` for `checkpoint` with `sampler` (a SamplerConfig) in a child process, on a free
    port of 127.0.0.1; `close()` (or leaving the `with`) stops it."""

    def __init__(self, checkpoint: str, sampler, threads: int = 1, device: str = "auto", seed: int = 0,
                 timeout: float = 120.0):
        overrides = [f"sampler.{k}={'null' if v is None else v}"
                     for k, v in dataclasses.asdict(sampler).items()]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rollouts.serve", f"checkpoint={checkpoint}", "host=127.0.0.1", "port=0",
             f"threads={threads}", f"device={device}", f"seed={seed}", *overrides],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent)
        lines: list[str] = []
        found = threading.Event()

        def watch() -> None:  # read until the address is announced; keep draining so the pipe never fills
            for line in self.proc.stdout:
                lines.append(line.rstrip())
                if "listening on ws://" in line:
                    found.set()
            found.set()

        threading.Thread(target=watch, daemon=True).start()
        if (not found.wait(timeout) or self.proc.poll() is not None
                or not any("listening" in x for x in lines)):
            self.close()
            raise RuntimeError(f"dp-serve did not start: {lines[-1] if lines else 'no output'}")
        address = next(x for x in lines if "listening on ws://" in x).split("ws://")[1].split()[0]
        host, port = address.rsplit(":", 1)
        self.host, self.port = host, int(port)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

