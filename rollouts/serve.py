"""`dp-serve`: the policy behind a websocket, speaking openpi-client's protocol.

    dp-serve checkpoint=outputs/lift sampler=paraddpm100 host=127.0.0.1 port=8000

A robot program written against `openpi_client.websocket_client_policy.WebsocketClientPolicy`
works unchanged:

- on connect the server sends its metadata (one binary msgpack frame): task, observation key and
  shape, action dimension, chunk sizes, sampler;
- each request is one binary frame, an observation dict `{"obs_history": float32 [n_obs, obs_dim]}`
  (an image policy's history is its flat layout: proprioception, then each camera's pixels), or
  for an image policy openpi's keys: `observation/image` and `observation/wrist_image` (uint8
  [H, W, 3], or [n_obs, H, W, 3] with the history; other sizes are resized to the policy's) and
  `observation/state` (float [9] or [n_obs, 9]: eef position, quaternion, gripper); a single frame
  stands for the whole history, as at an episode's start
  (optionally `"n_actions": int`, up to `max_actions`, for a loop that executes chunks
  asynchronously, and `"advance": int`, the control steps since this connection's previous
  request, for a warm-started sampler: each connection keeps its own warm state, and a request
  without `advance` starts cold); the reply is `{"actions": float32 [n_action_steps, action_dim],
  "policy_timing": {...}, "server_timing": {...}}`;
- arrays travel in openpi's msgpack encoding (`rollouts.wire`);
- a bad request (not msgpack, not a dict, missing key, wrong shape or dtype, values that are not
  finite as float32) gets a text frame with a one-line error, which openpi-client raises as
  RuntimeError, and the connection keeps serving; so does a plan whose actions are not finite
  (`policy.safety`: the policy refuses it, the text starts with "actions: non-finite"), so no
  reply ever carries NaN or inf;
  a message over `max_message_mb` is refused by the websocket layer (close code 1009);
- `GET /healthz` answers 200.

Requests from several clients are queued: one policy, one plan at a time, run in a worker thread
so the event loop keeps answering pings and other connections meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus

import numpy as np

from envs.cli import command
from policy.safety import check_observation
from policy.samplers import SamplerConfig
from policy.warm import WarmStart
from rollouts import wire

OBS_KEY = "obs_history"
N_ACTIONS_KEY = "n_actions"
ADVANCE_KEY = "advance"
# openpi's image request keys (its LIBERO/DROID examples) -> the policy's cameras, in order.
OPENPI_IMAGE_KEYS = ("observation/image", "observation/wrist_image")
OPENPI_STATE_KEY = "observation/state"
COMMITTED_KEY = "committed"  # Real-Time Chunking: the actions executing while this plan runs, float [m, action_dim]
FROZEN_KEY = "frozen"  # how many of them the new chunk must keep exactly


@dataclass
class ServeConfig:
    checkpoint: str = "???"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    max_message_mb: float = 8.0
    threads: int = 2
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else the CPU
    seed: int = 0


class PolicyService:
    """What the server does with one request, independent of the transport (tested directly)."""

    def __init__(self, policy):
        self.policy = policy
        self.lock = threading.Lock()  # one plan at a time: requests from several clients queue here
        self.served = 0

    def metadata(self) -> dict:
        p = self.policy
        images = {}
        if p.obs_config.image:
            images = {"obs": p.obs_config.to_dict(), "image_shape": list(p.obs_config.image_shape),
                      "image_keys": dict(zip(OPENPI_IMAGE_KEYS, p.obs_config.image_keys)),
                      "state_key": OPENPI_STATE_KEY, "state_dim": p.encoder.low_dim}
        return {"name": "parapolicy", "task": p.meta.get("task"), "checkpoint": p.meta.get("checkpoint"),
                "step": p.meta.get("step"), "obs_key": OBS_KEY, "obs_shape": [p.cfg.n_obs_steps, p.obs_dim], **images,
                "action_dim": p.action_dim, "horizon": p.cfg.horizon, "n_action_steps": p.cfg.n_action_steps,
                "max_actions": p.max_actions,
                "sampler": {k: v for k, v in vars(p.sampler).items() if v is not None}}

    def check(self, obs) -> tuple[np.ndarray, int | None, int | None]:
        """The observation history, action count and advance of a request, or a ValueError naming the field."""
        if not isinstance(obs, dict):
            raise ValueError(f"request: expected a dict with key {OBS_KEY!r}, got {type(obs).__name__}")
        if OBS_KEY not in obs and self.policy.obs_config.image and any(k in obs for k in OPENPI_IMAGE_KEYS):
            obs = {**obs, OBS_KEY: self.image_history(obs)}
        if OBS_KEY not in obs:
            raise ValueError(f"request: missing key {OBS_KEY!r} (keys: {', '.join(map(str, obs)) or 'none'})")
        x = obs[OBS_KEY]
        want = (self.policy.cfg.n_obs_steps, self.policy.obs_dim)
        if not isinstance(x, np.ndarray):
            raise ValueError(f"{OBS_KEY}: expected a float array of shape {want}, got {type(x).__name__}")
        if x.dtype.kind != "f":
            raise ValueError(f"{OBS_KEY}: dtype {x.dtype} is not a float type")
        if x.shape != want:
            raise ValueError(f"{OBS_KEY}: shape {x.shape}, expected {want}")
        x = check_observation(x, OBS_KEY)  # after the cast: float64 1e300 is inf in float32
        n = obs.get(N_ACTIONS_KEY)
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer))
                              or not 1 <= n <= self.policy.max_actions):
            raise ValueError(f"{N_ACTIONS_KEY}: {n!r} is not an integer in 1..{self.policy.max_actions}")
        advance = obs.get(ADVANCE_KEY)
        if advance is not None and (isinstance(advance, bool) or not isinstance(advance, (int, np.integer))
                                    or advance < 0):
            raise ValueError(f"{ADVANCE_KEY}: {advance!r} is not a non-negative integer")
        return x, None if n is None else int(n), None if advance is None else int(advance)

    def image_history(self, obs: dict) -> np.ndarray:
        """The flat observation history [n_obs, obs_dim] of an openpi-style image request."""
        p = self.policy
        n, size = p.cfg.n_obs_steps, p.obs_config.size
        parts = [self._steps(obs, OPENPI_STATE_KEY, (p.encoder.low_dim,), "f", n)]
        for key in OPENPI_IMAGE_KEYS[: len(p.obs_config.image_keys)]:
            frames = self._steps(obs, key, None, "u", n)
            if frames.shape[-1] != 3 or frames.ndim != 4:
                raise ValueError(f"{key}: shape {frames.shape[1:]}, expected uint8 [H, W, 3] (or [{n}, H, W, 3])")
            if frames.shape[1:3] != (size, size):
                frames = resize(frames, size)
            parts.append(frames.reshape(n, -1).astype(np.float32))
        return np.concatenate([parts[0].astype(np.float32), *parts[1:]], axis=1)

    @staticmethod
    def _steps(obs: dict, key: str, shape: tuple | None, kind: str, n: int) -> np.ndarray:
        """`obs[key]` as [n, ...]: one step repeated n times, or n steps as they are."""
        if key not in obs:
            raise ValueError(f"request: missing key {key!r} (keys: {', '.join(map(str, obs))})")
        x = obs[key]
        what = "uint8" if kind == "u" else "float"
        if not isinstance(x, np.ndarray) or x.dtype.kind != kind or (kind == "u" and x.dtype != np.uint8):
            raise ValueError(f"{key}: expected a {what} array, got {getattr(x, 'dtype', type(x).__name__)}")
        single = x.ndim == (len(shape) if shape is not None else 3)
        x = np.repeat(x[None], n, axis=0) if single else x
        if len(x) != n or (shape is not None and x.shape[1:] != shape):
            want = shape if shape is not None else ("H", "W", 3)
            raise ValueError(f"{key}: shape {obs[key].shape}, expected {list(want)} or [{n}, *{list(want)}]")
        return x

    def check_committed(self, obs: dict) -> tuple[np.ndarray | None, int]:
        """Real-Time Chunking's fields of a request: the actions the robot will execute while this
        plan runs (float [m, action_dim]) and how many of them are frozen; absent: a free plan."""
        committed, frozen = obs.get(COMMITTED_KEY), obs.get(FROZEN_KEY, 0)
        if committed is None:
            return None, 0
        if not isinstance(committed, np.ndarray) or committed.dtype.kind != "f":
            raise ValueError(f"{COMMITTED_KEY}: expected a float array [m, {self.policy.action_dim}]")
        if isinstance(frozen, bool) or not isinstance(frozen, (int, np.integer)):
            raise ValueError(f"{FROZEN_KEY}: {frozen!r} is not an integer")
        return committed, int(frozen)

    def infer(self, obs, warm: WarmStart | None = None) -> dict:
        """Plan for one request; `warm` is the connection's own warm-start state."""
        x, n, advance = self.check(obs)
        committed, frozen = self.check_committed(obs)
        start = time.perf_counter()
        with self.lock:
            waited = time.perf_counter() - start
            own = self.policy.warm  # this connection's state in, the policy's own back after
            self.policy.warm = warm if warm is not None else WarmStart()
            try:
                r = self.policy.plan(x, n, advance, committed, frozen)
            finally:
                self.policy.warm = own
            self.served += 1
        return {"actions": r.actions.astype(np.float32),
                "policy_timing": {"plan_ms": r.latency_ms, "model_evals": r.model_evals,
                                  "parallel_iters": r.parallel_iters, "converged": r.converged,
                                  "encode_ms": r.encode_ms},
                "server_timing": {"queue_ms": waited * 1e3}}


def resize(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 frames [N, H, W, 3] -> [N, size, size, 3], bilinear with antialiasing (torch's)."""
    import torch

    x = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float()  # a copy: wire arrays are read-only
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


async def serve(service: PolicyService, host: str, port: int, max_message_mb: float = 8.0,
                ready: threading.Event | None = None, stop: asyncio.Event | None = None,
                bound: list | None = None, announce: bool = False) -> None:
    """Serve until `stop` is set (forever without one). `bound` receives the (host, port) bound
    (port=0 picks a free one); `announce` prints it as `dp-serve: listening on ws://HOST:PORT`."""
    from websockets.asyncio.server import serve as ws_serve
    from websockets.exceptions import ConnectionClosed

    def health(connection, request):
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        return None

    async def handler(ws):
        warm = WarmStart()  # this connection's plans only
        await ws.send(wire.packb(service.metadata()))
        while True:
            try:
                message = await ws.recv()
            except ConnectionClosed:
                return
            t0 = time.perf_counter()
            try:
                if isinstance(message, str):
                    raise ValueError("request: a text frame; send the observation as binary msgpack")
                try:
                    obs = wire.unpackb(message)
                except wire.WireError as err:
                    raise ValueError(f"request: {err}") from None
                except Exception as err:
                    raise ValueError(f"request: not msgpack ({type(err).__name__})") from None
                reply = await asyncio.to_thread(service.infer, obs, warm)
            except ValueError as err:
                reply = str(err)
            except Exception as err:  # a failure of the policy itself: reported, the server lives on
                reply = f"server: {type(err).__name__}: {err}"
            try:
                if isinstance(reply, dict):
                    reply["server_timing"]["infer_ms"] = (time.perf_counter() - t0) * 1e3
                    await ws.send(wire.packb(reply))
                else:
                    await ws.send(reply)  # a text frame: openpi-client raises it as RuntimeError
            except ConnectionClosed:  # the client left mid-request
                return

    async with ws_serve(handler, host, port, compression=None, max_size=int(max_message_mb * 2**20),
                        process_request=health) as server:
        address = server.sockets[0].getsockname()[:2]
        if bound is not None:
            bound.append(address)
        if announce:
            print(f"dp-serve: listening on ws://{address[0]}:{address[1]} "
                  f"(health: http://{address[0]}:{address[1]}/healthz)", flush=True)
        if ready is not None:
            ready.set()
        await (stop.wait() if stop is not None else asyncio.Future())


@command("serve", ServeConfig)
def main(cfg) -> None:
    import torch

    import policy as policy_pkg

    torch.set_num_threads(cfg.threads)
    pol = policy_pkg.load(cfg.checkpoint, device=cfg.device)
    pol.sampler = SamplerConfig(**cfg.sampler)
    pol.seed(cfg.seed)
    entry = pol.choose_window()  # window=auto: chosen (or read from the cache) before the first request
    if entry is not None:
        print(f"dp-serve: window=auto chose {entry['window']} on {entry['machine']}", flush=True)
    service = PolicyService(pol)
    print(f"dp-serve: {pol.meta['checkpoint']} with {cfg.sampler.name}", flush=True)
    try:
        asyncio.run(serve(service, cfg.host, cfg.port, cfg.max_message_mb, announce=True))
    except OSError as err:
        import errno
        import socket

        from envs.errors import UserError

        # A name that does not resolve, or an address that is not this machine's, is the host's
        # fault; a port in use or reserved is the port's.
        if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"host: cannot listen on {cfg.host!r} ({err.strerror or err})") from None
        raise UserError(f"port: cannot listen on {cfg.host}:{cfg.port} ({err.strerror or err})") from None


if __name__ == "__main__":
    main()
