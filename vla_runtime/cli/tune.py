"""vla-tune: acceleration settings for a policy, searched instead of guessed (`evaluation/tuning.py`).

Stage 1 measures many candidate profiles open loop (speedup against `none`, action deviation); stage 2 runs the most
faithful that meet the goal in closed loop, paired with `none` on the development seeds, and picks the fastest with no
measurable loss. It writes `tuned.yaml` (a profile: `accel=<output_dir>/tuned.yaml`), the Pareto front as profiles
(`front/`, a budget governor's ladder, most faithful first), `tune.json`, `tune.md` and `pareto.png`, and the commands
that confirm the choice on the reporting seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig
from tqdm.auto import tqdm

from vla_runtime.accel.profiles import Accelerator, Profile, load_profile, profile_names
from vla_runtime.cli.build import accel_spec, tolerance
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
from vla_runtime.evaluation.metrics import paired_delta
from vla_runtime.evaluation.observations import MEASUREMENT_SEEDS, calibration_source, expert_sequences
from vla_runtime.evaluation.runner import evaluate
from vla_runtime.evaluation.tuning import (
    STUDY,
    Candidate,
    Goal,
    candidates,
    finalists,
    measure_profiles,
    pareto_front,
    search,
)
from vla_runtime.execution import exec_config

# What must not change between a run and its resumption.
RUN_IDENTITY = ("policy", "sim", "tasks", "budget_ms", "min_speedup", "exec", "rounds", "measurement_per_task",
                "frames_per_sequence", "num_threads", "seed", "episodes_per_task")


def check_identity(cfg: DictConfig, output_dir: Path) -> None:
    """output_dir/run.json: a resumed tune must be the same search (trials, finalists and workers may change)."""
    identity = {key: as_dict(cfg[key]) if isinstance(cfg[key], DictConfig) else cfg[key] for key in RUN_IDENTITY}
    identity["tasks"] = list(identity["tasks"]) if not isinstance(identity["tasks"], str) else identity["tasks"]
    path = output_dir / "run.json"
    if path.exists():
        changed = [key for key, value in json.loads(path.read_text()).items() if identity.get(key) != value]
        if changed:
            raise UsageError(f"{output_dir} holds a tune run with other {', '.join(changed)}; use another output_dir "
                             "or the same settings")
    write_json(path, identity)


def open_study(output_dir: Path, seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed)  # constrained by each trial's shortfall (tuning.search)
    return optuna.create_study(study_name=STUDY, storage=f"sqlite:///{output_dir / 'study.db'}",
                               directions=["minimize", "maximize"], sampler=sampler, load_if_exists=True)


def closed_loop(cfg: DictConfig, sim, factory, policy_name: str, tasks: list[str], profiles: list[Profile],
                calibration_dir: str, output_dir: Path) -> dict[str, list[dict]]:
    """Each profile (and `none`) on the same episodes; every episode journaled, so a killed run resumes."""
    execution = exec_config(cfg.exec if isinstance(cfg.exec, str) else as_dict(cfg.exec))
    (output_dir / "closed_loop").mkdir(exist_ok=True)
    episodes = {}
    for profile in [Profile("none"), *profiles]:
        print(f"closed loop: {profile.name} {profile.methods or ''}")
        accel = accel_spec(profile, cfg, policy_name, tasks, calibration_dir, execution)
        results = evaluate(factory, sim, tasks, positive_int(cfg, "episodes_per_task"),
                           workers=positive_int(cfg, "workers"), accel=accel, policy_name=policy_name,
                           journal=output_dir / "closed_loop" / f"{profile.name}.jsonl")
        episodes[profile.name] = [{"task": e.task, "seed": e.seed, "success": e.success} for e in results]
    return episodes


def policy_and_suite() -> str:
    """This run's policy and suite as arguments of another command: the groups' choices and what the command line
    set inside them (`policy.path=...`), the evaluation seeds left to the caller."""
    from hydra.core.hydra_config import HydraConfig

    def key(override: str) -> str:
        return override.lstrip("+~").split("=")[0]

    hydra = HydraConfig.get()
    given = [o for o in hydra.overrides.task
             if key(o).split(".")[0] in ("policy", "sim") and not key(o).startswith("sim.eval_seeds")]
    groups = [f"{group}={hydra.runtime.choices[group]}" for group in ("policy", "sim")
              if group not in map(key, given)]
    return " ".join([*groups, *given])


def write_profile(path: Path, candidate: Candidate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = candidate.profile()
    path.write_text(f"# {profile.description}\n" + yaml.safe_dump({"description": profile.description,
                                                                     "methods": profile.methods}, sort_keys=False))


def references(cfg: DictConfig, accelerator: Accelerator) -> list[Profile]:
    """The hand-written profiles whose speed the finalists are measured beside: `references`, or (null) every
    shipped one the policy runs (applies: a setting may not fit its size), other policies' tuned profiles left
    out."""
    if cfg.references is None:
        names = [name for name in profile_names() if name != "none" and not name.startswith("tuned_")]
    else:
        names = [cfg.references] if isinstance(cfg.references, str) else list(cfg.references)
    profiles = []
    for profile in map(load_profile, names):
        try:
            accelerator.apply(profile)
        except ValueError:
            if cfg.references is not None:
                raise
            continue
        finally:
            accelerator.remove()
        profiles.append(profile)
    return profiles


def confirm_commands(cfg: DictConfig, report_start: int, profile_path: Path, calibration_dir: Path) -> list[str]:
    """`none` and the chosen profile on the reporting seeds (from `report_start`, which the search never saw),
    paired, 20 episodes per task."""
    tasks = cfg.tasks if isinstance(cfg.tasks, str) else f"[{','.join(cfg.tasks)}]"
    evaluated = f"vla-eval {policy_and_suite()} tasks={tasks} episodes_per_task=20 sim.eval_seeds.start={report_start}"
    output_dir = cfg.output_dir
    return [f"{evaluated} output_dir={output_dir}/report_none",
            f"{evaluated} accel={profile_path} calibration_dir={calibration_dir} "
            f"compare_to={output_dir}/report_none/results.json output_dir={output_dir}/report_tuned"]


def choose(finalists: list[dict]) -> dict | None:
    """The fastest finalist with no measurable loss that meets the goal as measured again, else the fastest with no
    measurable loss, else the one whose loss is least sure (the highest lower end of its interval; the faster of
    equals)."""
    lossless = [row for row in finalists if row["paired"]["verdict"] == "no measurable loss"]
    meeting = [row for row in lossless if row["shortfall"] <= 0]
    if meeting or lossless:
        return max(meeting or lossless, key=lambda row: row["speedup"])
    return max(finalists, key=lambda row: (round(row["paired"]["ci95"][0], 9), row["speedup"]), default=None)


def markdown(report: dict) -> str:
    lines = [f"## vla-tune: {report['policy']} on {report['sim']}, goal {report['goal']}", "",
             f"Stage 1: {report['trials']} candidates measured open loop against `none` ({report['device']}); "
             f"{len(report['front'])} on the Pareto front of speedup and action deviation:", "",
             "| trial | methods | speedup | p50 ms | action MSE / var | FLOPs | meets goal |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in report["front"]:
        lines.append(f"| {row['trial']} | {methods_text(row['methods'])} | {row['speedup']:.2f}x | "
                     f"{row['latency_ms']:.1f} | {row['action_deviation']:.4f} | {100 * row['flops_ratio']:.0f} % | "
                     f"{'yes' if row['shortfall'] <= 0 else 'no'} |")
    lines += ["", f"Stage 2: finalists spread along the front of the candidates that meet the goal and move actions "
              f"by at most {report['max_deviation']:g} of their variance; their speed measured again with `none` and "
              f"the hand-written profiles, {report['finalist_rounds']} interleaved rounds:", "",
              "| profile | methods | speedup | p50 ms | action MSE / var |", "|---|---|---:|---:|---:|"]
    for row in [*report["references"], *({**row, "name": f"trial {row['trial']}"} for row in report["finalists"])]:
        lines.append(f"| {row['name']} | {methods_text(row['methods'])} | {row['speedup']:.2f}x | "
                     f"{row['latency_ms']:.1f} | {row['action_deviation']:.4f} |")
    lines += ["", f"Closed loop, {report['episodes_per_task']} episodes per task on the development seeds "
              f"({report['seeds']}), each finalist on the same episodes as `none` ({100 * report['none_success']:.1f} "
              "%), compared paired (Wald 95 %):", "",
              "| finalist | speedup | meets goal | success | Δ vs none | won / lost | verdict |",
              "|---|---:|---|---:|---:|---:|---|"]
    for row in report["finalists"]:
        paired = row["paired"]
        lines.append(f"| trial {row['trial']} | {row['speedup']:.2f}x | {'yes' if row['shortfall'] <= 0 else 'no'} | "
                     f"{100 * row['success']:.1f} % | "
                     f"{100 * paired['delta']:+.1f} [{100 * paired['ci95'][0]:+.1f}, {100 * paired['ci95'][1]:+.1f}] | "
                     f"{paired['wins']} / {paired['losses']} | {paired['verdict']} |")
    chosen = report["chosen"]
    lines += ["", f"**Chosen: trial {chosen['trial']}** ({methods_text(chosen['methods'])}), written to "
              f"`{report['profile']}`; {versus_references(chosen, report['references'])}." if chosen else "", "",
              "Confirm on the reporting seeds (never seen by the search):", "", "```bash",
              *report["confirm"], "```", "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def versus_references(chosen: dict, references: list[dict]) -> str:
    faster = [row for row in references if row["speedup"] >= chosen["speedup"]]
    if not references:
        return "no hand-written profile was measured beside it"
    if not faster:
        return f"faster than every hand-written profile measured beside it ({len(references)})"
    return "slower than " + ", ".join(f"`{row['name']}` ({row['speedup']:.2f}x)" for row in faster)


def methods_text(methods: dict[str, dict]) -> str:
    return "; ".join(f"{name} " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in settings.items()) for name, settings in methods.items()) or "-"


def plot(report: dict, found: list[Candidate], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.scatter([c.speedup for c in found], [max(c.action_deviation, 1e-6) for c in found], s=12, c="lightgray",
               label="candidates")
    front = report["front"]
    ax.plot([r["speedup"] for r in front], [max(r["action_deviation"], 1e-6) for r in front], "o-",
            label="Pareto front")
    finalists = report["finalists"]
    ax.scatter([r["speedup"] for r in finalists], [max(r["action_deviation"], 1e-6) for r in finalists], marker="*",
               s=120, c="tab:red", zorder=3, label="finalists (speed measured again)")
    lines = []
    for number, row in enumerate(finalists, 1):
        low, high = row["paired"]["ci95"]
        ax.annotate(str(number), (row["speedup"], max(row["action_deviation"], 1e-6)), textcoords="offset points",
                    xytext=(5, -12), fontsize=8, color="tab:red")
        lines.append(f"{number}: trial {row['trial']}, {row['speedup']:.2f}x, "
                     f"{100 * row['paired']['delta']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")
    if lines:
        ax.text(0.02, 0.98, "finalists, Δ success vs none:\n" + "\n".join(lines), transform=ax.transAxes,
                va="top", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "lightgray"})
    hand_written = report["references"]
    ax.scatter([r["speedup"] for r in hand_written], [max(r["action_deviation"], 1e-6) for r in hand_written],
               marker="x", c="tab:gray", label="hand-written profiles (measured with the finalists)")
    for row in hand_written:
        ax.annotate(row["name"], (row["speedup"], max(row["action_deviation"], 1e-6)), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color="tab:gray")
    goal = report["goal_spec"]
    if goal["min_speedup"] is not None:
        ax.axvline(goal["min_speedup"], color="grey", ls="--", lw=0.8, label="goal")
    ax.set_yscale("log")
    ax.set_xlabel("speedup per inference (p50, vs none, interleaved)")
    ax.set_ylabel("action MSE / variance vs none")
    ax.set_title(f"vla-tune {report['policy']}: finalists annotated with Δ success (points, paired 95 %)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: DictConfig, command: str | None = None) -> dict:
    goal = Goal(cfg.budget_ms, cfg.min_speedup)
    if isinstance(cfg.max_deviation, bool) or not isinstance(cfg.max_deviation, int | float) or cfg.max_deviation < 0:
        raise UsageError(f"max_deviation must be a share of the actions' variance, >= 0 (0.01: 1 %), got "
                         f"{cfg.max_deviation!r}")
    tolerance_share = tolerance(cfg)
    torch.set_num_threads(positive_int(cfg, "num_threads"))
    sim = suite(cfg)
    tasks = task_list(cfg, sim)
    policy_name, factory = policy_factory(cfg, sim)
    execution = exec_config(cfg.exec if isinstance(cfg.exec, str) else as_dict(cfg.exec))
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_identity(cfg, output_dir)
    policy = factory()
    sim.check_policy(policy, policy_name)
    # The candidates' artifacts stay with the run (dozens of them), not in the checkpoint.
    accelerator = Accelerator(policy, calibration_source(sim, tasks, positive_int(cfg, "calibration_per_task")),
                              cfg.calibration_dir or output_dir / "calibration", policy_name)
    sequences = expert_sequences(sim, tasks, positive_int(cfg, "measurement_per_task"),
                                 seeds_from=MEASUREMENT_SEEDS, frames=positive_int(cfg, "frames_per_sequence"))
    study = open_study(output_dir, cfg.seed)
    trials = positive_int(cfg, "trials")
    done = min(trials, len(candidates(study)))
    with tqdm(total=trials, initial=done, desc="stage 1 (open loop)", unit="trial") as bar:
        def progress(candidate: Candidate) -> None:
            bar.set_postfix(speedup=f"{candidate.speedup:.2f}", deviation=f"{candidate.action_deviation:.4f}")
            bar.update()

        search(study, accelerator, sequences, goal, trials, positive_int(cfg, "rounds"), execution, progress)
    found = candidates(study)
    front = pareto_front(found)
    picked = finalists(found, positive_int(cfg, "finalists"), cfg.max_deviation)
    # Stage 1's speedups come from a few rounds each: the finalists are measured again, together, with more, and
    # beside the hand-written profiles.
    hand_written = references(cfg, accelerator)
    speed = measure_profiles(accelerator, [*hand_written, *(c.profile() for c in picked)], sequences,
                             positive_int(cfg, "finalist_rounds"), execution, progress=True)
    episodes = closed_loop(cfg, sim, factory, policy_name, tasks, [c.profile() for c in picked],
                           str(accelerator.calibration_dir), output_dir)
    none = episodes["none"]
    rows = [{**vars(c), "speedup": speed[c.name]["speedup"], "latency_ms": speed[c.name]["latency_ms_p50"],
             "shortfall": goal.shortfall(speed[c.name]["latency_ms_p50"], speed[c.name]["speedup"]),
             "success": sum(e["success"] for e in episodes[c.name]) / len(episodes[c.name]),
             "paired": paired_delta(none, episodes[c.name]).to_json(tolerance_share)} for c in picked]
    chosen = choose(rows)
    # A profile's methods as they ran: those the policy cannot take (skip_incompatible) are left out.
    reference_rows = [{"name": p.name, "speedup": speed[p.name]["speedup"],
                       "methods": {m: p.methods[m] for m in speed[p.name]["methods"]},
                       "latency_ms": speed[p.name]["latency_ms_p50"],
                       "action_deviation": speed[p.name]["action_mse_rel_variance"] or 0.0} for p in hand_written]
    for index, candidate in enumerate(sorted(front, key=lambda c: c.action_deviation)):
        write_profile(output_dir / "front" / f"{index:02d}_trial{candidate.trial}.yaml", candidate)
    profile_path = output_dir / "tuned.yaml"
    if chosen is not None:
        write_profile(profile_path, next(c for c in picked if c.trial == chosen["trial"]))
    seeds = sim.seeds("eval")
    confirm = confirm_commands(cfg, seeds.start + seeds.count // 2, profile_path, accelerator.calibration_dir)
    report = {"command": command, "policy": policy_name, "sim": cfg.sim.name, "tasks": tasks, "goal": str(goal),
              "goal_spec": {"budget_ms": goal.budget_ms, "min_speedup": goal.min_speedup},
              "device": f"CPU, {torch.get_num_threads()} torch threads, {execution.label}",
              "trials": len(found), "front": [vars(c) for c in front], "finalists": rows,
              "none_success": sum(e["success"] for e in none) / len(none),
              "episodes_per_task": cfg.episodes_per_task, "seeds": f"eval seeds from {seeds.start}",
              "finalist_rounds": cfg.finalist_rounds,
              "references": reference_rows, "max_deviation": cfg.max_deviation,
              "chosen": chosen, "profile": str(profile_path) if chosen else None, "confirm": confirm}
    write_json(output_dir / "tune.json", report)
    (output_dir / "tune.md").write_text(markdown(report))
    plot(report, found, output_dir / "pareto.png")
    print(markdown(report))
    print(f"profile: {profile_path if chosen else 'none chosen'}; report: {output_dir / 'tune.md'}")
    return report


@hydra_cli("tune")
def main(cfg: DictConfig) -> None:
    run(cfg, command_line("vla-tune"))


if __name__ == "__main__":
    main()
