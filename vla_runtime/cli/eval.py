"""vla-eval: success rate of a policy in a simulator, with confidence intervals and latency."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from vla_runtime.cli.build import accel_options, realtime_spec, tolerance
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
from vla_runtime.evaluation.metrics import markdown_summary, paired_delta, summarize
from vla_runtime.evaluation.runner import evaluate
from vla_runtime.sim.suite import Suite


def episode_dataset(cfg: DictConfig, sim: Suite, output_dir: Path) -> str | None:
    """`save_episodes=true`: output_dir/episodes, an episode dataset vla-replay reads."""
    from vla_runtime.data.lerobot_format import check_format

    check_format(cfg.format)
    if not cfg.save_episodes:
        return None
    from vla_runtime.data.episodes import EpisodeStore

    store = EpisodeStore(output_dir / "episodes", sim.settings(), create=True)
    if len(store):
        raise UsageError(f"{store.root} already holds {len(store)} episodes; use another output_dir")
    return str(store.root)


# What must not change between a run and its resumption (the rest, e.g. workers or launcher, may).
RUN_IDENTITY = ("policy", "sim", "tasks", "episodes_per_task", "actions_per_chunk", "runtime", "accel",
                "accel_options", "exec")


def episode_journal(cfg: DictConfig, output_dir: Path) -> Path:
    """output_dir/episodes.jsonl, where each finished episode is appended. `resume=true` keeps what it holds,
    after checking that the run is the same one (run.json); else the run starts afresh."""
    journal, identity_path = output_dir / "episodes.jsonl", output_dir / "run.json"
    identity = {key: as_dict(cfg[key]) if isinstance(cfg[key], DictConfig | ListConfig) else cfg[key]
                for key in RUN_IDENTITY}
    if cfg.resume and identity_path.exists():
        before = json.loads(identity_path.read_text())
        changed = [key for key in RUN_IDENTITY if before.get(key) != identity[key]]
        if changed:
            raise UsageError(f"resume=true, but {output_dir} holds a run with other {', '.join(changed)}; "
                             "use another output_dir or the same settings")
    elif journal.exists():
        journal.unlink()
    write_json(identity_path, identity)
    return journal


def baseline_episodes(path: str | None) -> list[dict] | None:
    """`compare_to`: the episodes of another run's results.json, read before this run starts."""
    if path is None:
        return None
    try:
        episodes = json.loads(Path(path).read_text())["episodes"]
        if not all({"task", "seed", "success"} <= set(e) for e in episodes):
            raise ValueError("an episode without task, seed or success")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"compare_to={path}: not a vla-eval results.json with its episodes ({exc})") from exc
    return episodes


def describe_runtime(runtime: DictConfig) -> str:
    if runtime.mode == "sync":
        return "sync"
    if runtime.latency_model == "fixed":
        return f"realtime, {runtime.latency_ms:g} ms latency model"
    return f"realtime, {runtime.latency_model} latency"


def run(cfg: DictConfig, command: str | None = None) -> dict:
    sim = suite(cfg)
    tasks = task_list(cfg, sim)
    episodes_per_task = positive_int(cfg, "episodes_per_task")
    policy_name, factory = policy_factory(cfg, sim)
    output_dir = Path(cfg.output_dir)
    realtime = realtime_spec(cfg.runtime, sim)
    accel = accel_options(cfg, policy_name, tasks)
    baseline, tolerance_share = baseline_episodes(cfg.compare_to), tolerance(cfg)
    journal = episode_journal(cfg, output_dir)
    episodes = evaluate(
        factory,
        sim,
        tasks,
        episodes_per_task,
        workers=positive_int(cfg, "workers"),
        actions_per_chunk=cfg.actions_per_chunk,
        video_dir=str(output_dir / "videos") if cfg.video else None,
        realtime=realtime,
        accel=accel,
        episodes_dir=episode_dataset(cfg, sim, output_dir),
        policy_name=policy_name,
        launcher=cfg.launcher,
        ray_address=cfg.ray_address,
        journal=journal,
    )
    sim_name = cfg.sim.name + (f" ({sim.label})" if sim.label else "")
    results = {"command": command, "policy": policy_name, "sim": sim_name, "runtime_mode": cfg.runtime.mode,
               "runtime": as_dict(cfg.runtime),
               "accel": {"profile": accel.profile.name, "methods": accel.profile.methods} if accel else None,
               **summarize(episodes, tasks)}
    paired = None
    if baseline is not None:
        try:
            paired = paired_delta(baseline, results["episodes"])
        except ValueError as exc:  # this run's results are still written
            print(f"compare_to={cfg.compare_to}: {exc}")
    if paired is not None:
        results["paired_vs"] = {"results": str(cfg.compare_to), **paired.to_json(tolerance_share)}
    write_json(output_dir / "results.json", results)
    if cfg.save_episodes and cfg.format == "lerobot":
        from vla_runtime.data.lerobot_format import LEROBOT_SUBDIR, convert_store

        root = convert_store(output_dir / "episodes", output_dir / LEROBOT_SUBDIR, use_videos=bool(cfg.lerobot_video))
        print(f"LeRobotDataset: {root}")
    accelerated = f", accel={accel.profile.name}" if accel else ""
    title = (f"{policy_name}{accelerated} on {sim_name}, {describe_runtime(cfg.runtime)} "
             f"({episodes_per_task} episodes per task)")
    summary = markdown_summary(results, title)
    if paired is not None:
        summary += (f"\nAgainst {cfg.compare_to}, paired on {paired.pairs} episodes (task, seed): {paired} points "
                    f"(Wald 95 %), {paired.wins} won / {paired.losses} lost, McNemar p = {paired.p_value:.2f}: "
                    f"{paired.verdict(tolerance_share)} (tolerance {100 * tolerance_share:g} points).\n")
    if command:
        summary += f"\nCommand: `{command}`\n"
    (output_dir / "summary.md").write_text(summary)
    print(summary)
    print(f"results: {output_dir / 'results.json'}")
    if results["errors"] and len(results["errors"]) == len(episodes):
        raise ValueError(f"Every episode ended in an error; first: {results['errors'][0]['error']}")
    return results


@hydra_cli("eval")
def main(cfg: DictConfig) -> None:
    run(cfg, command=command_line("vla-eval"))


if __name__ == "__main__":
    main()
