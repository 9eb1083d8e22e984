"""Where the denoiser's calls, and an image policy's encoder when it plans, run: eager torch, or
OpenVINO built from the same weights in memory.

A 4.5 M-parameter 1-D UNet at one row is mostly framework overhead in eager torch: on a 2-core
x86-64 CPU a one-row call ran at ~15 GFLOP/s where batched calls reach ~200. OpenVINO, given the
network's graph once, runs the same arithmetic with a fraction of that overhead. Measured here
(2026-12-04, shipped lift UNet, 2 threads, median of 40 calls): one row 1.23 ms against eager
torch's 3.05 ms, 16 rows 6.1 against 11.4, 100 rows 29.0 against 31.5; ONNX Runtime and
torch.compile were measured too and lost at 16 and 100 rows (DESIGN.md), so OpenVINO is the one
runtime here. Its noise estimates agree with torch's to ~5e-7 (relative to their largest value).

- `torch`: the network as it is (`policy.denoiser`: precision, CUDA graphs).
- `openvino`: the network converted once (`openvino.convert_model`, no file) and compiled for
  the CPU per input shape on its first use (~0.16 s; a model of static shape ran 1.1-1.4x faster
  than one of dynamic batch). Rebuilt when the weights change. fp32 only; CPU only. A call that
  needs a gradient (the aligner's training, RTC guidance's one VJP per step) runs on torch, as
  the runtime has no autograd.
  An image policy's observation encoder runs there too when it plans (eval mode, no gradient:
  its centre-crop path, `policy.vision.PlanningEncoder`), once per plan; training runs torch.
- `auto`: torch on CUDA (its captured graphs) or where OpenVINO is not installed; on a CPU the
  faster of the two at the rows the sampler's calls have (1 for a sequential sampler, the window
  for ParaDiGMS), measured once per machine, threads, checkpoint and rows, and cached with
  `window=auto`'s measurements (`policy.autowindow`).
"""

from __future__ import annotations

import json
import time
import warnings
from contextlib import contextmanager

import numpy as np
import torch

from common.errors import UserError
from policy.samplers.spec import check_backend as check  # noqa: F401 (also named here)
from policy.samplers.spec import installed, runtime_runs



def check_device(backend: str | None, device: torch.device) -> None:
    if backend == "openvino" and device.type != "cpu":
        raise UserError(f"sampler.backend: openvino runs on the CPU; this policy is on {device} "
                        "(backend=auto or torch)")


class OpenVinoNetwork:
    """`out = net(*inputs)` by OpenVINO on the CPU, built from `net`'s weights as they are now: a
    module of float tensors in (the batch first, compiled per input shape) and one tensor out
    (the denoiser's `eps = net(x, t, cond)`, the image encoder's planning path)."""

    def __init__(self, net: torch.nn.Module, example: tuple[torch.Tensor, ...], threads: int,
                 snippets: bool = True):
        import openvino as ov

        shapes = [ov.PartialShape([-1, *e.shape[1:]]) for e in example]
        with torch.no_grad(), warnings.catch_warnings():
            # the converter traces with torch.jit, whose deprecation and tracer notices are not the user's
            warnings.simplefilter("ignore")
            self.model = ov.convert_model(net, example_input=example, input=shapes)
        self.core, self.threads, self.snippets = ov.Core(), threads, snippets
        # input shapes -> (infer request, its input views, output view)
        self.requests: dict[tuple, tuple] = {}

    def _request(self, shapes: tuple):
        """The infer request of a model of these input shapes, and torch views of its input and
        output memory: a call copies into and out of them, without OpenVINO's per-call dispatch of
        Python inputs (~0.15 ms, an eighth of a one-row call)."""
        if shapes not in self.requests:
            model = self.model.clone()
            model.reshape({port: list(s) for port, s in zip(model.inputs, shapes)})
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads,
                      "INFERENCE_PRECISION_HINT": "f32",
                      **({} if self.snippets else {"SNIPPETS_MODE": "DISABLE"})}
            try:
                compiled = self.core.compile_model(model, "CPU", config)
            except RuntimeError:
                # OpenVINO 2026.4's fused subgraphs ("snippets") fail to compile some small networks
                # at one thread ("Supported precisions set is not available for Mish"); without them
                # it compiles, at up to 2x the time per call on the shipped networks, so only then.
                compiled = self.core.compile_model(model, "CPU", {**config, "SNIPPETS_MODE": "DISABLE"})
            request = compiled.create_infer_request()
            inputs = [torch.from_numpy(request.get_input_tensor(i).data) for i in range(len(shapes))]
            self.requests[shapes] = (request, inputs, torch.from_numpy(request.get_output_tensor(0).data))
        return self.requests[shapes]

    def compile(self, *shapes: tuple) -> None:
        """Compile now for calls of these input shapes, rather than on their first call (~0.16 s each)."""
        self._request(tuple(tuple(s) for s in shapes))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        request, views, out = self._request(tuple(tuple(a.shape) for a in inputs))
        for view, a in zip(views, inputs):
            view.copy_(a.detach())
        request.infer()
        return out.clone()  # the request's output memory is overwritten by its next call


def weights_state(params: list[torch.nn.Parameter]) -> tuple[int, int]:
    """Where the weights are and how often they were changed in place: what a copy made from them
    (a runtime's network, a 16-bit copy, CUDA graphs) must be made again for when it changes."""
    return params[0].data_ptr(), sum(p._version for p in params)


class Runtime:
    """`module(*inputs)` by the runtime (OpenVINO), following `module`'s weights: converted again
    when they change in place (an optimizer step, `load_state_dict`: the parameters' versions),
    move (`.to()` there and back: new memory), or when torch's thread count changes. The inputs
    are float tensors, the batch first; no autograd (the caller runs torch when it needs one).
    `snippets=False` compiles without OpenVINO's fused subgraphs: 2026.4's CPU plugin crashes the
    process (SIGSEGV, nothing to catch) compiling the image encoder's ResNet (two GroupNorm blocks
    in a row) once reshaped from a dynamic batch to a static one; without them it compiles, and its
    calls were no slower (measured on zoo/lift_image, 2026-12-05)."""

    def __init__(self, module: torch.nn.Module, snippets: bool = True):
        self.module, self.snippets = module, snippets
        self._params = list(module.parameters())  # listed once: walking the modules costs ~0.2 ms a call
        self._built: tuple | None = None  # (weights and threads it was built for, the runtime's network)
        self._plan: dict | None = None  # while a plan runs (`planning`): its threads and the network it calls

    def network(self, example: tuple[torch.Tensor, ...], threads: int | None = None) -> OpenVinoNetwork:
        """The runtime's network for the weights as they are now (built from `example` inputs if
        they changed), running on `threads` (default: torch's)."""
        threads = torch.get_num_threads() if threads is None else threads
        state = (*weights_state(self._params), threads)
        if self._built is None or self._built[0] != state:
            example = tuple(a[:1].detach().float() for a in example)
            self._built = (state, OpenVinoNetwork(self.module, example, threads, self.snippets))
        return self._built[1]

    @contextmanager
    def planning(self):
        """One plan's span. Its calls check the weights once (~0.05-0.1 ms a call otherwise; they
        do not change inside a plan) and torch's own arithmetic around them (the sampler's steps,
        sums and mixing) runs on one thread: after an op torch's idle OpenMP workers spin for a
        while, and on 2 cores they took the runtime's: a 16-row call inside ParaDiGMS's loop ran at
        5.5 ms against 3.7 alone, 4.2 with torch on one thread (measured 2026-12-04). These tensors
        are too small for a second thread to help them."""
        threads = torch.get_num_threads()
        self._plan = {"threads": threads, "net": None}
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            self._plan = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self._plan is None:
            return self.network(inputs)(*inputs)
        if self._plan["net"] is None:
            self._plan["net"] = self.network(inputs, self._plan["threads"])
        return self._plan["net"](*inputs)


def typical_rows(policy, cfg) -> int:
    """The rows of most denoiser calls of sampler `cfg`: the most its plans use (`call_rows`: 1 in
    a sequential chain, the window in ParaDiGMS, 16 while `window=auto` has not chosen, a block's
    steps in PIADM)."""
    from policy.samplers import call_rows, resolve

    options = resolve(cfg)[1]
    if options.get("window") == "auto":
        options["window"] = 16
    return max(call_rows(cfg, options, policy.cfg.schedule.num_train_timesteps))


def choose(policy, cfg) -> dict:
    """For `backend=auto`: the backend this device runs `cfg`'s calls fastest on, as cached or
    measured now: {"backend", "rows", "ms": {name: median ms of one call}}."""
    from policy import autowindow

    # only torch runs 16-bit weights and CUDA graphs: auto never trades what was asked for speed
    if (policy.device.type != "cpu" or not installed("openvino")
            or not runtime_runs(cfg.precision, cfg.capture)):
        return {"backend": "torch", "rows": None, "ms": {}}
    rows = typical_rows(policy, cfg)
    key = choice_key(policy, rows)
    entry = autowindow.lookup(key, valid_choice)
    if entry is None:
        ms = {name: call_ms(policy, name, rows) for name in ("torch", "openvino")}
        entry = {"backend": min(ms, key=ms.get), "rows": rows, "ms": ms}
        autowindow.store(key, entry)
    return entry


def choice_key(policy, rows: int) -> str:
    """The cache key of `choose`'s measurement: calls of `rows` rows, this device, threads and weights."""
    from policy import autowindow
    from policy.device import machine

    return json.dumps({"backend-auto": rows, "device": machine(policy.device),
                       "threads": torch.get_num_threads(), "weights": autowindow.weights_hash(policy)},
                      sort_keys=True)


def valid_choice(entry) -> bool:
    """`entry` is what `choose` measures: a backend it can choose, the rows, and each backend's
    finite time (a cached "bogus" is measured again, not blamed on the user's sampler.backend)."""
    from policy.autowindow import is_count, is_number

    ms = entry.get("ms") if isinstance(entry, dict) else None
    return (isinstance(ms, dict) and entry.get("backend") in ("torch", "openvino")
            and is_count(entry.get("rows")) and set(ms) == {"torch", "openvino"}
            and all(is_number(v) and v >= 0 for v in ms.values()))


def call_ms(policy, backend: str, rows: int, reps: int = 15) -> float:
    """Median wall time (ms) of one denoiser call of `rows` rows on `backend`."""
    den = policy.denoiser_for(backend)
    g = torch.Generator(policy.device).manual_seed(0)
    x = torch.randn((rows, policy.cfg.horizon, policy.action_dim), generator=g)
    cond = torch.randn((rows, policy.cond_dim), generator=g)
    t = torch.linspace(0, policy.cfg.schedule.num_train_timesteps - 1, rows)
    times = []
    with torch.no_grad():
        for i in range(reps + 3):
            start = time.perf_counter()
            den(x, t, cond)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))
