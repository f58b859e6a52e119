"""Real-time chunking (RTC; Black et al. 2025) for flow-matching action heads: inference-time, training-free.

While a chunk is computed the robot keeps executing the current one. The next chunk is therefore generated as
an inpainting of what will still run: at each denoising step the velocity is corrected by guidance that pulls
the chunk's predicted end point towards the previous chunk's actions, weighted per position by a soft mask —
1 for the first `delay` actions (they execute before the new chunk arrives), decaying over the rest of the
overlap (exponentially by default), 0 beyond it (nothing to follow there: never a zero-padded target, which
would pull the actions towards the dataset mean). The correction is a vector-Jacobian product through one
denoising step (autograd), clipped at `max_guidance` (RTC's beta).

Where it lives: the control loop (`runtime.chunking=rtc`) puts the current chunk's leftover and the delay in
ticks on each request (`Observation.prefix`, a `ChunkPrefix`); `RealTimeChunking` wraps the policy and guides
its denoising head's step (the `denoising_head` hook point, outermost of the step's hooks, so that head caching
and the other methods run inside the guided, differentiated step). The delay comes from `DelayEstimator`: the
p95 of recent latencies in ticks, the first calls (warm-up: lazy initialisation, compilation) left out.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from vla_runtime.hooks import ModelHook, add_hook
from vla_runtime.types import ActionChunk, Observation, Policy

SCHEDULES = ("exp", "linear", "ones", "zeros")


@dataclass(frozen=True)
class RTCConfig:
    max_guidance: float = 5.0  # beta: the guidance weight's cap (RTC's default); 0: unguided
    schedule: str = "exp"  # weights of the overlap after the `delay` frozen actions

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown RTC schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        if not self.max_guidance >= 0:
            raise ValueError(f"rtc.max_guidance must be >= 0, got {self.max_guidance}")


def prefix_weights(overlap: int, delay: int, horizon: int, schedule: str = "exp") -> np.ndarray:
    """Guidance weight per chunk position [horizon]: 1 for the first `delay`, then the schedule over the rest of
    the `overlap` (RTC's exponential decay: c (e^c - 1) / (e - 1), c = (overlap - i) / (overlap - delay + 1)),
    0 from `overlap` on."""
    overlap = min(overlap, horizon)
    delay = min(delay, overlap)
    weights = np.zeros(horizon, dtype=np.float32)
    weights[:delay] = 1.0
    decay = (overlap - np.arange(delay, overlap)) / (overlap - delay + 1)
    weights[delay:overlap] = {"exp": decay * np.expm1(decay) / (math.e - 1), "linear": decay,
                              "ones": np.ones_like(decay), "zeros": np.zeros_like(decay)}[schedule]
    return weights


def guidance_weight(tau: float, max_guidance: float) -> float:
    """RTC's weight of the guidance at flow time tau: min(beta, (1 - tau) / (tau r^2)), r^2 = (1 - tau)^2 /
    (tau^2 + (1 - tau)^2); infinite (so beta) at tau = 0 and 1, 2 at tau = 1/2."""
    if tau <= 0 or tau >= 1:
        return max_guidance
    return min(max_guidance, (tau ** 2 + (1 - tau) ** 2) / (tau * (1 - tau)))


class GuidedStep(ModelHook):
    """On the denoising step (forward(noisy, t, cognition) -> velocity): the velocity plus the RTC guidance
    towards `target` [B, H, A] with `weights` [H], while a target is set."""

    calls_through = True

    def __init__(self, config: RTCConfig):
        self.config = config
        self.target: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None

    def new_forward(self, module, call_next, noisy, t, cognition):
        if self.target is None or self.config.max_guidance == 0:
            return call_next(noisy, t, cognition)
        tau = float(t.reshape(-1)[0])
        # The policy runs in inference mode, whose tensors autograd cannot save: fresh copies, gradients on.
        with torch.inference_mode(False), torch.enable_grad():
            x = noisy.detach().clone().requires_grad_(True)
            velocity = call_next(x, t.clone(), cognition.clone())
            estimate = x + (1 - tau) * velocity  # where the Euler loop would end from here
            error = (self.target.to(estimate) - estimate) * self.weights.to(estimate)[None, :, None]
            (gradient,) = torch.autograd.grad(estimate, x, error)
        return (velocity + guidance_weight(tau, self.config.max_guidance) * gradient).detach()


class RealTimeChunking:
    """`policy` with RTC: a request whose observation carries a `ChunkPrefix` is guided towards it, and the
    returned chunk's first `delay` actions are the prefix's own (what the robot executes meanwhile). Requests
    without one run unguided. `remove()` takes the guidance off the policy."""

    def __init__(self, policy: Policy, config: RTCConfig | None = None):
        head = policy.structure.require("denoising_head", "runtime.chunking=rtc")
        if head.actions_in is None or head.is_prefix is not None or head.step_index is not None:
            raise ValueError("runtime.chunking=rtc needs a flow-matching head stepped as x <- x + v / steps from "
                             "t = 0 with `DenoisingHead.actions_in` declared; this policy's head does not declare "
                             "it (use runtime.chunking=naive)")
        self.policy = policy
        self.head = head
        self.spec = policy.spec
        self.structure = policy.structure
        self.config = config or RTCConfig()
        self.hook = GuidedStep(self.config)
        self._remove = add_hook(head.step, "rtc", self.hook, outermost=True)

    def reset(self) -> None:
        self.policy.reset()

    def remove(self) -> None:
        self._remove()

    def predict_chunk(self, obs: Observation) -> ActionChunk:
        prefix = obs.prefix
        if prefix is None:
            return self.policy.predict_chunk(obs)
        horizon = self.spec.chunk_size
        if prefix.delay >= horizon:
            raise ValueError(f"RTC delay of {prefix.delay} ticks >= the chunk's {horizon} actions: no action of the "
                             "new chunk would ever run; use a longer chunk or a faster policy")
        overlap = min(len(prefix.actions), horizon)
        target = torch.zeros(1, horizon, self.spec.action_dim)
        target[0, :overlap] = torch.as_tensor(self.head.actions_in(np.asarray(prefix.actions[:overlap])))
        self.hook.target = target
        self.hook.weights = torch.from_numpy(prefix_weights(overlap, prefix.delay, horizon, self.config.schedule))
        try:  # the guidance follows the prefix; a policy trained for RTC is not also given it
            chunk = self.policy.predict_chunk(dataclasses.replace(obs, prefix=None))
        finally:
            self.hook.target = None
        frozen = min(prefix.delay, overlap)
        actions = np.array(chunk.actions, dtype=np.float32)
        actions[:frozen] = prefix.actions[:frozen]
        return ActionChunk(actions, chunk.t0, chunk.dt, {**chunk.info, "rtc": {"delay": prefix.delay,
                                                                               "overlap": overlap}})


def chunked(policy: Policy, chunking: str, config: RTCConfig) -> Policy:
    """`policy` as `runtime.chunking` (resolved: naive, rtc or rtc_trained) runs it: rtc wraps it in
    `RealTimeChunking`; rtc_trained takes it as it is, once it declares that it was trained for it."""
    if chunking == "rtc":
        return RealTimeChunking(policy, config)
    if chunking == "rtc_trained" and not policy.spec.rtc_max_delay:
        raise ValueError("runtime.chunking=rtc_trained needs a policy trained for real-time chunking (one that "
                         "declares PolicySpec.rtc_max_delay, e.g. vla-train model.rtc_max_delay=N); this one is not: "
                         "use runtime.chunking=naive, rtc or auto")
    return policy


class DelayEstimator:
    """The delay d in control ticks for the next request: the p95 of the last `window` latencies, rounded up,
    the first `warmup_calls` latencies left out (a first call that compiles or loads would freeze a whole
    chunk). Persists across episodes: warm-up is the process's, not each episode's."""

    def __init__(self, period_s: float, warmup_calls: int = 1, window: int = 20):
        if warmup_calls < 0 or window < 1:
            raise ValueError("DelayEstimator needs warmup_calls >= 0 and window >= 1")
        self.period_s = period_s
        self.warmup_calls = warmup_calls
        self.window = window
        self.calls = 0
        self.latencies_s: list[float] = []

    def observe(self, latency_s: float) -> None:
        self.calls += 1
        if self.calls > self.warmup_calls:
            self.latencies_s = [*self.latencies_s[-(self.window - 1):], latency_s]

    def ticks(self) -> int:
        """0 until a latency after the warm-up was seen."""
        if not self.latencies_s:
            return 0
        return math.ceil(float(np.percentile(self.latencies_s, 95)) / self.period_s - 1e-9)


class FixedDelay:
    """A delay known in advance, in place of a `DelayEstimator` (vla-replay's `latency_ticks`)."""

    def __init__(self, ticks: int):
        self._ticks = ticks
        self.latencies_s: list[float] = []  # none measured

    def observe(self, latency_s: float) -> None:
        pass

    def ticks(self) -> int:
        return self._ticks
