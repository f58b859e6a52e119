"""Success statistics and the evaluation summary (results.json + markdown)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest

from vla_runtime.control.metrics import percentiles_ms, smoothness
from vla_runtime.evaluation.runner import EpisodeResult

Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score 95 % interval for a binomial proportion; (0, 1) when there are no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z**2 / trials
    centre = (p + z**2 / (2 * trials)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


@dataclass(frozen=True)
class PairedDelta:
    """A profile's success against a baseline's on the same episodes (task, seed and noise): far tighter than two
    independent intervals, since a near-lossless profile changes the outcome of few episodes.

    Attributes:
        pairs: episodes run under both (matched by task and seed).
        delta: the profile's success rate minus the baseline's over those pairs, a share (0.01: one point).
        ci95: the Wald 95 % interval of the difference of paired proportions,
            delta +- z sqrt(wins + losses - (wins - losses)^2 / pairs) / pairs; zero width when no episode changed
            its outcome (and optimistic with very few that did: read it with `wins` and `losses`).
        wins: pairs the profile succeeded in and the baseline failed.
        losses: pairs the baseline succeeded in and the profile failed.
        p_value: McNemar's exact test (a two-sided binomial test on the discordant pairs); 1 when there are none.
    """

    pairs: int
    delta: float
    ci95: tuple[float, float]
    wins: int
    losses: int
    p_value: float

    def verdict(self, tolerance: float) -> str:
        """`no measurable loss` only when the interval's lower end is at or above -`tolerance` (a share); `loss` when
        its upper end is below it; `inconclusive` otherwise (more episodes would tell)."""
        if self.ci95[0] >= -tolerance:
            return "no measurable loss"
        return "loss" if self.ci95[1] < -tolerance else "inconclusive"

    def to_json(self, tolerance: float) -> dict:
        return {**asdict(self), "ci95": list(self.ci95), "verdict": self.verdict(tolerance),
                "tolerance": tolerance}

    def __str__(self) -> str:
        low, high = self.ci95
        return f"{100 * self.delta:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def paired_delta(baseline: Iterable[dict], profile: Iterable[dict]) -> PairedDelta:
    """`profile` against `baseline`, each a list of episodes ({"task", "seed", "success"}, as results.json holds
    them), paired by task and seed; episodes only one of them ran are left out (`pairs` says how many are in)."""
    base = {(e["task"], e["seed"]): bool(e["success"]) for e in baseline}
    other = {(e["task"], e["seed"]): bool(e["success"]) for e in profile}
    keys = sorted(base.keys() & other.keys())
    if not keys:
        raise ValueError("No episode in common (same task and seed) between the two runs: nothing to pair")
    n = len(keys)
    wins = sum(other[k] and not base[k] for k in keys)
    losses = sum(base[k] and not other[k] for k in keys)
    delta = (wins - losses) / n
    half = Z95 * math.sqrt(max(0.0, wins + losses - (wins - losses) ** 2 / n)) / n
    p_value = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return PairedDelta(n, delta, (delta - half, delta + half), wins, losses, float(p_value))


def summarize(episodes: Sequence[EpisodeResult], tasks: Sequence[str]) -> dict:
    """results.json content. `success_rate` is the mean of the per-task rates (each task counts once)."""
    per_task = {}
    for task in tasks:
        runs = [e for e in episodes if e.task == task]
        successes = sum(e.success for e in runs)
        low, high = wilson_interval(successes, len(runs))
        per_task[task] = {
            "success_rate": successes / len(runs) if runs else 0.0,
            "ci95": [low, high],
            "episodes": len(runs),
            "successes": successes,
            "mean_length": float(np.mean([e.length for e in runs])) if runs else None,
            "policy_calls": sum(e.policy_calls for e in runs),
            "errors": sum(e.error is not None for e in runs),
        }
        measured = sorted({key for e in runs for key in e.measures})
        if measured:  # the share of episodes that reached each partial measure
            per_task[task]["measures"] = {key: sum(e.measures.get(key, False) for e in runs) / len(runs)
                                          for key in measured}
    latencies = [lat for e in episodes for lat in e.inference_latency_s]
    loops = [e.loop for e in episodes if e.loop is not None]
    return {
        "success_rate": float(np.mean([t["success_rate"] for t in per_task.values()])),
        "per_task": per_task,
        "latency_ms": percentiles_ms(latencies),
        "policy_calls": len(latencies),
        # The synchronous protocol stops the world while the policy runs: no tick can be late there.
        "deadline_misses": sum(loop["deadline_misses"] for loop in loops),
        "control_loop": _loop_totals(loops) if loops else None,
        "latency_samples_ms": [1000 * lat for lat in latencies],
        "errors": [{"task": e.task, "seed": e.seed, "error": e.error} for e in episodes if e.error],
        "episodes": [
            {"task": e.task, "seed": e.seed, "success": e.success, "length": e.length,
             "policy_calls": e.policy_calls, "video": e.video_path, "error": e.error, "loop": e.loop,
             **({"measures": e.measures} if e.measures else {})}
            for e in episodes
        ],
    }


def _loop_totals(loops: Sequence[dict]) -> dict:
    """Control-loop counters summed over episodes (latency and jitter percentiles stay per episode)."""
    keys = ("ticks", "deadline_misses", "startup_holds", "faults", "policy_errors", "stale_holds", "clipped", "reuses",
            "discarded_actions")
    totals = {key: sum(loop[key] for loop in loops) for key in keys}
    # Of the ticks after the first chunk arrived: waiting for the very first chunk is not a missed deadline.
    totals["miss_rate"] = totals["deadline_misses"] / max(1, totals["ticks"] - totals["startup_holds"])
    jitter_p99 = [loop["tick_jitter_ms"]["p99"] for loop in loops if loop["tick_jitter_ms"]["p99"] is not None]
    totals["tick_jitter_ms_p99_max"] = max(jitter_p99) if jitter_p99 else None
    totals["profile_switches"] = sum(len(loop["profile_switches"]) for loop in loops)
    # Smoothness: the jump between the last action of one chunk and the first of the next, and the jerk, pooled.
    totals.update(smoothness(loops))
    totals["stale_chunks"] = sum(loop.get("stale_chunks", 0) for loop in loops)
    totals["max_in_flight"] = max(loop.get("max_in_flight", 1) for loop in loops)
    delays = [delay for loop in loops for delay in loop["rtc_delays"]]
    totals["rtc_delay_ticks_p50"] = float(np.median(delays)) if delays else None
    totals["rtc_delay_clamped"] = sum(loop["rtc_delay_clamped"] for loop in loops)
    return totals


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_summary(results: dict, title: str) -> str:
    measured = any("measures" in row for row in results["per_task"].values())
    lines = [f"## {title}", "", "| task | success | 95 % CI (Wilson) | episodes | mean length |"
             + (" partial measures |" if measured else ""), "|---|---:|---|---:|---:|" + ("---|" if measured else "")]
    for task, row in results["per_task"].items():
        low, high = row["ci95"]
        partial = ", ".join(f"{key} {rate:.0%}" for key, rate in row.get("measures", {}).items())
        lines.append(f"| {task} | {row['success_rate']:.0%} | [{low:.0%}, {high:.0%}] | {row['episodes']} "
                     f"| {row['mean_length']:.0f} |" + (f" {partial} |" if measured else ""))
    latency = results["latency_ms"]
    lines += [
        f"| **mean** | **{results['success_rate']:.1%}** | | "
        f"{sum(r['episodes'] for r in results['per_task'].values())} | |",
        "",
        f"Policy latency (ms): p50 {_fmt_ms(latency['p50'])}, p95 {_fmt_ms(latency['p95'])}, "
        f"p99 {_fmt_ms(latency['p99'])} over {results['policy_calls']} policy calls; "
        f"deadline misses: {results['deadline_misses']}.",
    ]
    loop = results.get("control_loop")
    if loop:
        lines.append(f"Control loop: {loop['ticks']} ticks, miss rate {loop['miss_rate']:.1%}, "
                     f"faults {loop['faults']}, reuses {loop['reuses']}, "
                     f"discarded actions {loop['discarded_actions']}; jump at chunk boundaries mean "
                     f"{_fmt(loop['boundary_jump_mean'])}, p99 {_fmt(loop['boundary_jump_p99'])}"
                     + (f"; rtc delay p50 {loop['rtc_delay_ticks_p50']:g} ticks" if loop["rtc_delay_ticks_p50"]
                        is not None else "") + ".")
    if results["errors"]:
        errors = results["errors"]
        lines.append(f"**{len(errors)} episode(s) ended in an error**, first: {errors[0]}")
    return "\n".join(lines) + "\n"
