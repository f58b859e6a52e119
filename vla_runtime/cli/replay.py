"""vla-replay: a policy, open loop, over logged episodes, for one or more acceleration profiles.

Every `query_every` steps the policy sees the logged frame and predicts a chunk; its first `query_every`
actions stand for the next steps. Per profile: the predicted actions against the logged ones and against a
separate unaccelerated (`none`) pass of the same policy (fidelity), the latency of each call, what the
profile's reuse gate decided (a reused chunk is what the control loop would have executed), and, with
`budget_ms`, which profile the budget governor would have run. Profiles take turns episode by episode.
A source that breaks part-way (a truncated bag, a missing topic) still gets a report of every episode
completed before the error, and the error, naming the file and topic, ends the command (exit status 2).
"""

from __future__ import annotations

import itertools
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from vla_runtime.accel.profiles import Accelerator, Profile, default_calibration_dir, load_profile, load_profiles
from vla_runtime.cli.common import (
    UsageError,
    as_dict,
    command_line,
    hydra_cli,
    policy_factory,
    positive_int,
    suite,
    write_json,
)
from vla_runtime.control.executor import SyncExecutor, sync_config
from vla_runtime.control.governor import BudgetGovernor, Candidate
from vla_runtime.control.loop import CHUNKING
from vla_runtime.control.metrics import jump_statistics, percentiles_ms
from vla_runtime.control.reuse import NeverReuse, ReuseGate
from vla_runtime.control.rtc import RTCConfig, chunked
from vla_runtime.data.episodes import Episode
from vla_runtime.data.sources import LeRobotKeys, SourceError, TopicMap, logged_episodes
from vla_runtime.execution import ExecConfig, exec_config
from vla_runtime.plugins import did_you_mean
from vla_runtime.types import Observation, Policy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REFERENCE = "none (reference pass)"


@dataclass
class ProfileReplay:
    """One profile over one episode."""

    predicted: np.ndarray  # float32 [T, A]: the action the policy would have executed at each step
    latency_s: list[float] = field(default_factory=list)  # one per policy call
    reuses: int = 0  # chunks the reuse gate re-used instead of calling the policy
    gate_s: list[float] = field(default_factory=list)  # what each reuse decision cost (a gate runs the encoder)
    boundary_jumps: list[float] = field(default_factory=list)  # between consecutive chunks' executed actions


def episode_observation(episode: Episode, step: int) -> Observation:
    return Observation(images={camera: frames[step] for camera, frames in episode.images.items()},
                       state=episode.state[step], instruction=episode.instruction,
                       timestamp=float(episode.timestamp[step]))


def replay_episode(policy: Policy, episode: Episode, query_every: int, gate: ReuseGate,
                   latency_ticks: int | None = None, chunking: str = "naive") -> ProfileReplay:
    """The synchronous protocol over the logged frames: a chunk every `query_every` steps (or the last
    one again, when the gate says so), its first `query_every` actions standing for the next steps (the
    first `latency_ticks` of them taken from the previous chunk, as a robot would run them meanwhile)."""
    executor = SyncExecutor(policy, query_every, gate, latency_ticks, chunking)
    executor.reset()
    predicted = np.zeros_like(episode.action, dtype=np.float32)
    for step in range(episode.length):
        obs = episode_observation(episode, step) if executor.needs_observation else None
        predicted[step] = executor.act(obs)
        if executor.last_chunk.horizon < query_every:
            raise ValueError(f"The policy predicts {executor.last_chunk.horizon} actions per chunk, fewer than "
                             f"query_every={query_every}")
    return ProfileReplay(predicted, executor.latency_s, executor.reuses, executor.gate_s, executor.boundary_jumps)


def calibration_frames(episode: Episode, count: int) -> list[Observation]:
    steps = np.linspace(0, episode.length - 1, num=min(count, episode.length)).round().astype(int)
    return [episode_observation(episode, int(step)) for step in steps]


class Replayer:
    """Replays each episode under the reference pass and every profile in turn. Methods that calibrate
    see frames of the first episode."""

    def __init__(self, policy: Policy, policy_name: str, profiles: list[Profile], calibration_dir: str,
                 calibration_count: int, query_every: int, execution: ExecConfig | None = None,
                 latency_ticks: int | None = None, chunking: str = "naive"):
        self.policy = policy
        self.profiles = profiles
        self.query_every = query_every
        self.played = (latency_ticks, chunking)
        self._first_episode: Episode | None = None
        self.accelerator = Accelerator(policy, lambda: calibration_frames(self._first_episode, calibration_count),
                                       calibration_dir, policy_name, execution)

    def run(self, episode: Episode) -> dict[str, ProfileReplay]:
        self._first_episode = self._first_episode or episode
        replays = {REFERENCE: replay_episode(self.policy, episode, self.query_every, NeverReuse(), *self.played)}
        for profile in self.profiles:
            handle = self.accelerator.apply(profile)
            try:
                replays[profile.name] = replay_episode(self.policy, episode, self.query_every,
                                                       handle.reuse_gate or NeverReuse(), *self.played)
            finally:
                self.accelerator.remove()
        return replays


def episode_summary(episode: Episode, replays: dict[str, ProfileReplay]) -> dict:
    reference = replays[REFERENCE].predicted
    profiles = {}
    for name, replay in replays.items():
        if name == REFERENCE:
            continue
        vs_logged = (replay.predicted - episode.action) ** 2
        vs_none = (replay.predicted - reference) ** 2
        profiles[name] = {
            "action_mse_vs_logged": float(vs_logged.mean()), "action_mse_vs_none": float(vs_none.mean()),
            "per_dim_mse_vs_logged": vs_logged.mean(axis=0).tolist(),
            "per_dim_mse_vs_none": vs_none.mean(axis=0).tolist(),
            "step_mse_vs_logged": vs_logged.mean(axis=1).tolist(),
            "latency_ms_samples": [1000 * s for s in replay.latency_s],
            "policy_calls": len(replay.latency_s), "reuses": replay.reuses,
            "gate_ms_samples": [1000 * s for s in replay.gate_s], "boundary_jumps": replay.boundary_jumps,
        }
    return {"name": episode.name, "task": episode.task, "instruction": episode.instruction,
            "length": episode.length, "profiles": profiles}


def aggregate(episodes: list[dict], profile_names: list[str]) -> dict[str, dict]:
    """Step-weighted over episodes (every step counts once)."""
    table = {}
    baseline_p50 = None
    for name in profile_names:
        rows = [(e["length"], e["profiles"][name]) for e in episodes]
        steps = sum(length for length, _ in rows)
        latency = [x for _, row in rows for x in row["latency_ms_samples"]]

        def weighted(key: str, rows=rows, steps=steps):
            return (np.sum([length * np.asarray(row[key]) for length, row in rows], axis=0) / steps).tolist()

        p = percentiles_ms([x / 1000 for x in latency])
        table[name] = {
            "action_mse_vs_logged": weighted("action_mse_vs_logged"),
            "action_mse_vs_none": weighted("action_mse_vs_none"),
            "per_dim_mse_vs_logged": weighted("per_dim_mse_vs_logged"),
            "per_dim_mse_vs_none": weighted("per_dim_mse_vs_none"),
            "latency_ms_p50": p["p50"], "latency_ms_p95": p["p95"], "latency_ms_p99": p["p99"],
            "policy_calls": sum(row["policy_calls"] for _, row in rows),
            "reuses": sum(row["reuses"] for _, row in rows), "steps": steps,
            "gate_ms_p50": percentiles_ms([x / 1000 for _, row in rows for x in row["gate_ms_samples"]])["p50"],
            **jump_statistics([x for _, row in rows for x in row["boundary_jumps"]]),
        }
        if name == "none":
            baseline_p50 = p["p50"]
    for row in table.values():
        row["speedup_p50_vs_none"] = baseline_p50 / row["latency_ms_p50"] if baseline_p50 and row["latency_ms_p50"] \
            else None
    return table


def governor_decisions(table: dict, episodes: list[dict], budget_ms: float) -> dict:
    """Replays the measured latencies through the budget governor: the profile it starts with, each switch,
    and where it ends. Fidelity: lower action deviation from `none` is more faithful."""
    profiles = [Candidate(name, row["latency_ms_p95"], -row["action_mse_vs_none"]) for name, row in table.items()
                if row["latency_ms_p95"] is not None]
    governor = BudgetGovernor(profiles, budget_ms)
    initial = governor.current.name
    samples = {name: [x for e in episodes for x in e["profiles"][name]["latency_ms_samples"]] for name in table}
    position = dict.fromkeys(samples, 0)
    for _ in range(sum(len(v) for v in samples.values()) // max(1, len(samples))):
        name = governor.current.name
        if not samples[name]:
            break
        governor.observe(samples[name][position[name] % len(samples[name])])
        position[name] += 1
    return {"budget_ms": budget_ms, "initial": initial, "final": governor.current.name,
            "switches": [vars(s) for s in governor.switches]}


# ---- report -------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    lines = [f"# vla-replay: {report['policy']} over {report['source']}", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    ticks = report.get("latency_ticks")
    played = f", {ticks} ticks of latency played in" if ticks is not None else ""
    lines += [f"{len(report['episodes'])} episode(s), {report['steps']} steps, a policy call every "
              f"{report['query_every']} steps (open loop{played}; chunking "
              f"{report.get('chunking', 'naive')}); latency on {report['device']}. `vs none`: the same "
              "policy without acceleration, replayed separately (a `none` row measures run-to-run "
              "determinism: it must be 0).", "",
              "| profile | MSE vs logged | MSE vs none | latency p50 / p95 (ms) | speed-up p50 | policy calls "
              "| reuses | reuse check p50 (ms) | jump at chunk boundaries mean / p99 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in report["profiles"].items():
        speedup = f"{row['speedup_p50_vs_none']:.2f}x" if row["speedup_p50_vs_none"] else "-"
        lines.append(f"| {name} | {row['action_mse_vs_logged']:.4f} | {row['action_mse_vs_none']:.4f} | "
                     f"{row['latency_ms_p50']:.1f} / {row['latency_ms_p95']:.1f} | {speedup} | "
                     f"{row['policy_calls']} | {row['reuses']} | "
                     + (f"{row['gate_ms_p50']:.1f} | " if row["gate_ms_p50"] is not None else "- | ")
                     + (f"{row['boundary_jump_mean']:.3f} / {row['boundary_jump_p99']:.3f} |"
                        if row["boundary_jump_mean"] is not None else "- |"))
    lines += ["", "Per action dimension, MSE vs logged:", "",
              "| profile | " + " | ".join(f"dim {i}" for i in range(report["action_dim"])) + " |",
              "|---|" + "---:|" * report["action_dim"]]
    for name, row in report["profiles"].items():
        lines.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in row["per_dim_mse_vs_logged"]) + " |")
    if report.get("governor"):
        g = report["governor"]
        lines += ["", f"Budget governor at {g['budget_ms']:g} ms: starts with `{g['initial']}`, ends with "
                      f"`{g['final']}`, {len(g['switches'])} switch(es)."]
    if report.get("error"):
        lines += ["", f"**Stopped early:** {report['error']}", ""]
    lines += ["", "![latency CDF](latency_cdf.png)", "", "![errors](error_histogram.png)", ""]
    lines += [f"![actions {name}]({name}_actions.png)" for name in report["trace_plots"]]
    return "\n".join(lines) + "\n"


def plot_traces(path: Path, episode: Episode, replays: dict[str, ProfileReplay]) -> None:
    dims = episode.action.shape[1]
    figure, axes = plt.subplots(dims, 1, figsize=(9, 1.9 * dims), sharex=True, squeeze=False)
    steps = np.arange(episode.length)
    for dim, axis in enumerate(axes[:, 0]):
        axis.plot(steps, episode.action[:, dim], color="black", linewidth=2, label="logged")
        for name, replay in replays.items():
            if name != REFERENCE:
                axis.plot(steps, replay.predicted[:, dim], linewidth=1, label=name)
        axis.set_ylabel(f"action {dim}")
    axes[0, 0].set_title(f"{episode.name}: logged vs predicted actions (open loop)")
    axes[0, 0].legend(fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_distributions(output_dir: Path, episodes: list[dict], names: list[str]) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    for name in names:
        values = np.sort([x for e in episodes for x in e["profiles"][name]["latency_ms_samples"]])
        axis.plot(values, np.arange(1, len(values) + 1) / max(1, len(values)), label=name)
    axis.set(xlabel="policy call latency (ms)", ylabel="fraction of calls", title="latency CDF")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output_dir / "latency_cdf.png", dpi=110)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(6, 4))
    errors = {name: np.asarray([x for e in episodes for x in e["profiles"][name]["step_mse_vs_logged"]])
              for name in names}
    high = max(max(v.max() for v in errors.values()), 1e-6)
    bins = np.logspace(math.log10(max(1e-6, min(v[v > 0].min() if (v > 0).any() else high for v in errors.values()))),
                       math.log10(high), 40)
    for name, values in errors.items():
        axis.hist(np.clip(values, bins[0], None), bins=bins, histtype="step", label=name)
    axis.set(xscale="log", xlabel="per-step action MSE vs logged", ylabel="steps", title="action error")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output_dir / "error_histogram.png", dpi=110)
    plt.close(figure)


def write_report(output_dir: Path, report: dict, episodes: list[dict], names: list[str]) -> None:
    """`report["profiles"]` holds the aggregate table when there are episodes."""
    if episodes:
        report["steps"] = sum(e["length"] for e in episodes)
        plot_distributions(output_dir, episodes, names)
    write_json(output_dir / "replay.json", {**report, "episodes": episodes})
    if episodes:
        (output_dir / "replay.md").write_text(markdown({**report, "episodes": episodes}))


# ---- command ------------------------------------------------------------------------------------------
def run(cfg: DictConfig, command: str | None = None) -> dict:
    torch.set_num_threads(positive_int(cfg, "num_threads"))
    sim = suite(cfg)
    policy_name, factory = policy_factory(cfg, sim)
    specs = as_dict(cfg.accel) if not isinstance(cfg.accel, str) else cfg.accel
    options = as_dict(cfg.accel_options)
    profiles = load_profiles(specs, with_baseline=False)
    unused = [method for method in options if not any(method in p.methods for p in profiles)]
    if unused:
        raise UsageError(f"accel_options for {unused}, which none of the profiles {[p.name for p in profiles]} uses")
    # Each option goes to the profiles that use its method.
    profiles = [load_profile(p, {m: s for m, s in options.items() if m in p.methods}) for p in profiles]
    policy = factory()
    query_every = cfg.query_every or policy.spec.actions_per_chunk or 1
    chunking = cfg.chunking
    if chunking not in CHUNKING:
        raise UsageError(f"Unknown chunking '{chunking}'{did_you_mean(chunking, CHUNKING)}; choose one of "
                         f"{', '.join(CHUNKING)}")
    if cfg.latency_ticks is not None and (not isinstance(cfg.latency_ticks, int) or cfg.latency_ticks < 0):
        raise UsageError(f"latency_ticks must be a whole number of control ticks >= 0, got {cfg.latency_ticks!r}")
    if chunking == "auto":
        chunking = "rtc_trained" if policy.spec.rtc_max_delay and cfg.latency_ticks is not None else "naive"
    if chunking != "naive":
        if cfg.latency_ticks is None:
            raise UsageError(f"chunking={chunking} follows the actions a robot runs while the policy computes: give "
                             "latency_ticks=<control ticks of latency>")
        try:
            policy = chunked(policy, chunking, RTCConfig(**as_dict(cfg.rtc)))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    sync_config(policy, query_every, cfg.latency_ticks)  # a latency the chunks cannot cover: said before any replay
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    calibration_dir = cfg.calibration_dir or default_calibration_dir(policy) or tempfile.mkdtemp(
        prefix="calibration-", dir=output_dir)
    execution = exec_config(cfg.exec if isinstance(cfg.exec, str) else as_dict(cfg.exec))
    replayer = Replayer(policy, policy_name, profiles, calibration_dir, positive_int(cfg, "calibration_frames"),
                        query_every, execution, cfg.latency_ticks, chunking)
    for profile in profiles:  # every incompatibility is reported before any replay
        replayer.accelerator.check(profile)
    topics = TopicMap(**{**as_dict(cfg.topics), "action_dim": cfg.topics.action_dim or policy.spec.action_dim})
    source = logged_episodes(cfg.source, cfg.source_type, topics, LeRobotKeys(**as_dict(cfg.lerobot)),
                             cfg.instruction, task_of=sim.task_for_instruction)
    names = [p.name for p in profiles]
    report = {"command": command, "source": str(cfg.source), "policy": policy_name, "accel": names,
              "profile_methods": {p.name: p.methods for p in profiles}, "query_every": query_every,
              "latency_ticks": cfg.latency_ticks, "chunking": chunking,
              "device": f"CPU, {torch.get_num_threads()} torch threads", "error": None, "trace_plots": [],
              "action_dim": None}
    episodes: list[dict] = []
    error = None
    with tqdm(desc="episodes", unit="ep", total=cfg.max_episodes) as bar:
        try:
            for episode in itertools.islice(source, cfg.max_episodes):
                replays = replayer.run(episode)
                episodes.append(episode_summary(episode, replays))
                report["action_dim"] = int(episode.action.shape[1])
                if len(episodes) <= cfg.plot_episodes:
                    plot_traces(output_dir / f"{episode.name}_actions.png", episode, replays)
                    report["trace_plots"].append(episode.name)
                bar.update()
        except SourceError as exc:
            error = report["error"] = str(exc)
    if episodes:
        report["profiles"] = aggregate(episodes, names)
        if cfg.budget_ms:
            report["governor"] = governor_decisions(report["profiles"], episodes, float(cfg.budget_ms))
    write_report(output_dir, report, episodes, names)
    if error:
        raise UsageError(f"{error}\n(partial report of the {len(episodes)} episode(s) replayed before it: "
                         f"{output_dir / 'replay.json'})")
    print((output_dir / "replay.md").read_text())
    print(f"results: {output_dir / 'replay.json'}")
    return report


@hydra_cli("replay")
def main(cfg: DictConfig) -> None:
    run(cfg, command_line("vla-replay"))


if __name__ == "__main__":
    main()
