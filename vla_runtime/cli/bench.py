"""vla-bench: what each acceleration profile buys (latency, FLOPs) and costs (action deviation, success).

Latency is measured in one process, rounds interleaved over the profiles (the starting profile rotates
every round) so that drift of a noisy machine hits every profile alike; speedups are ratios of
medians within this run. Action deviation is against the `none` profile on the same observations with
the same noise seed.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from vla_runtime.accel.profiles import Accelerator, Profile, load_profiles
from vla_runtime.cli import CONFIG_PATH
from vla_runtime.cli.common import (
    as_dict,
    command_line,
    friendly_errors,
    policy_factory,
    positive_int,
    suite,
    task_list,
    write_json,
)
from vla_runtime.cli.eval import realtime_options, worker_accel
from vla_runtime.hooks import ModelHook, add_hook
from vla_runtime.sim.metrics import summarize, wilson_interval
from vla_runtime.sim.observations import MEASUREMENT_SEEDS, calibration_source, expert_sequences
from vla_runtime.sim.runner import evaluate
from vla_runtime.sim.suite import Suite
from vla_runtime.types import Observation, Policy


class _Timer(ModelHook):
    """Wall time spent inside a module (the action head), summed per inference; `skip(args, kwargs)` leaves
    out the calls that are not the head's (SmolVLA's prefix pass through the same module)."""

    def __init__(self, skip=None):
        self.elapsed_s = 0.0
        self.skip = skip

    def new_forward(self, module, call_next, *args, **kwargs):
        if self.skip is not None and self.skip(args, kwargs):
            return call_next(*args, **kwargs)
        started = time.perf_counter()
        try:
            return call_next(*args, **kwargs)
        finally:
            self.elapsed_s += time.perf_counter() - started


def action_head(policy: Policy):
    """The module whose time counts as the action head's: the denoising step or the AR decode loop."""
    structure = policy.structure
    if structure.denoising_head is not None:
        return structure.denoising_head.step
    return structure.ar_decoder.loop if structure.ar_decoder is not None else None


def measure(accelerator: Accelerator, profiles: list[Profile], sequences: list[list[Observation]],
            rounds: int) -> dict[str, dict]:
    """Per profile: latency and head-time samples (interleaved rounds), FLOPs of one inference, actions.
    The policy is reset at the start of each sequence only, so methods that carry state from frame to
    frame (visual_kv_reuse) are measured as a control loop would run them."""
    policy = accelerator.policy
    head = action_head(policy)
    denoising = policy.structure.denoising_head
    timer = _Timer(skip=denoising.is_prefix if denoising is not None else None)
    remove_timer = add_hook(head, "bench_timer", timer) if head is not None else (lambda: None)
    runs = {p.name: {"latency_s": [], "head_s": []} for p in profiles}
    try:
        for profile in tqdm(profiles, desc="actions and FLOPs", unit="profile"):
            handle = accelerator.apply(profile)
            try:
                actions = []
                for sequence in sequences:
                    policy.reset()
                    actions += [policy.predict_chunk(obs).actions for obs in sequence]
                policy.reset()
                with FlopCounterMode(display=False) as flops:
                    for obs in sequences[0]:
                        policy.predict_chunk(obs)
                runs[profile.name].update(actions=np.stack(actions), flops=flops.get_total_flops(),
                                          methods=handle.stats())
            finally:
                accelerator.remove()
        bar = tqdm(total=rounds * len(profiles), desc="latency (interleaved)", unit="profile-round")
        for round_index in range(rounds):
            start = round_index % len(profiles)
            for profile in profiles[start:] + profiles[:start]:
                accelerator.apply(profile)
                try:
                    for sequence in sequences:
                        policy.reset()
                        for obs in sequence:
                            timer.elapsed_s = 0.0
                            started = time.perf_counter()
                            policy.predict_chunk(obs)
                            runs[profile.name]["latency_s"].append(time.perf_counter() - started)
                            runs[profile.name]["head_s"].append(timer.elapsed_s)
                finally:
                    accelerator.remove()
                bar.update()
        bar.close()
    finally:
        remove_timer()
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
            "methods": run["methods"], "latency_samples": len(run["latency_s"]),
        }
    return table


def success_runs(cfg: DictConfig, sim: Suite, factory, policy_name: str, profiles: list[Profile],
                 tasks: list[str], calibration_dir: str) -> dict[str, dict]:
    out: dict[str, dict] = {p.name: {} for p in profiles}
    for profile in profiles:
        accel = worker_accel(profile, cfg, policy_name, tasks, calibration_dir)
        for mode in cfg.success_modes:
            runtime = OmegaConf.merge(cfg.runtime, {"mode": mode})
            print(f"success: {profile.name}, {mode}")
            episodes = evaluate(factory, sim, tasks,
                                positive_int(cfg, "episodes_per_task"), workers=positive_int(cfg, "workers"),
                                realtime=realtime_options(runtime), accel=accel, policy_name=policy_name)
            summary = summarize(episodes, tasks)
            successes = sum(task["successes"] for task in summary["per_task"].values())
            out[profile.name][mode] = {
                "success_rate": summary["success_rate"], "ci95": list(wilson_interval(successes, len(episodes))),
                "episodes": len(episodes), "policy_calls": summary["policy_calls"],
                "latency_ms": summary["latency_ms"], "control_loop": summary["control_loop"],
                "per_task": {task: row["success_rate"] for task, row in summary["per_task"].items()}}
    return out


def markdown_table(bench: dict) -> str:
    modes = bench["success_modes"] if bench["with_success"] else []
    header = ["profile", "methods", "p50 ms", "p95 ms", "speedup", "head speedup", "FLOPs", "action MSE / var"]
    header += [f"success ({mode})" for mode in modes]
    if "realtime" in modes:
        header.append("policy calls (realtime)")
    lines = [f"## vla-bench: {bench['policy']} on {bench['sim']} ({bench['device']})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in bench["profiles"].items():
        head = f"{row['head_speedup']:.2f}x" if row["head_speedup"] else "-"
        cells = [f"`{name}`", ", ".join(row["methods"]) or "-", f"{row['latency_ms_p50']:.1f}",
                 f"{row['latency_ms_p95']:.1f}", f"**{row['speedup']:.2f}x**", head,
                 f"{100 * row['flops_ratio']:.0f} %",
                 "identical" if row["actions_identical"] else f"{row['action_mse_rel_variance']:.4f}"]
        for mode in modes:
            result = row["success"][mode]
            low, high = result["ci95"]
            cells.append(f"{100 * result['success_rate']:.1f} % [{100 * low:.0f}, {100 * high:.0f}]")
        if "realtime" in modes:
            cells.append(str(row["success"]["realtime"]["policy_calls"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Latency: {bench['latency_samples_per_profile']} inferences per profile, {bench['rounds']} "
              f"interleaved rounds, {bench['num_threads']} torch threads; consecutive frames of expert episodes "
              "(4 steps apart), the policy reset per sequence. FLOPs: torch.utils.flop_counter over one "
              "sequence, relative to `none`. Action MSE over the measurement observations, relative to the "
              "variance of the baseline's actions.", "", f"Command: `{bench['command']}`", ""]
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
            ys = [100 * row["success"][mode]["success_rate"] for row in rows.values()]
            ax.scatter(xs, ys, marker=marker, label=f"success, {mode}")
            for name, x, y in zip(rows, xs, ys, strict=True):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_ylabel(f"success on {len(bench['tasks'])} tasks (%)")
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
    runs = measure(accelerator, profiles, sequences, positive_int(cfg, "rounds"))
    table = summarize_runs(runs, action_head(policy) is not None)
    if cfg.with_success:
        # The workers find the artifacts calibrated above in the same directory.
        calibration_dir = str(accelerator.calibration_dir)
        for name, success in success_runs(cfg, sim, factory, policy_name, profiles, tasks, calibration_dir).items():
            table[name]["success"] = success
    bench = {"command": command, "policy": policy_name, "sim": cfg.sim.name + (f" ({sim.label})" if sim.label else ""),
             "tasks": tasks,
             "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
             "num_threads": torch.get_num_threads(), "rounds": cfg.rounds,
             "latency_samples_per_profile": cfg.rounds * sum(len(s) for s in sequences),
             "with_success": bool(cfg.with_success), "success_modes": list(cfg.success_modes),
             "episodes_per_task": cfg.episodes_per_task if cfg.with_success else None,
             "profile_methods": {p.name: p.methods for p in profiles}, "profiles": table}
    write_json(output_dir / "bench.json", bench)
    (output_dir / "bench.md").write_text(markdown_table(bench))
    plot(bench, output_dir / "pareto.png")
    print(markdown_table(bench))
    print(f"results: {output_dir / 'bench.json'}, plot: {output_dir / 'pareto.png'}")
    return bench


@hydra.main(config_path=CONFIG_PATH, config_name="bench", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    run(cfg, command_line("vla-bench"))


if __name__ == "__main__":
    main()
