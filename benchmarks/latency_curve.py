"""Success vs inference latency, in the loop: what synchronous benchmarks hide.

    python benchmarks/latency_curve.py --policy ref_dit --latencies 0 100 200 400 800 \
        --episodes-per-task 10 --out benchmarks/latency_curve
    python benchmarks/latency_curve.py --policy ref_dit_long --latencies 0 50 100 200 300 \
        --chunking naive rtc rtc_trained --in-flight 1 4 --sync --out benchmarks/latency_curve_rtc

Runs `vla-eval runtime.mode=realtime runtime.latency_model=fixed runtime.latency_ms=L` on MT10 for each
latency L (the simulator keeps stepping at 80 Hz while the chunk is computed), each chunking
(`runtime.chunking`: naive, rtc, rtc_trained) and each number of requests in flight (`runtime.max_in_flight`:
pipelining, the latency model standing for that many servers), plus, with --sync, the synchronous protocol (no
latency: the ceiling); then writes a table (markdown + json) and a plot of success (Wilson 95 % CI),
deadline-miss rate, the jump between consecutive chunks' actions and the jerk against latency. Each point is also
compared paired (same episodes) with its own series at the lowest latency.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from vla_runtime.evaluation.metrics import paired_delta, wilson_interval


def evaluate(args, run_dir: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "vla_runtime.cli.eval", f"policy={args.policy}", f"tasks={args.tasks}",
               f"episodes_per_task={args.episodes_per_task}", f"output_dir={run_dir}", *overrides,
               *shlex.split(args.extra)]
    if not (args.reuse and (run_dir / "results.json").exists()):
        print("$", shlex.join(command[2:]), flush=True)
        subprocess.run(command, check=True)
    return json.loads((run_dir / "results.json").read_text())


def row(results: dict, **key) -> dict:
    loop = results["control_loop"] or {}
    return {**key, "success_rate": results["success_rate"],
            "per_task": {t: r["success_rate"] for t, r in results["per_task"].items()},
            "episodes": sum(r["episodes"] for r in results["per_task"].values()),
            "successes": sum(r["successes"] for r in results["per_task"].values()),
            "miss_rate": loop.get("miss_rate", 0.0), "startup_holds": loop.get("startup_holds", 0),
            "ticks": loop.get("ticks"), "policy_calls": results["policy_calls"],
            "jump_mean": loop.get("boundary_jump_mean"), "jump_p99": loop.get("boundary_jump_p99"),
            "jerk_mean": loop.get("jerk_mean"),
            "outcomes": [{k: e[k] for k in ("task", "seed", "success")} for e in results["episodes"]]}


def series(chunking: str, in_flight: int) -> str:
    return chunking + (f" x{in_flight}" if in_flight > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="ref_dit")
    parser.add_argument("--latencies", type=float, nargs="+", default=[0, 100, 200, 400, 800])
    parser.add_argument("--chunking", nargs="+", default=["naive"], choices=["naive", "rtc", "rtc_trained"])
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1],
                        help="runtime.max_in_flight values (pipelining): each with every chunking")
    parser.add_argument("--sync", action="store_true", help="also the synchronous protocol (the ceiling)")
    parser.add_argument("--episodes-per-task", type=int, default=10)
    parser.add_argument("--tasks", default="mt10")
    parser.add_argument("--extra", default="", help="more vla-eval overrides, e.g. 'runtime.merge=temporal_ensemble'")
    parser.add_argument("--out", default="benchmarks/latency_curve")
    parser.add_argument("--reuse", action="store_true", help="keep evaluations whose results.json exists")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for chunking in args.chunking:
        for in_flight in args.in_flight:
            name = series(chunking, in_flight)
            for latency in args.latencies:
                prefix = "" if name == "naive" else name.replace(" x", "_x") + "_"
                results = evaluate(args, out / f"{prefix}latency_{latency:g}ms", [
                    "runtime.mode=realtime", "runtime.latency_model=fixed", f"runtime.latency_ms={latency:g}",
                    f"runtime.chunking={chunking}", f"runtime.max_in_flight={in_flight}"])
                rows.append(row(results, chunking=name, latency_ms=latency))
    sync = row(evaluate(args, out / "sync", ["runtime.mode=sync"]), chunking="sync", latency_ms=None) \
        if args.sync else None
    for r in rows:  # against the same series at its lowest latency, on the same episodes
        first = next(f for f in rows if f["chunking"] == r["chunking"])
        r["paired_vs_lowest"] = paired_delta(first["outcomes"], r["outcomes"]).to_json(0.03)
    (out / "curve.json").write_text(json.dumps({"policy": args.policy, "rows": rows, "sync": sync}, indent=2) + "\n")
    plot(rows, sync, out / "curve.png", args.policy)
    flags = (f" --chunking {' '.join(args.chunking)}" if args.chunking != ["naive"] else "") + \
        (f" --in-flight {' '.join(map(str, args.in_flight))}" if args.in_flight != [1] else "") + \
        (" --sync" if args.sync else "")
    lines = [f"# {args.policy}: success vs inference latency in the loop ({args.tasks}, realtime mode)", "",
             f"Command: `python benchmarks/latency_curve.py --policy {args.policy} --latencies "
             f"{' '.join(f'{x:g}' for x in args.latencies)}{flags} --episodes-per-task {args.episodes_per_task}"
             f"{' --extra ' + shlex.quote(args.extra) if args.extra else ''} --out {args.out}`"
             f"{' (--reuse: rebuilt from the stored results.json files)' if args.reuse else ''}", "",
             "Deadline-miss rate: ticks with an empty queue, of the ticks after the first chunk arrived "
             "(before it: startup holds). Jump: |a_first(new chunk) - a_last(previous chunk)| (L2) at each "
             "chunk boundary, pooled over the episodes; jerk: the mean L2 second difference of consecutive executed "
             "actions, the gripper left out. x N: N requests in flight (the latency model standing for N servers). "
             "Δ: against the same series at the lowest latency, paired on the same episodes (Wald 95 %).", "",
             "| chunking | latency (ms) | success | 95 % CI | Δ vs lowest latency, paired | deadline-miss rate | "
             "jump mean | jump p99 | jerk mean | startup holds / ticks | policy calls |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows + ([sync] if sync else []):
        low, high = wilson_interval(r["successes"], r["episodes"])
        smooth = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("jump_mean", "jump_p99")]
        smooth.append(f"{r['jerk_mean']:.4f}" if r.get("jerk_mean") is not None else "-")
        latency = "-" if r["latency_ms"] is None else f"{r['latency_ms']:g}"
        paired = r.get("paired_vs_lowest")
        delta = "" if paired is None else (f"{100 * paired['delta']:+.1f} [{100 * paired['ci95'][0]:+.1f}, "
                                           f"{100 * paired['ci95'][1]:+.1f}]")
        lines.append(f"| {r['chunking']} | {latency} | {r['success_rate']:.1%} | [{low:.0%}, {high:.0%}] | {delta} | "
                     f"{r['miss_rate']:.1%} | {' | '.join(smooth)} | {r['startup_holds']} / {r['ticks']} | "
                     f"{r['policy_calls']} |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], sync: dict | None, path: Path, policy: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, jumps) = plt.subplots(1, 2, figsize=(11, 4))
    for chunking in dict.fromkeys(r["chunking"] for r in rows):
        series = [r for r in rows if r["chunking"] == chunking]
        latency = [r["latency_ms"] for r in series]
        success = [r["success_rate"] for r in series]
        intervals = [wilson_interval(r["successes"], r["episodes"]) for r in series]
        ax.errorbar(latency, success, yerr=[[s - lo for s, (lo, _) in zip(success, intervals, strict=True)],
                                            [hi - s for s, (_, hi) in zip(success, intervals, strict=True)]],
                    marker="o", capsize=4, label=f"{chunking}: success (Wilson 95 % CI)")
        ax.plot(latency, [r["miss_rate"] for r in series], marker="s", ls="--", alpha=0.6,
                label=f"{chunking}: deadline-miss rate")
        jumps.plot(latency, [r["jump_mean"] for r in series], marker="o", label=f"{chunking}: mean")
        jumps.plot(latency, [r["jump_p99"] for r in series], marker="^", ls=":", label=f"{chunking}: p99")
    if sync is not None:
        low, high = wilson_interval(sync["successes"], sync["episodes"])
        ax.axhline(sync["success_rate"], color="k", lw=1, label="sync protocol (no latency): success")
        ax.axhspan(low, high, color="k", alpha=0.08)
    ax.set_xlabel("inference latency (ms), robot stepping at 80 Hz meanwhile")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{policy} on Meta-World: what latency costs")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    jumps.set_xlabel("inference latency (ms)")
    jumps.set_ylabel("|action jump| at chunk boundaries (L2)")
    jumps.set_title("smoothness")
    jumps.grid(alpha=0.3)
    jumps.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
