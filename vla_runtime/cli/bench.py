"""vla-bench: what each acceleration profile buys (latency, FLOPs) and costs (action deviation, success).

Latency is measured in one process, rounds interleaved over the rows (a profile on an execution backend:
`exec=[eager,compile]`; the starting row rotates every round) so that drift of a noisy machine hits every
row alike; speedups are ratios of medians within this run. Action deviation is against the eager `none`
profile on the same observations with the same noise seed.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from vla_runtime.accel.profiles import Accelerator, Profile, load_profiles
from vla_runtime.cli.build import accel_spec, realtime_spec, tolerance
from vla_runtime.cli.common import (
    as_dict,
    command_line,
    hydra_cli,
    policy_factory,
    positive_int,
    suite,
    task_list,
    write_json,
)
from vla_runtime.evaluation.metrics import paired_delta, summarize, wilson_interval
from vla_runtime.evaluation.observations import MEASUREMENT_SEEDS, calibration_source, expert_sequences
from vla_runtime.evaluation.runner import evaluate
from vla_runtime.execution import CompileStats, ExecConfig, exec_config
from vla_runtime.hooks import ModelHook, add_hook
from vla_runtime.sim.suite import Suite
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
            rounds: int) -> dict[str, dict]:
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
        for row in tqdm(rows, desc="actions, FLOPs, warm-up", unit="row"):
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
        bar = tqdm(total=rounds * len(rows), desc="latency (interleaved)", unit="row-round")
        for round_index in range(rounds):
            start = round_index % len(rows)
            for row in rows[start:] + rows[:start]:
                apply(row)
                frames, fallbacks = CompileStats.frames(), CompileStats.fallbacks()
                try:
                    for sequence in sequences:
                        policy.reset()
                        for obs in sequence:
                            timer.elapsed_s = 0.0
                            started = time.perf_counter()
                            policy.predict_chunk(obs)
                            runs[row.name]["latency_s"].append(time.perf_counter() - started)
                            runs[row.name]["head_s"].append(timer.elapsed_s)
                finally:
                    accelerator.remove()
                runs[row.name]["recompiled_frames"] += CompileStats.frames() - frames
                runs[row.name]["eager_fallbacks"] += CompileStats.fallbacks() - fallbacks
                bar.update()
        bar.close()
    finally:
        remove_timer()
        accelerator.execution = None
    return runs


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


def success_runs(cfg: DictConfig, sim: Suite, factory, policy_name: str, rows: list[Entry],
                 tasks: list[str], calibration_dir: str) -> dict[str, dict]:
    out: dict[str, dict] = {row.name: {} for row in rows}
    for row in rows:
        accel = accel_spec(row.profile, cfg, policy_name, tasks, calibration_dir, row.execution)
        for mode in cfg.success_modes:
            runtime = OmegaConf.merge(cfg.runtime, {"mode": mode})
            print(f"success: {row.name}, {mode}")
            episodes = evaluate(factory, sim, tasks,
                                positive_int(cfg, "episodes_per_task"), workers=positive_int(cfg, "workers"),
                                realtime=realtime_spec(runtime, sim), accel=accel, policy_name=policy_name,
                                launcher=cfg.launcher, ray_address=cfg.ray_address)
            summary = summarize(episodes, tasks)
            successes = sum(task["successes"] for task in summary["per_task"].values())
            out[row.name][mode] = {
                "success_rate": summary["success_rate"], "ci95": list(wilson_interval(successes, len(episodes))),
                "episodes": len(episodes), "policy_calls": summary["policy_calls"],
                "latency_ms": summary["latency_ms"], "control_loop": summary["control_loop"],
                "per_task": {task: row["success_rate"] for task, row in summary["per_task"].items()},
                "outcomes": [{"task": e.task, "seed": e.seed, "success": e.success} for e in episodes]}
    return out


def add_paired_deltas(table: dict[str, dict], modes: list[str], tolerance: float) -> None:
    """Each row's success against `none`'s on the same episodes (`paired_vs_none` beside its own rate)."""
    for mode in modes:
        baseline = table["none"]["success"][mode]["outcomes"]
        for row in table.values():
            row["success"][mode]["paired_vs_none"] = paired_delta(baseline, row["success"][mode]["outcomes"]
                                                                  ).to_json(tolerance)


def markdown_table(bench: dict) -> str:
    modes = bench["success_modes"] if bench["with_success"] else []
    header = ["profile", "backend", "methods", "p50 ms", "p95 ms", "speedup", "head speedup", "FLOPs",
              "action MSE / var"]
    for mode in modes:
        header += [f"success ({mode})", f"Δ vs none ({mode}), paired 95 %", "won / lost", "verdict"]
    if "realtime" in modes:
        header.append("policy calls (realtime)")
    lines = [f"## vla-bench: {bench['policy']} on {bench['sim']} ({bench['device']})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in bench["profiles"].items():
        head = f"{row['head_speedup']:.2f}x" if row["head_speedup"] else "-"
        cells = [f"`{name}`", row["backend"], ", ".join(row["methods"]) or "-", f"{row['latency_ms_p50']:.1f}",
                 f"{row['latency_ms_p95']:.1f}", f"**{row['speedup']:.2f}x**", head,
                 f"{100 * row['flops_ratio']:.0f} %",
                 "identical" if row["actions_identical"] else f"{row['action_mse_rel_variance']:.4f}"]
        for mode in modes:
            result = row["success"][mode]
            low, high = result["ci95"]
            paired = result["paired_vs_none"]
            delta_low, delta_high = paired["ci95"]
            cells += [f"{100 * result['success_rate']:.1f} % [{100 * low:.0f}, {100 * high:.0f}]",
                      f"{100 * paired['delta']:+.1f} [{100 * delta_low:+.1f}, {100 * delta_high:+.1f}]",
                      f"{paired['wins']} / {paired['losses']}", paired["verdict"]]
        if "realtime" in modes:
            cells.append(str(row["success"]["realtime"]["policy_calls"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Latency: {bench['latency_samples_per_profile']} inferences per profile, {bench['rounds']} "
              f"interleaved rounds, {bench['num_threads']} torch threads; consecutive frames of expert episodes "
              "(4 steps apart), the policy reset per sequence. FLOPs: torch.utils.flop_counter over one "
              "sequence, relative to `none`. Action MSE over the measurement observations, relative to the "
              "variance of the baseline's actions."]
    if modes:
        tolerance = 100 * bench["tolerance"]
        lines += ["", f"Success: {bench['episodes_per_task']} episodes per task on the eval seeds, the same episodes "
                  "(task, seed) under every profile; its interval is Wilson's. Δ vs none: the difference of paired "
                  "proportions in points with its Wald 95 % interval; won / lost: episodes the profile succeeded "
                  f"in and `none` failed / the other way round. Verdict: `no measurable loss` when the interval's "
                  f"lower end is at or above -{tolerance:g} points, `loss` when its upper end is below it, else "
                  "`inconclusive`."]
    compiled = {name: row for name, row in bench["profiles"].items() if row["compiled_units"]}
    if compiled:
        lines += ["", "Compiled rows, outside the latency: warm-up (the first pass over the measurement frames, "
                  "which compiles) and frames compiled; frames compiled again while latency was measured "
                  "(recompilations) and calls that ran eager at the recompile limit should be 0."]
        lines += [f"- `{name}`: warm-up {row['warm_up_s']:.1f} s, {row['warm_up_frames']} frames; recompiled "
                  f"{row['recompiled_frames']}, ran eager at the recompile limit {row['eager_fallbacks']}; "
                  f"compiled: {', '.join(row['compiled_units'])}" for name, row in compiled.items()]
    lines += ["", f"Command: `{bench['command']}`", ""]
    return "\n".join(lines)


def plot(bench: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = bench["profiles"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if bench["with_success"]:
        for mode, marker in (("sync", "o"), ("realtime", "s")):
            if mode not in bench["success_modes"]:
                continue
            xs = [row["speedup"] for row in rows.values()]
            paired = [row["success"][mode]["paired_vs_none"] for row in rows.values()]
            ys = [100 * p["delta"] for p in paired]
            errors = [[100 * (p["delta"] - p["ci95"][0]) for p in paired], [100 * (p["ci95"][1] - p["delta"])
                                                                             for p in paired]]
            ax.errorbar(xs, ys, yerr=errors, fmt=marker, capsize=3, label=f"{mode} (paired 95 % interval)")
            for name, x, y in zip(rows, xs, ys, strict=True):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(-100 * bench["tolerance"], color="grey", lw=0.8, ls="--", label="tolerance")
        ax.set_ylabel(f"success vs none on the same episodes (points, {len(bench['tasks'])} tasks)")
        ax.legend()
    else:
        xs = [row["speedup"] for row in rows.values()]
        ys = [row["action_mse_rel_variance"] or 0.0 for row in rows.values()]
        ax.scatter(xs, ys)
        for name, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_ylabel("action MSE / action variance")
    ax.set_xlabel("speedup per inference (p50, vs none)")
    ax.set_title(f"{bench['policy']} on {bench['sim']}: speed vs cost of acceleration profiles")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: DictConfig, command: str | None = None) -> dict:
    torch.set_num_threads(positive_int(cfg, "num_threads"))
    sim = suite(cfg)
    tasks = task_list(cfg, sim)
    policy_name, factory = policy_factory(cfg, sim)
    profiles = load_profiles(cfg.accel if isinstance(cfg.accel, str) else as_dict(cfg.accel))
    output_dir = Path(cfg.output_dir)
    policy = factory()
    sim.check_policy(policy, policy_name)
    accelerator = Accelerator(policy, calibration_source(sim, tasks, positive_int(cfg, "calibration_per_task")),
                              cfg.calibration_dir, policy_name)
    for profile in profiles:  # every incompatibility is reported before anything is calibrated or measured
        accelerator.check(profile)
    sequences = expert_sequences(sim, tasks, positive_int(cfg, "measurement_per_task"),
                                 seeds_from=MEASUREMENT_SEEDS, frames=positive_int(cfg, "frames_per_sequence"))
    backends = [exec_config(spec) for spec in (as_dict(cfg.exec) if not isinstance(cfg.exec, str) else [cfg.exec])]
    rows = entries(profiles, backends)
    runs = measure(accelerator, rows, sequences, positive_int(cfg, "rounds"))
    table = summarize_runs(runs, action_head(policy) is not None)
    if cfg.with_success:
        # The workers find the artifacts calibrated above in the same directory.
        calibration_dir = str(accelerator.calibration_dir)
        for name, success in success_runs(cfg, sim, factory, policy_name, rows, tasks, calibration_dir).items():
            table[name]["success"] = success
        add_paired_deltas(table, list(cfg.success_modes), tolerance(cfg))
    bench = {"command": command, "policy": policy_name, "sim": cfg.sim.name + (f" ({sim.label})" if sim.label else ""),
             "tasks": tasks,
             "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
             "num_threads": torch.get_num_threads(), "rounds": cfg.rounds,
             "latency_samples_per_profile": cfg.rounds * sum(len(s) for s in sequences),
             "backends": [b.label for b in backends],
             "with_success": bool(cfg.with_success), "success_modes": list(cfg.success_modes),
             "episodes_per_task": cfg.episodes_per_task if cfg.with_success else None,
             "tolerance": tolerance(cfg),
             "profile_methods": {p.name: p.methods for p in profiles}, "profiles": table}
    write_json(output_dir / "bench.json", bench)
    (output_dir / "bench.md").write_text(markdown_table(bench))
    plot(bench, output_dir / "pareto.png")
    print(markdown_table(bench))
    print(f"results: {output_dir / 'bench.json'}, plot: {output_dir / 'pareto.png'}")
    return bench


@hydra_cli("bench")
def main(cfg: DictConfig) -> None:
    run(cfg, command_line("vla-bench"))


if __name__ == "__main__":
    main()
