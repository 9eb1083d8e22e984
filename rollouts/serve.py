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
  stands for the whole history, as at an episode's start; a policy trained on an imported
  LeRobotDataset (task=external) also takes the dataset's features by name (`observation.state`:
  float [width] or [n_obs, width]), which its metadata lists under `features`
  (optionally `"n_actions": int`, up to `max_actions`, for a loop that executes chunks
  asynchronously, and `"advance": int`, the control steps since this connection's previous
  request, for a warm-started sampler: each connection keeps its own warm state, and a request
  without `advance` starts cold); the reply is `{"actions": float32 [n_action_steps, action_dim],
  "policy_timing": {...}, "server_timing": {...}}`;
- arrays travel in openpi's msgpack encoding (`rollouts.wire`);
- a bad request (not msgpack, not a dict, missing key, wrong shape or dtype, values that are not
  finite as float32) gets a text frame with a one-line error, which openpi-client raises as
  RuntimeError, and the connection keeps serving; so does a plan the safety rule refuses
  (`policy.safety`: not finite, or outside the trained range; the text starts with
  "actions: non-finite" or "actions: outside the trained range"), so no reply ever carries NaN,
  inf or an action the policy was not trained for;
  a message over `max_message_mb` is refused by the websocket layer (close code 1009); every
  error text is one line of at most 300 characters (a request's keys are named up to five, then
  "... and N more"); `frozen` without `committed` is refused;
- a frame is refused from its shape, before any pixel is read, with more than 4096 pixels a side,
  no pixels, or an aspect ratio over 8:1 (`MAX_IMAGE_SIDE`, `MAX_ASPECT`);
- `GET /healthz` answers 200.

Requests from several clients are queued: one policy, one plan at a time, run in a worker thread
so the event loop keeps answering pings and other connections meanwhile. Resizing an image
request's frames runs first, in a queue of its own (one request at a time, in arrival order, at
most one per connection), so a client sending costly frames delays another image client by at
most one of its requests and a request without images not at all.

`port` (0..65535), `threads` (>= 1), `max_message_mb` (finite, in (0, 1024], and large enough for
one request of the policy) and `seed` (0..2**63-1) are checked at start-up, one line naming the key.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus

import numpy as np

from common.cli import command
from policy.safety import check_observation
from policy.samplers import SamplerConfig
from policy.warm import PlanSession, WarmStart
from rollouts import wire

OBS_KEY = "obs_history"
N_ACTIONS_KEY = "n_actions"
ADVANCE_KEY = "advance"
# openpi's image request keys (its LIBERO/DROID examples) -> the policy's cameras, in order.
OPENPI_IMAGE_KEYS = ("observation/image", "observation/wrist_image")
OPENPI_STATE_KEY = "observation/state"
# Request keys that name an observation feature (LeRobot's `observation.state`, openpi's
# `observation/image`): one the policy does not have is refused, not dropped unseen.
FEATURE_PREFIXES = ("observation.", "observation/")
# Real-Time Chunking: the actions executing while this plan runs, float [m, action_dim]
COMMITTED_KEY = "committed"
FROZEN_KEY = "frozen"  # how many of them the new chunk must keep exactly

# What one image in a request may be, checked from its shape before a pixel is read: at most
# 4096 pixels a side (16.8 MP; 4K UHD cameras give 3840x2160, and the policy sees 32-224 px) and
# a long side at most 8 times the short one (a 32:9 ultra-wide is 3.6:1). The cost of torch's
# antialiased resize grows with the aspect ratio faster than with the bytes: one 1,250,000x1
# frame (3.75 MB) took 2.3 s on a 2-core CPU, a 4096x512 one 28 ms, 4096x4096 275 ms.
MAX_IMAGE_SIDE = 4096
MAX_ASPECT = 8
# max_message_mb: above this a message is not a request (websockets holds each one whole in memory).
MAX_MESSAGE_MB = 1024.0
# The longest error text sent back (a request of 300k keys once got a 2.3 MB line naming them all).
MAX_ERROR_CHARS = 300


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


def check_options(cfg) -> None:
    """dp-serve's numeric options, checked once before anything loads: a UserError naming the key."""
    from common.errors import UserError

    if not 0 <= cfg.port <= 65535:
        raise UserError(f"port: {cfg.port} is not in 0..65535")
    if cfg.threads < 1:
        raise UserError(f"threads: {cfg.threads} must be at least 1")
    mb = cfg.max_message_mb
    if not (math.isfinite(mb) and 0 < mb <= MAX_MESSAGE_MB):
        raise UserError(f"max_message_mb: {mb:g} is not a number in (0, {MAX_MESSAGE_MB:g}]")
    if not 0 <= cfg.seed < 2**63:
        raise UserError(f"seed: {cfg.seed} is not in 0..2**63-1")


def check_message_size(max_message_mb: float, service: PolicyService) -> None:
    """A message limit too small for the policy's own smallest request would refuse every request."""
    from common.errors import UserError

    p = service.policy
    need = len(wire.packb({OBS_KEY: np.zeros((p.cfg.n_obs_steps, p.obs_dim), np.float32)}))
    if int(max_message_mb * 2**20) < need:
        raise UserError(f"max_message_mb: {max_message_mb:g} MB cannot hold one request for this policy "
                        f"({need} bytes of {OBS_KEY})")


def _show(value, limit: int = 40) -> str:
    """`repr(value)`, cut to `limit` characters: error texts quote what a client sent, briefly."""
    text = repr(value) if not isinstance(value, np.ndarray) else f"array{value.shape}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _keys(obs: dict, shown: int = 5) -> str:
    """The first few keys of a request, then how many more (a request may hold 300k of them)."""
    names = [_show(k, 30) for _, k in zip(range(shown), obs)]
    more = len(obs) - len(names)
    return ", ".join(names) + (f", ... and {more} more" if more > 0 else "") if names else "none"


def one_line(text: str) -> str:
    """An error text as sent back: one line, at most MAX_ERROR_CHARS characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def check_image_size(key: str, x: np.ndarray) -> None:
    """Refuse a frame ([H, W, 3] or [n, H, W, 3]) with more than MAX_IMAGE_SIDE pixels a side, no
    pixels, or a long side more than MAX_ASPECT times the short one; from its shape alone."""
    if not isinstance(x, np.ndarray) or x.ndim not in (3, 4):
        return  # not a frame: the shape checks name it
    h, w = x.shape[-3], x.shape[-2]
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE and max(h, w) <= MAX_ASPECT * min(h, w)):
        raise ValueError(f"{key}: {h}x{w} pixels; a frame may have 1 to {MAX_IMAGE_SIDE} pixels a side and "
                         f"an aspect ratio up to {MAX_ASPECT}:1")


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
                "step": p.meta.get("step"), "obs_key": OBS_KEY, "obs_shape": [p.cfg.n_obs_steps, p.obs_dim],
                **images, **self.features(),
                "action_dim": p.action_dim, "horizon": p.cfg.horizon, "n_action_steps": p.cfg.n_action_steps,
                "max_actions": p.max_actions,
                "sampler": {k: v for k, v in vars(p.sampler).items() if v is not None},
                "backend": p.backend}  # where the denoiser's calls run (backend=auto: as measured here)

    def features(self) -> dict:
        """An imported dataset's features (a policy trained with task=external): what a robot client
        sends, by name, instead of the flat history: each `[n_obs, width]` or `[width]`."""
        described = self.policy.meta.get("features")
        if not described:
            return {}
        layout, feats = self.policy.meta["obs_layout"], described.get("features") or {}
        observation = {k: {"shape": [b - a], "names": (feats.get(k) or {}).get("names"), "slice": [a, b]}
                       for k, (a, b) in layout.items()}
        key = described.get("action")
        action = {"key": key, "names": (feats.get(key) or {}).get("names")}
        return {"features": {"observation": observation, "action": action, "fps": described.get("fps")}}

    def feature_history(self, obs: dict) -> np.ndarray:
        """The flat observation history of a request that sends the dataset's features by name."""
        n = self.policy.cfg.n_obs_steps
        layout = self.policy.meta["obs_layout"]
        return np.concatenate([self._steps(obs, k, (b - a,), n).astype(np.float32)
                               for k, (a, b) in layout.items()], axis=1)

    def needs_decoding(self, obs) -> bool:
        """Whether a request carries openpi-style images to turn into the flat history (the costly
        part of a request: resizing, run by the server in its decoding queue)."""
        return (isinstance(obs, dict) and OBS_KEY not in obs and bool(self.policy.obs_config.image)
                and any(k in obs for k in OPENPI_IMAGE_KEYS))

    def check_images(self, obs) -> None:
        """The size caps of a request's frames, from their shapes (cheap: run before queueing)."""
        if self.needs_decoding(obs):
            for key in OPENPI_IMAGE_KEYS[: len(self.policy.obs_config.image_keys)]:
                check_image_size(key, obs.get(key))

    def decode(self, obs: dict) -> dict:
        """The request with its images, or its named features, made into the flat observation
        history; the keys it was made from are dropped (decoding it again changes nothing)."""
        named = self.names_features(obs)
        if self.needs_decoding(obs):
            made, history = (*OPENPI_IMAGE_KEYS, OPENPI_STATE_KEY), self.image_history
        elif named:
            made, history = tuple(self.policy.meta["obs_layout"]), self.feature_history
        else:
            return obs
        return {**{k: v for k, v in obs.items() if k not in made}, OBS_KEY: history(obs)}

    def names_features(self, obs: dict) -> bool:
        """Whether a request sends an imported dataset's features by name; a ValueError for one
        that names an observation feature the policy does not have (it would be dropped unseen) or
        sends `obs_history` besides named features or openpi's image keys (one of the two would be
        dropped unseen)."""
        p = self.policy
        known = tuple(p.meta["obs_layout"]) if p.meta.get("features") else ()
        if p.obs_config.image:
            known += (*OPENPI_IMAGE_KEYS, OPENPI_STATE_KEY)
        unknown = [k for k in obs if isinstance(k, str) and k.startswith(FEATURE_PREFIXES) and k not in known]
        if unknown:
            raise ValueError(f"request: names {len(unknown)} observation feature(s) this policy does not "
                             f"have: {_keys(dict.fromkeys(unknown))} (its features: "
                             f"{', '.join(known) or 'none'}; or send {OBS_KEY!r})")
        named = [k for k in known if k in obs]
        if named and OBS_KEY in obs:
            raise ValueError(f"request: sends both {OBS_KEY!r} and the features {', '.join(named)}; "
                             "send one of them")
        return bool(named) and bool(p.meta.get("features"))

    def check(self, obs) -> tuple[np.ndarray, int | None, int | None]:
        """The observation history, action count and advance of a request, or a ValueError naming
        the field."""
        if not isinstance(obs, dict):
            raise ValueError(f"request: expected a dict with key {OBS_KEY!r}, got {type(obs).__name__}")
        obs = self.decode(obs)
        if OBS_KEY not in obs:
            raise ValueError(f"request: missing key {OBS_KEY!r} (keys: {_keys(obs)})")
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
            raise ValueError(f"{N_ACTIONS_KEY}: {_show(n)} is not an integer in 1..{self.policy.max_actions}")
        advance = obs.get(ADVANCE_KEY)
        if advance is not None and (isinstance(advance, bool) or not isinstance(advance, (int, np.integer))
                                    or advance < 0):
            raise ValueError(f"{ADVANCE_KEY}: {_show(advance)} is not a non-negative integer")
        return x, None if n is None else int(n), None if advance is None else int(advance)

    def image_history(self, obs: dict) -> np.ndarray:
        """The flat observation history [n_obs, obs_dim] of an openpi-style image request."""
        p = self.policy
        n = p.cfg.n_obs_steps
        parts = [self._steps(obs, OPENPI_STATE_KEY, (p.encoder.low_dim,), n).astype(np.float32)]
        for key in OPENPI_IMAGE_KEYS[: len(p.obs_config.image_keys)]:
            parts.append(self._frames(obs, key, n, p.obs_config.size).reshape(n, -1).astype(np.float32))
        return np.concatenate(parts, axis=1)

    @staticmethod
    def _steps(obs: dict, key: str, shape: tuple, n: int) -> np.ndarray:
        """`obs[key]`, a float array, as [n, *shape]: one step repeated n times, or n steps as they are."""
        if key not in obs:
            raise ValueError(f"request: missing key {key!r} (keys: {_keys(obs)})")
        x = obs[key]
        if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
            raise ValueError(f"{key}: expected a float array, got {getattr(x, 'dtype', type(x).__name__)}")
        x = np.repeat(x[None], n, axis=0) if x.ndim == len(shape) else x
        if x.ndim != len(shape) + 1 or len(x) != n or x.shape[1:] != shape:
            raise ValueError(f"{key}: shape {obs[key].shape}, expected {list(shape)} "
                             f"or [{n}, *{list(shape)}]")
        return x

    @staticmethod
    def _frames(obs: dict, key: str, n: int, size: int) -> np.ndarray:
        """`obs[key]`, uint8 [H, W, 3] or [n, H, W, 3], as [n, size, size, 3]: checked from its shape
        first (size caps included), resized if it is not the policy's size (a single frame once),
        then a single frame repeated n times."""
        if key not in obs:
            raise ValueError(f"request: missing key {key!r} (keys: {_keys(obs)})")
        x = obs[key]
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
            raise ValueError(f"{key}: expected a uint8 array, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim not in (3, 4) or x.shape[-1] != 3 or (x.ndim == 4 and len(x) != n):
            raise ValueError(f"{key}: shape {x.shape}, expected uint8 [H, W, 3] (or [{n}, H, W, 3])")
        check_image_size(key, x)
        frames = x[None] if x.ndim == 3 else x
        if frames.shape[1:3] != (size, size):
            frames = resize(frames, size)
        return np.repeat(frames, n, axis=0) if x.ndim == 3 else frames

    def check_committed(self, obs: dict) -> tuple[np.ndarray | None, int]:
        """Real-Time Chunking's fields of a request: the actions the robot will execute while this
        plan runs (float [m, action_dim]) and how many of them are frozen; absent: a free plan."""
        committed, frozen = obs.get(COMMITTED_KEY), obs.get(FROZEN_KEY)
        if committed is None:
            if frozen is not None:  # a client that meant RTC and lost its prefix: not a free plan
                raise ValueError(f"{FROZEN_KEY}: given without {COMMITTED_KEY}")
            return None, 0
        if not isinstance(committed, np.ndarray) or committed.dtype.kind != "f":
            raise ValueError(f"{COMMITTED_KEY}: expected a float array [m, {self.policy.action_dim}]")
        frozen = 0 if frozen is None else frozen
        if isinstance(frozen, bool) or not isinstance(frozen, (int, np.integer)):
            raise ValueError(f"{FROZEN_KEY}: {_show(frozen)} is not an integer")
        return committed, int(frozen)

    def infer(self, obs, warm: WarmStart | None = None) -> dict:
        """Plan for one request; `warm` is the connection's own warm-start state (its noise comes
        from the server's one generator, seeded at the start)."""
        x, n, advance = self.check(obs)
        committed, frozen = self.check_committed(obs)
        start = time.perf_counter()
        with self.lock:
            waited = time.perf_counter() - start
            session = PlanSession(self.policy.generator, warm if warm is not None else WarmStart())
            r = self.policy.plan(x, n, advance, committed, frozen, session=session)
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
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _health(connection, request):
    """`GET /healthz` answers 200; any other path goes on to the websocket handshake."""
    if request.path == "/healthz":
        return connection.respond(HTTPStatus.OK, "OK\n")
    return None


def _parse(message) -> dict:
    """A binary msgpack frame as the request it holds, or a ValueError saying why it is not one."""
    if isinstance(message, str):
        raise ValueError("request: a text frame; send the observation as binary msgpack")
    try:
        return wire.unpackb(message)
    except wire.WireError as err:
        raise ValueError(f"request: {err}") from None
    except Exception as err:
        raise ValueError(f"request: not msgpack ({type(err).__name__})") from None


async def _send(ws, reply: dict | str, t0: float, decode_ms: float | None) -> bool:
    """Send a plan (binary msgpack, with the server's timing since `t0`) or an error (a text frame:
    openpi-client raises it as RuntimeError); False when the client left mid-request."""
    from websockets.exceptions import ConnectionClosed

    try:
        if isinstance(reply, dict):
            reply["server_timing"]["infer_ms"] = (time.perf_counter() - t0) * 1e3
            if decode_ms is not None:
                reply["server_timing"]["decode_ms"] = decode_ms
            await ws.send(wire.packb(reply))
        else:
            await ws.send(reply)
    except ConnectionClosed:
        return False
    return True


_CLOSED = object()  # a request that ends its connection: the client left, or the server stops


class _Connections:
    """The server's side of every connection: requests read in turn, images decoded in the shared
    queue (`decoder`, one request at a time), plans run in a worker thread, replies sent."""

    def __init__(self, service: PolicyService):
        self.service = service
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="dp-serve-decode")
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Drop the queued requests: called before the handlers are awaited."""
        self.stopping.set()
        self.decoder.shutdown(wait=False, cancel_futures=True)

    def _decode(self, ws, obs: dict) -> dict | None:
        from websockets.protocol import State

        if ws.protocol.state is not State.OPEN:  # the client left while its request waited
            return None
        return self.service.decode(obs)

    async def _request(self, ws, message, t0: float) -> tuple[dict | object, float | None]:
        """A message as a request (its images decoded in the queue) and the ms to decode them
        (None without images); `_CLOSED` when the connection is over meanwhile."""
        obs = _parse(message)
        if not self.service.needs_decoding(obs):
            return obs, None
        self.service.check_images(obs)  # from the shapes, before the queue and any pixel
        try:
            obs = await asyncio.wrap_future(self.decoder.submit(self._decode, ws, obs))
        except asyncio.CancelledError:
            if self.stopping.is_set():  # the server stops: queued requests are dropped
                return _CLOSED, None
            raise
        if obs is None:
            return _CLOSED, None
        return obs, (time.perf_counter() - t0) * 1e3

    async def handler(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        warm = WarmStart()  # this connection's plans only
        await ws.send(wire.packb(self.service.metadata()))
        while True:
            try:
                message = await ws.recv()
            except ConnectionClosed:
                return
            t0 = time.perf_counter()
            decode_ms = None
            try:
                obs, decode_ms = await self._request(ws, message, t0)
                if obs is _CLOSED:
                    return
                reply = await asyncio.to_thread(self.service.infer, obs, warm)
            except ValueError as err:
                reply = one_line(str(err))
            except Exception as err:  # a failure of the policy itself: reported, the server lives on
                reply = one_line(f"server: {type(err).__name__}: {err}")
            if not await _send(ws, reply, t0, decode_ms):
                return


def _listening(server, bound: list | None, announce: bool) -> None:
    address = server.sockets[0].getsockname()[:2]
    if bound is not None:
        bound.append(address)
    if announce:
        print(f"dp-serve: listening on ws://{address[0]}:{address[1]} "
              f"(health: http://{address[0]}:{address[1]}/healthz)", flush=True)


async def serve(service: PolicyService, host: str, port: int, max_message_mb: float = 8.0,
                ready: threading.Event | None = None, stop: asyncio.Event | None = None,
                bound: list | None = None, announce: bool = False) -> None:
    """Serve until `stop` is set (forever without one). `bound` receives the (host, port) bound
    (port=0 picks a free one); `announce` prints it as `dp-serve: listening on ws://HOST:PORT`.

    Images are resized in a queue of their own, one request at a time in arrival order: each
    connection waits for its reply before its next request is read, so it has at most one request
    in that queue, and a client sending costly frames delays another by at most one of its
    requests (bounded by the size caps, `check_image_size`). Requests without images do not enter
    it. Plans run in worker threads, one at a time (`PolicyService.lock`)."""
    from websockets.asyncio.server import serve as ws_serve

    connections = _Connections(service)
    try:
        async with ws_serve(connections.handler, host, port, compression=None,
                            max_size=int(max_message_mb * 2**20), process_request=_health) as server:
            _listening(server, bound, announce)
            if ready is not None:
                ready.set()
            try:
                await (stop.wait() if stop is not None else asyncio.Future())
            finally:
                connections.stop()
    finally:
        connections.decoder.shutdown(wait=False, cancel_futures=True)


@command("serve", ServeConfig)
def main(cfg: ServeConfig) -> None:
    check_options(cfg)  # before the imports and the checkpoint: a mistyped number fails at once
    import torch

    import policy as policy_pkg

    torch.set_num_threads(cfg.threads)
    pol = policy_pkg.load(cfg.checkpoint, device=cfg.device)
    from policy.samplers.spec import on_command_backend

    pol.sampler = on_command_backend(cfg.sampler)
    pol.seed(cfg.seed)
    service = PolicyService(pol)
    check_message_size(cfg.max_message_mb, service)
    # window=auto chosen (or read from the cache), runtime calls compiled: before the first request
    entry = pol.prepare()
    if entry is not None:
        print(f"dp-serve: window=auto chose {entry['window']} on {entry['machine']}", flush=True)
    print(f"dp-serve: {pol.meta['checkpoint']} with {cfg.sampler.name} on {pol.backend}", flush=True)
    try:
        asyncio.run(serve(service, cfg.host, cfg.port, cfg.max_message_mb, announce=True))
    except OSError as err:
        import errno
        import socket

        from common.errors import UserError

        # A name that does not resolve, or an address that is not this machine's, is the host's
        # fault; a port in use or reserved is the port's.
        if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"host: cannot listen on {cfg.host!r} ({err.strerror or err})") from None
        raise UserError(f"port: cannot listen on {cfg.host}:{cfg.port} ({err.strerror or err})") from None


if __name__ == "__main__":
    main()
