"""How fast an acceleration profile runs and how far it moves the actions: latency measured in one process, rounds
interleaved over the rows (a profile on an execution backend; plain eager rows take turns sequence by sequence) so that
drift of a noisy machine hits every row alike; FLOPs of one inference; actions against the eager `none` row on the
same observations with the same noise seed. What vla-bench tabulates and vla-tune searches with."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from vla_runtime.accel.profiles import Accelerator, Profile
from vla_runtime.execution import CompileStats, ExecConfig
from vla_runtime.hooks import ModelHook, add_hook
from vla_runtime.types import Observation, Policy


class _Timer(ModelHook):
    """Wall time spent inside a module (the action head), summed per inference; `skip(args, kwargs)` leaves
    out the calls that are not the head's (SmolVLA's prefix pass through the same module). Before and after
    the call, not around it: a hook that replaces a forward makes an execution backend compile the module's
    children too."""

    def __init__(self, skip=None):
        self.elapsed_s = 0.0
        self.skip = skip
        self.started: float | None = None

    def pre_forward(self, module, *args, **kwargs):
        self.started = None if self.skip is not None and self.skip(args, kwargs) else time.perf_counter()
        return args, kwargs

    def post_forward(self, module, output):
        if self.started is not None:
            self.elapsed_s += time.perf_counter() - self.started
        return output


def action_head(policy: Policy):
    """The module whose time counts as the action head's: the denoising step or the AR decode loop."""
    structure = policy.structure
    if structure.denoising_head is not None:
        return structure.denoising_head.step
    return structure.ar_decoder.loop if structure.ar_decoder is not None else None


@dataclass(frozen=True)
class Entry:
    """One row of the table: a profile on an execution backend."""

    name: str
    profile: Profile
    execution: ExecConfig


def entries(profiles: list[Profile], backends: list[ExecConfig]) -> list[Entry]:
    """Every profile on every backend; eager rows keep the profile's name, the others get `@<backend>`. The
    baseline, eager `none`, is always there."""
    if not any(execution.changes_nothing for execution in backends):
        backends = [ExecConfig(), *backends]
    rows = []
    for execution in backends:
        plain = execution.changes_nothing
        rows += [Entry(p.name if plain else f"{p.name}@{execution.label}", p, execution) for p in profiles]
    return rows


def measure(accelerator: Accelerator, rows: list[Entry], sequences: list[list[Observation]],
            rounds: int, progress: bool = True) -> dict[str, dict]:
    """Per row: latency and head-time samples (interleaved rounds), FLOPs of one inference (eager: a compiled
    graph computes the same), actions, and for a compiled row its warm-up (compile time, frames compiled)
    apart from latency and the frames compiled during measurement (recompilations; 0 when shapes are
    static). The policy is reset at the start of each sequence only, so methods that carry state from frame
    to frame (visual_kv_reuse) are measured as a control loop would run them."""
    policy = accelerator.policy
    head = action_head(policy)
    denoising = policy.structure.denoising_head
    timer = _Timer(skip=denoising.is_prefix if denoising is not None else None)
    remove_timer = add_hook(head, "bench_timer", timer) if head is not None else (lambda: None)
    runs = {row.name: {"latency_s": [], "head_s": [], "recompiled_frames": 0, "eager_fallbacks": 0} for row in rows}

    def apply(row: Entry, execution: ExecConfig | None = None):
        accelerator.execution = execution if execution is not None else row.execution
        return accelerator.apply(row.profile)

    flops: dict[str, int] = {}  # per profile, counted eager once: every backend computes the same
    try:
        for row in tqdm(rows, desc="actions, FLOPs, warm-up", unit="row", disable=not progress):
            if row.profile.name not in flops:
                apply(row, ExecConfig())
                try:
                    policy.reset()
                    with FlopCounterMode(display=False) as counter:
                        for obs in sequences[0]:
                            policy.predict_chunk(obs)
                    flops[row.profile.name] = counter.get_total_flops()
                finally:
                    accelerator.remove()
            handle = apply(row)
            try:
                actions = []
                frames, started = CompileStats.frames(), time.perf_counter()
                for sequence in sequences:  # for a compiled row, its warm-up: compiles every shape it meets
                    policy.reset()
                    actions += [policy.predict_chunk(obs).actions for obs in sequence]
                units = handle.execution.info["compiled_units"] if handle.execution else []
                runs[row.name].update(actions=np.stack(actions), flops=flops[row.profile.name],
                                      methods=handle.stats(), backend=row.execution.label, compiled_units=units,
                                      warm_up_s=time.perf_counter() - started,
                                      warm_up_frames=CompileStats.frames() - frames)
            finally:
                accelerator.remove()
        blocks = [block for round_index in range(rounds) for block in _latency_round(rows, len(sequences), round_index)]
        for row, indices in tqdm(blocks, desc="latency (interleaved)", unit="block", disable=not progress):
            apply(row)
            frames, fallbacks = CompileStats.frames(), CompileStats.fallbacks()
            try:
                for index in indices:
                    policy.reset()
                    for obs in sequences[index]:
                        timer.elapsed_s = 0.0
                        started = time.perf_counter()
                        policy.predict_chunk(obs)
                        runs[row.name]["latency_s"].append(time.perf_counter() - started)
                        runs[row.name]["head_s"].append(timer.elapsed_s)
            finally:
                accelerator.remove()
            runs[row.name]["recompiled_frames"] += CompileStats.frames() - frames
            runs[row.name]["eager_fallbacks"] += CompileStats.fallbacks() - fallbacks
    finally:
        remove_timer()
        accelerator.execution = None
    return runs


def _latency_round(rows: list[Entry], n_sequences: int, round_index: int) -> list[tuple[Entry, list[int]]]:
    """One latency round as (row, sequence indices) blocks. Plain eager rows take turns sequence by sequence (applying
    a profile's hooks is cheap), the first row rotating every sequence and round; rows on another backend or dtype,
    which compile, capture or cast weights when applied, run all sequences at a time after them, their first row
    rotating every round. With every row's sequences in one block an empty profile measured 0.94x-0.97x against
    `none`, sequence by sequence 0.99x-1.01x (benchmarks/latency_interleaving)."""

    def rotated(group: list[Entry], start: int) -> list[Entry]:
        start %= max(len(group), 1)
        return group[start:] + group[:start]

    plain = [row for row in rows if row.execution.changes_nothing]
    applied = [row for row in rows if not row.execution.changes_nothing]
    blocks = [(row, [index]) for index in range(n_sequences) for row in rotated(plain, round_index + index)]
    return blocks + [(row, list(range(n_sequences))) for row in rotated(applied, round_index)]


def summarize_runs(runs: dict[str, dict], has_head: bool) -> dict[str, dict]:
    base = runs["none"]
    base_p50 = float(np.median(base["latency_s"]))
    base_head = float(np.median(base["head_s"])) if has_head else None
    action_variance = float(base["actions"].reshape(-1, base["actions"].shape[-1]).var(0).mean())
    table = {}
    for name, run in runs.items():
        p50, p95 = (1000 * float(np.percentile(run["latency_s"], q)) for q in (50, 95))
        mse = float(np.mean((run["actions"] - base["actions"]) ** 2))
        head_p50 = float(np.median(run["head_s"])) if has_head else None
        table[name] = {
            "latency_ms_p50": p50, "latency_ms_p95": p95, "speedup": base_p50 * 1000 / p50,
            "head_ms_p50": 1000 * head_p50 if has_head else None,
            "head_speedup": base_head / head_p50 if has_head and head_p50 > 0 else None,
            "flops": run["flops"], "flops_ratio": run["flops"] / base["flops"],
            "action_mse": mse, "action_mse_rel_variance": mse / action_variance if action_variance else None,
            "actions_identical": bool(np.array_equal(run["actions"], base["actions"])),
            "methods": run["methods"], "latency_samples": len(run["latency_s"]), "backend": run["backend"],
            "compiled_units": run["compiled_units"], "warm_up_s": run["warm_up_s"],
            "warm_up_frames": run["warm_up_frames"], "recompiled_frames": run["recompiled_frames"],
            "eager_fallbacks": run["eager_fallbacks"],
        }
    return table
