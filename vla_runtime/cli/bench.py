"""vla-bench: what each acceleration profile buys (latency, FLOPs) and costs (action deviation, success): every
profile on every backend (`exec=[eager,compile]`) measured against eager `none` in one run
(`evaluation/speed.py`), then, with `with_success=true`, the same episodes under each, compared paired."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from vla_runtime.accel.profiles import Accelerator, load_profiles
from vla_runtime.cli.build import accel_spec, realtime_spec, tolerance
from vla_runtime.cli.common import (
    UsageError,
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
from vla_runtime.evaluation.speed import Entry, action_head, entries, measure, summarize_runs
from vla_runtime.execution import exec_config
from vla_runtime.plugins import did_you_mean
from vla_runtime.sim.suite import Suite

REALTIME_LATENCY = ("recorded", "runtime")


def recorded_latencies(runs: dict[str, dict], directory: Path) -> dict[str, str]:
    """Each row's latency samples from the interleaved measurement, as files the recorded latency model reads."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, run in runs.items():
        paths[name] = str(directory / f"{name}.json")
        write_json(Path(paths[name]), {"latency_samples_ms": [1000 * s for s in run["latency_s"]]})
    return paths


def success_runs(cfg: DictConfig, sim: Suite, factory, policy_name: str, rows: list[Entry],
                 tasks: list[str], calibration_dir: str, latencies: dict[str, str]) -> dict[str, dict]:
    """Each row's episodes in every success mode; realtime with the row's own `latencies` (recorded) unless
    `realtime_latency=runtime` leaves the latency to `runtime.latency_model`."""
    out: dict[str, dict] = {row.name: {} for row in rows}
    for row in rows:
        accel = accel_spec(row.profile, cfg, policy_name, tasks, calibration_dir, row.execution)
        for mode in cfg.success_modes:
            runtime = OmegaConf.merge(cfg.runtime, {"mode": mode})
            if mode == "realtime" and cfg.realtime_latency == "recorded":
                runtime = OmegaConf.merge(runtime, {"latency_model": "recorded",
                                                    "recorded_latencies": latencies[row.name]})
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
        header += ["misses (realtime)", "jump / jerk (realtime)"]
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
            loop = row["success"]["realtime"]["control_loop"]
            jump, jerk = loop["boundary_jump_mean"], loop["jerk_mean"]
            cells += [f"{100 * loop['miss_rate']:.1f} %",
                      f"{jump:.3f} / {jerk:.4f}" if jump is not None and jerk is not None else "-"]
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
    if "realtime" in modes:
        latency = ("each profile's own latency samples from the measurement above, one drawn per call "
                   "(`latency_model=recorded`, the files in `latency/`)" if bench["realtime_latency"] == "recorded"
                   else f"`runtime.latency_model={bench['runtime']['latency_model']}`")
        lines += ["", f"Realtime: latency in the loop at the suite's control rate, {latency}; the runtime's "
                  "defaults otherwise. Misses: ticks without an action once the first chunk arrived. Jump: the mean "
                  "L2 step between the last action of a chunk and the first of the next; jerk: the mean L2 second "
                  "difference of consecutive executed actions (grippers left out)."]
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
    if cfg.realtime_latency not in REALTIME_LATENCY:
        raise UsageError(f"realtime_latency must be one of {', '.join(REALTIME_LATENCY)}, got '{cfg.realtime_latency}'"
                         f"{did_you_mean(str(cfg.realtime_latency), REALTIME_LATENCY)}")
    unknown = sorted(set(cfg.success_modes) - {"sync", "realtime"})
    if unknown:
        raise UsageError(f"success_modes: unknown {unknown}; choose from sync, realtime")
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
        latencies = recorded_latencies(runs, output_dir / "latency")
        for name, success in success_runs(cfg, sim, factory, policy_name, rows, tasks, calibration_dir,
                                          latencies).items():
            table[name]["success"] = success
        add_paired_deltas(table, list(cfg.success_modes), tolerance(cfg))
    bench = {"command": command, "policy": policy_name, "sim": cfg.sim.name + (f" ({sim.label})" if sim.label else ""),
             "tasks": tasks,
             "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
             "num_threads": torch.get_num_threads(), "rounds": cfg.rounds,
             "latency_samples_per_profile": cfg.rounds * sum(len(s) for s in sequences),
             "backends": [b.label for b in backends],
             "with_success": bool(cfg.with_success), "success_modes": list(cfg.success_modes),
             "realtime_latency": cfg.realtime_latency, "runtime": as_dict(cfg.runtime),
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
