"""The real-time control loop: a fixed rate that does not wait for the planner.

At every control step the loop reads the robot's observation and sends the action scheduled for
that step, while the next chunk is planned in the background (a thread running the policy in this
process, or a request to `dp-serve`). When a chunk arrives, its actions for steps that passed
during planning are skipped and overlaps with the previous chunk are merged (`rollouts.chunks`).
What it records per episode:

- `jitter_ms`: how late the loop woke for each step (scheduled start to wake-up);
- `overruns`: steps whose deadline (the end of the step) passed before the loop sent the step's
  command, including steps the loop woke up too late for altogether;
- `no_fresh`: steps with no action to send (the robot held its pose);
- `skipped`: planned actions dropped because their step had passed when the chunk arrived;
- `refused`: plans the policy refused for non-finite actions (`policy.safety`): the loop holds
  (it goes on with what it has scheduled, then sends nothing) and asks again at the next step;
- `staleness_ms`: for each executed action, its execution time minus the time of the
  observation it was planned from (a synchronous runner executing 8 of a chunk's actions would
  show 0-350 ms at 20 Hz even with an instant planner);
- per plan: the step it was requested and arrived at, the round trip, the server's plan time.

    from rollouts.realtime import LoopConfig, LocalPlanner, run_loop
    stats = run_loop(robot, LocalPlanner(policy), LoopConfig(merge="act"), until=lambda: robot.done)
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from common.errors import UserError
from policy.safety import UnsafeActions
from rollouts.chunks import MERGES, ActionSchedule

LOOP_MERGES = (*MERGES, "rtc")  # rtc: latest, with each plan inpainted to agree with what runs meanwhile

TRANSPORTS = ("server", "local")


@dataclass
class LoopConfig:
    rate_hz: float | None = None  # wall-clock control rate (default: the task's 20 Hz)
    merge: str = "latest"  # latest | average | act: how overlapping chunks are merged; rtc: the next plan
    #                        is inpainted to agree with the actions executing while it runs
    #                        (samplers/inpaint.py)
    merge_alpha: float = 0.5  # average: the newer chunk's weight
    act_m: float = 0.01  # act: ACT's exponential weight decay per chunk of age
    replan_every: int | None = None  # steps between plan requests (default: the policy's n_action_steps)
    n_actions: int | None = None  # actions asked of each plan (default: the rest of the chunk, 15 of 16)
    transport: str = "server"  # server: dp-serve in its own process over loopback; local: a thread here
    extra_delay_ms: float = 0.0  # latency added to every plan on purpose (success against delay)

    MAX_RATE_HZ = 1000.0  # a step of 1 ms; at 1e9 Hz the loop "catches up" a step per nanosecond: a hang
    MAX_DELAY_MS = 60_000.0  # a minute of added latency a plan; any more and no episode sees a second plan

    def plan_sizes(self, max_actions: int, n_action_steps: int) -> tuple[int, int]:
        """(actions asked of each plan, control steps between plan requests) for a planner that
        returns at most `max_actions` and executes `n_action_steps` of a chunk."""
        return min(self.n_actions or max_actions, max_actions), self.replan_every or n_action_steps

    def check(self) -> None:
        """Every setting a number of its kind, finite and in range, or a one-line `UserError`
        naming the key (`nan` passes every `<` test: it must be refused as such). Called at
        start-up by every command that takes a loop, and by `run_loop`."""
        import math

        from common.checks import check_number

        def number(key: str, low: float, high: float, low_open: bool = False, integer: bool = False) -> None:
            check_number(f"loop.{key}", getattr(self, key), low, high, integer=integer, low_open=low_open)

        if self.merge not in LOOP_MERGES:
            raise UserError(f"loop.merge: {self.merge!r} is not one of {', '.join(LOOP_MERGES)}")
        if self.transport not in TRANSPORTS:
            raise UserError(f"loop.transport: {self.transport!r} is not one of {', '.join(TRANSPORTS)}")
        if self.rate_hz is not None:
            number("rate_hz", 0.0, self.MAX_RATE_HZ, low_open=True)
        number("merge_alpha", 0.0, 1.0, low_open=True)
        number("act_m", 0.0, math.inf)
        number("extra_delay_ms", 0.0, self.MAX_DELAY_MS)
        for key in ("replan_every", "n_actions"):
            if getattr(self, key) is not None:
                number(key, 1, math.inf, integer=True)


class Planner(Protocol):
    n_obs_steps: int
    n_action_steps: int
    max_actions: int

    def plan(self, obs_history: np.ndarray, n_actions: int, advance: int | None = None,
             committed: np.ndarray | None = None, frozen: int = 0) -> tuple[np.ndarray, dict]:
        """An action chunk [n_actions, action_dim] from the current step on, and the plan's stats
        (`model_evals`, `parallel_iters`, `converged`, `plan_ms`); `advance` is the number of
        control steps since the episode's previous plan (None: the episode's first), which a
        warm-started sampler needs; `committed` the actions executing from the current step on
        while it plans, the first `frozen` of them kept exactly (Real-Time Chunking)."""
        ...


class LocalPlanner:
    """The policy in this process (plans run in the loop's background thread)."""

    def __init__(self, policy, session=None):
        # the plan state this planner's episodes carry (`policy.warm.PlanSession`); by default the
        # policy's own, so `policy.seed` seeds it as it seeds `policy.plan`
        self.policy, self.session = policy, policy.session if session is None else session
        # window=auto chosen, runtime calls compiled: before the loop's first plan, not during it
        policy.prepare()
        self.n_obs_steps, self.n_action_steps = policy.cfg.n_obs_steps, policy.cfg.n_action_steps
        self.max_actions = policy.max_actions

    @property
    def backend(self) -> str:
        """Where the policy's denoiser calls run (backend=auto resolved)."""
        return self.policy.backend

    def seed(self, seed: int) -> None:
        self.session.reseed(seed, self.policy.device)

    def plan(self, obs_history: np.ndarray, n_actions: int, advance: int | None = None,
             committed: np.ndarray | None = None, frozen: int = 0) -> tuple[np.ndarray, dict]:
        r = self.policy.plan(obs_history, n_actions, advance, committed, frozen, session=self.session)
        return r.actions, {"plan_ms": r.latency_ms, "model_evals": r.model_evals,
                           "parallel_iters": r.parallel_iters, "converged": r.converged}


class RemotePlanner:
    """A `dp-serve` server, through `rollouts.client.PolicyClient`."""

    def __init__(self, client):
        self.client = client
        meta = client.metadata
        self.n_obs_steps, self.n_action_steps = meta["obs_shape"][0], meta["n_action_steps"]
        self.max_actions = meta["max_actions"]
        self.backend = meta.get("backend", "?")  # as the server resolved it

    def plan(self, obs_history: np.ndarray, n_actions: int, advance: int | None = None,
             committed: np.ndarray | None = None, frozen: int = 0) -> tuple[np.ndarray, dict]:
        request = {self.client.metadata["obs_key"]: np.asarray(obs_history, np.float32),
                   "n_actions": n_actions}
        if advance is not None:
            request["advance"] = advance
        if committed is not None:
            request["committed"], request["frozen"] = np.asarray(committed, np.float32), int(frozen)
        reply = self.client.infer(request)
        return reply["actions"], reply["policy_timing"]


@dataclass
class LoopStats:
    period_s: float = 0.0
    steps: int = 0  # control steps the loop ran
    commanded: int = 0  # steps sent an action
    no_fresh: int = 0  # steps with no action to send
    overruns: int = 0  # steps whose command went out after the step's end (or never)
    skipped: int = 0  # planned actions dropped: their step had passed when the chunk arrived
    refused: int = 0  # plans refused for non-finite actions (the loop held)
    refusal: str | None = None  # the first refusal's reason
    jitter_ms: list[float] = field(default_factory=list)
    staleness_ms: list[float] = field(default_factory=list)
    plans: list[dict] = field(default_factory=list)


class LoopState:
    """One run of the loop: its schedule and stats, the observation history, the plan in flight
    and the control step `k`. Creating it plans the first chunk (the robot waits for it, standing
    still) and starts the clock when it arrives; `run_loop` then runs each step through
    `catch_up`, the robot's read, `collect`, `request_plan` and `send`, and `finish`es."""

    def __init__(self, robot, planner: Planner, cfg: LoopConfig, clock: Callable[[], float],
                 sleep: Callable[[float], None]):
        self.robot, self.planner, self.cfg, self.clock, self.sleep = robot, planner, cfg, clock, sleep
        self.period = robot.period
        self.n_actions, self.replan = cfg.plan_sizes(planner.max_actions, planner.n_action_steps)
        merge = "latest" if cfg.merge == "rtc" else cfg.merge
        self.schedule = ActionSchedule(merge, cfg.merge_alpha, cfg.act_m)
        self.stats = LoopStats(period_s=self.period)
        _, obs = robot.read()
        self.history = deque([obs] * planner.n_obs_steps, maxlen=planner.n_obs_steps)
        first = self.timed(np.stack(self.history), None)
        self.t0 = clock()
        self.schedule.add(first[0], 0, 0, self.t0)  # nothing moved while it was planned: current at t0
        self.record(0, 0, 0, first)
        self.pending: Future | None = None
        self.request = (0, self.t0)  # step and observation time of the plan in flight (or of the last one)
        self.retry = False  # the last plan was refused: ask again at once
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="planner")
        self.k = 0

    def timed(self, obs_history: np.ndarray, advance: int | None, committed: np.ndarray | None = None,
              frozen: int = 0) -> tuple[np.ndarray, dict, float]:
        """A plan, its stats and its round trip in ms (run in the background thread after the first)."""
        start = self.clock()
        actions, info = self.planner.plan(obs_history, self.n_actions, advance, committed, frozen)
        if self.cfg.extra_delay_ms:  # the chunk arrives this much later, as from a slower computer
            self.sleep(self.cfg.extra_delay_ms / 1e3)
        return actions, info, (self.clock() - start) * 1e3

    def record(self, step: int, arrived: int, skipped: int, result: tuple[np.ndarray, dict, float]) -> None:
        _, info, round_trip = result
        self.stats.plans.append({"step": step, "arrived": arrived, "skipped": skipped,
                                 "latency_ms": round_trip, "plan_ms": float(info.get("plan_ms", round_trip)),
                                 "model_evals": int(info.get("model_evals", 0)),
                                 "parallel_iters": int(info.get("parallel_iters", 0)),
                                 "converged": bool(info.get("converged", True))})

    def catch_up(self) -> float:
        """Sleep until step k starts. Whole steps the loop woke up too late for are passed over
        (the robot held through them: overruns without a fresh action); returns the start of the
        step the loop is now at."""
        stats = self.stats
        t_k = self.t0 + self.k * self.period
        now = self.clock()
        while now < t_k:
            self.sleep(t_k - now)
            now = self.clock()
        late = int((now - self.t0) // self.period) - self.k
        for j in range(self.k, self.k + max(late, 0)):
            self.schedule.pop(j)  # their actions are gone
        if late > 0:
            stats.overruns += late
            stats.no_fresh += late
            stats.steps += late
            self.k += late
            t_k = self.t0 + self.k * self.period
        stats.jitter_ms.append((now - t_k) * 1e3)
        return t_k

    def collect(self) -> None:
        """Schedule the plan in flight if it has arrived (or count its refusal)."""
        if self.pending is None or not self.pending.done():
            return
        try:
            result = self.pending.result()
        except UnsafeActions as err:  # nothing of it is sent; the next request goes out now
            self.stats.refused += 1
            self.stats.refusal = self.stats.refusal or str(err)
            self.retry = True
        else:
            step, t_obs = self.request
            skipped = self.schedule.add(result[0], step, self.k, t_obs)
            self.stats.skipped += skipped
            self.record(step, self.k, skipped, result)
        self.pending = None

    def request_plan(self, t_obs: float) -> None:
        """Ask for the next plan, from the observation read at `t_obs`, when it is due and none is
        in flight."""
        k = self.k
        if self.pending is not None or not (self.retry or k - self.request[0] >= self.replan):
            return
        committed, frozen = None, 0
        if self.cfg.merge == "rtc":  # what runs while this plan does: keep it, frozen for the expected delay
            committed = self.schedule.upcoming(k, self.planner.max_actions)
            last_ms = self.stats.plans[-1]["latency_ms"] if self.stats.plans else 0.0
            frozen = min(len(committed), int(np.ceil(last_ms / 1e3 / self.period)))
            committed = committed if len(committed) else None
        advance = k - self.request[0]
        self.pending = self.pool.submit(self.timed, np.stack(self.history), advance, committed, frozen)
        self.request, self.retry = (k, t_obs), False

    def send(self, t_k: float) -> None:
        """Send step k's action (or hold, with none) and move on to the next step."""
        stats = self.stats
        item = self.schedule.pop(self.k)
        if item is None:
            stats.no_fresh += 1
        else:
            self.robot.send(item.action, t_k)
            stats.commanded += 1
            sent = self.clock()
            stats.staleness_ms.append((sent - item.t_obs) * 1e3)
            stats.overruns += sent > t_k + self.period
        stats.steps += 1
        self.k += 1

    def finish(self) -> None:
        """Finish the plan in flight before the next episode needs the cores (its error is dropped)."""
        if self.pending is not None:
            try:
                self.pending.result()
            except Exception:
                pass
        self.pool.shutdown(wait=True)


def run_loop(robot, planner: Planner, cfg: LoopConfig, until: Callable[[], bool] | None = None,
             max_steps: int | None = None, clock: Callable[[], float] = time.perf_counter,
             sleep: Callable[[float], None] = time.sleep) -> LoopStats:
    """Drive `robot` at its period from `planner`'s chunks until `until()` or `max_steps`.

    The robot waits, standing still, for its first chunk; the clock starts when it arrives. A
    planner error ends the loop by raising it (after the background plan in flight is finished),
    except a plan refused for non-finite actions after the first: the loop then holds and asks again.
    """
    cfg.check()
    loop = LoopState(robot, planner, cfg, clock, sleep)
    try:
        while max_steps is None or loop.k < max_steps:
            t_k = loop.catch_up()
            t_obs, obs = robot.read()
            if until is not None and until():
                break
            loop.history.append(obs)
            loop.collect()
            loop.request_plan(t_obs)
            loop.send(t_k)
    finally:
        loop.finish()
    return loop.stats


def loop_summary(stats: LoopStats) -> dict:
    """The per-episode record of a loop: counts and the raw per-step values (0.1 ms)."""
    return {"period_ms": stats.period_s * 1e3, "steps": stats.steps, "commanded": stats.commanded,
            "no_fresh": stats.no_fresh, "overruns": stats.overruns, "skipped": stats.skipped,
            "refused": stats.refused,
            "jitter_ms": [round(v, 1) for v in stats.jitter_ms],
            "staleness_ms": [round(v, 1) for v in stats.staleness_ms]}


def run_realtime_episode(robot, planner: Planner, seed: int, cfg: LoopConfig):
    """One episode of a `SimRobot` from `reset(seed)` until success or the task's horizon, driven
    by the real-time loop. Returns the runner's `EpisodeResult` (its plans with the real-time
    fields) and the loop's stats."""
    from rollouts.runner import EpisodeResult

    robot.reset(seed)
    if hasattr(planner, "seed"):  # an in-process policy's noise follows the episode seed (a server's cannot)
        planner.seed(seed)
    try:
        stats = run_loop(robot, planner, cfg, until=lambda: robot.done)
        error = robot.error or (f"planner: {stats.refused} plans refused, the robot held ({stats.refusal})"
                                if stats.refused else None)
    except Exception as err:  # a planner or server failure ends the episode; recorded with its reason
        stats, error = LoopStats(period_s=robot.period), f"planner: {type(err).__name__}: {err}"
    result = EpisodeResult(seed=seed, success=robot.success, max_reward=robot.max_reward,
                           return_=robot.return_, length=robot.steps, plans=stats.plans, error=error)
    return result, stats
