"""How the samplers' denoiser calls run: the network's precision and whether a call replays a
captured CUDA graph.

Every sampler calls `eps = denoiser(x, t, cond)`. On a GPU a 4.5 M-parameter 1-D UNet at a
small batch is launch-bound: each eager call launches ~100 kernels from Python. A CUDA graph
captured once per input shape replays all of them as one launch. It needs fixed shapes, which is
why ParaDiGMS pads its rounds to a full window (`sampler.capture=pad`, implied by `graph`): every
round of a plan then has the same [B * window] rows.

- `precision`: `fp32`, or `bf16`/`fp16`: a 16-bit copy of the network's weights, inputs cast to
  it, the noise estimate cast back to float32. The chain's arithmetic (the samplers' steps, sums
  and acceptance tests) stays in float32.
- `capture`: `none` (eager), `pad` (ParaDiGMS rounds padded to the window, eager calls; exact
  against `none` on the CPU, the same rows plus masked ones) or `graph` (padded, and each input
  shape's call captured as a CUDA graph on its first use; CUDA only). `auto`: `graph` on CUDA,
  `none` on the CPU, where padding only adds rows and graphs do not exist.

Hand-written over `torch.cuda.CUDAGraph` rather than `torch.compile(mode="reduce-overhead")`:
the same single-launch replay, without a compiler on the robot's computer or a minute of
compilation in a six-minute device check; `torch.cuda.make_graphed_callables` targets training
(it builds a backward graph too).
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from common.errors import UserError
from policy import backends
from policy.samplers.spec import check_backend
from policy.samplers.spec import check_runtime as check
from policy.device import sync
from policy.network import SinusoidalStepEmbedding

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_capture(capture: str | None, device: torch.device) -> str:
    """`auto` (or None) becomes `graph` on CUDA and `none` elsewhere; `graph` off CUDA is refused."""
    capture = capture or "auto"
    if capture == "auto":
        return "graph" if device.type == "cuda" else "none"
    if capture == "graph" and device.type != "cuda":
        raise UserError(f"sampler.capture: graph needs a CUDA device (this policy is on {device}); "
                        "none or pad run anywhere")
    return capture


class Denoiser:
    """`eps = denoiser(x, t, cond)` over a policy's network, at a precision, eager or replaying a
    CUDA graph per input shape. The 16-bit copy and the graphs follow the network's weights: an
    in-place update (an optimizer step, `load_state_dict`) bumps the parameters' versions and
    the copy is made again; weights that moved (`.to()` there and back) are new memory, and the
    graphs, which read the weights where they were captured, are captured again."""

    def __init__(self, net: torch.nn.Module, precision: str = "fp32", capture: str = "none",
                 device: torch.device | None = None, backend: str = "torch"):
        check(capture, precision)
        check_backend(backend, precision, capture)
        self.net, self.precision, self.capture, self.backend = net, precision, capture, backend
        self.device = device if device is not None else next(net.parameters()).device
        if capture == "graph" and self.device.type != "cuda":
            resolve_capture(capture, self.device)
        self.timed: float | None = None  # seconds spent in calls, counted when set to a number (dp-bench);
        #                                  each counted call waits for the device
        self.dtype = PRECISIONS[precision]
        self._copy: torch.nn.Module | None = None
        # (where the weights are, their versions) the copy and graphs were made for
        self._weights: tuple | None = None
        self._graphs: dict[tuple, tuple] = {}  # input shapes -> (graph, static x, t, cond, eps)
        self._pool = None
        self._runtime = backends.Runtime(net)  # the network on `backend`'s runtime, built on first use
        self._params = list(net.parameters())  # listed once: walking the modules on every call costs ~0.2 ms

    def compile(self, rows: list[int], horizon: int, action_dim: int, cond_dim: int) -> None:
        """On a runtime: compile now the calls of these row counts (~0.16 s each on their first
        use otherwise, which in a control loop is a missed deadline). Nothing on torch."""
        if self.backend == "torch":
            return
        shapes = [((r, horizon, action_dim), (r,), (r, cond_dim)) for r in rows]
        example = tuple(torch.zeros(s, device=self.device) for s in shapes[0])
        net = self._runtime.network(example)
        for s in shapes:
            net.compile(*s)

    def planning(self):
        """The span of one plan's calls: on a runtime, its weights checked once and torch's own
        arithmetic on one thread (`backends.Runtime.planning`); nothing on torch."""
        return self._runtime.planning() if self.backend != "torch" else contextlib.nullcontext()

    @property
    def pad(self) -> bool:
        """Whether ParaDiGMS should pad its rounds to a full window (fixed shapes)."""
        return self.capture in ("pad", "graph")

    def _network(self) -> torch.nn.Module:
        if self.dtype is None and self.capture != "graph":
            return self.net  # nothing made from the weights to keep up to date
        # where the weights are (graphs read them there), and for a 16-bit copy their versions too
        ptr, version = backends.weights_state(self._params)
        weights = (ptr, 0 if self.dtype is None else version)
        if weights != self._weights:
            self._weights, self._copy = weights, None
            self._graphs.clear()
        if self.dtype is None:
            return self.net
        if self._copy is None:
            self._copy = copy.deepcopy(self.net).to(self.dtype).eval()
            # step features stay float32: a 16-bit angle of t = 99 is off by ~0.4 rad
            for m in self._copy.modules():
                if isinstance(m, SinusoidalStepEmbedding):
                    m.freqs = m.freqs.float()
        return self._copy

    def _eager(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
               cond: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return net(x, t, cond)
        return net(x.to(self.dtype), t, cond.to(self.dtype)).float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.timed is None:
            return self._call(x, t, cond)
        sync(self.device)
        start = time.perf_counter()
        out = self._call(x, t, cond)
        sync(self.device)
        self.timed += time.perf_counter() - start
        return out

    def _call(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.backend != "torch" and not torch.is_grad_enabled():  # a runtime has no autograd
            return self._runtime(x, t.expand(x.shape[0]), cond)  # a scalar t: one per row
        net = self._network()
        if self.capture != "graph" or torch.is_grad_enabled():  # the aligner trains t through eager calls
            return self._eager(net, x, t, cond)
        key = (tuple(x.shape), tuple(t.shape), tuple(cond.shape), x.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(net, x, t, cond)
        graph, sx, st, sc, out = entry
        sx.copy_(x)
        st.copy_(t)
        sc.copy_(cond)
        graph.replay()
        return out.clone()  # the next replay overwrites `out`; the caller keeps this round's

    def _capture(self, net, x, t, cond):
        sx, st, sc = x.clone(), t.clone(), cond.clone()
        stream = torch.cuda.Stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):  # warm-up off the capture: cuDNN picks its kernels here
            for _ in range(3):
                self._eager(net, sx, st, sc)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._eager(net, sx, st, sc)
        return graph, sx, st, sc, out
