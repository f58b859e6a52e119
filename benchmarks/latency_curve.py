"""Success vs inference latency, in the loop: what synchronous benchmarks hide.

    python benchmarks/latency_curve.py --policy ref_dit --latencies 0 100 200 400 800 \
        --episodes-per-task 10 --out benchmarks/latency_curve

Runs `vla-eval runtime.mode=realtime runtime.latency_model=fixed runtime.latency_ms=L` on MT10 for each
latency L (the simulator keeps stepping at 80 Hz while the chunk is computed), then writes a table
(markdown + json) and a plot of success (Wilson 95 % CI) and deadline-miss rate against latency.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="ref_dit")
    parser.add_argument("--latencies", type=float, nargs="+", default=[0, 100, 200, 400, 800])
    parser.add_argument("--episodes-per-task", type=int, default=10)
    parser.add_argument("--tasks", default="mt10")
    parser.add_argument("--extra", default="", help="more vla-eval overrides, e.g. 'runtime.merge=temporal_ensemble'")
    parser.add_argument("--out", default="benchmarks/latency_curve")
    parser.add_argument("--reuse", action="store_true", help="keep evaluations whose results.json exists")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for latency in args.latencies:
        run_dir = out / f"latency_{latency:g}ms"
        command = [sys.executable, "-m", "vla_runtime.cli.eval", f"policy={args.policy}", f"tasks={args.tasks}",
                   f"episodes_per_task={args.episodes_per_task}", "runtime.mode=realtime",
                   "runtime.latency_model=fixed", f"runtime.latency_ms={latency:g}", f"output_dir={run_dir}",
                   *shlex.split(args.extra)]
        if not (args.reuse and (run_dir / "results.json").exists()):
            print("$", shlex.join(command[2:]), flush=True)
            subprocess.run(command, check=True)
        results = json.loads((run_dir / "results.json").read_text())
        loop = results["control_loop"]
        after_start = loop["ticks"] - loop["startup_holds"]
        rows.append({"latency_ms": latency, "success_rate": results["success_rate"],
                     "per_task": {t: r["success_rate"] for t, r in results["per_task"].items()},
                     "episodes": sum(r["episodes"] for r in results["per_task"].values()),
                     "successes": sum(r["successes"] for r in results["per_task"].values()),
                     "miss_rate": loop["deadline_misses"] / max(1, after_start),
                     "startup_holds": loop["startup_holds"], "ticks": loop["ticks"],
                     "policy_calls": results["policy_calls"]})
    (out / "curve.json").write_text(json.dumps({"policy": args.policy, "rows": rows}, indent=2) + "\n")
    plot(rows, out / "curve.png", args.policy)
    lines = [f"# {args.policy}: success vs inference latency in the loop (MT10, realtime mode)", "",
             f"Command: `python benchmarks/latency_curve.py --policy {args.policy} --latencies "
             f"{' '.join(f'{x:g}' for x in args.latencies)} --episodes-per-task {args.episodes_per_task}"
             f"{' --extra ' + shlex.quote(args.extra) if args.extra else ''} --out {args.out}`"
             f"{' (--reuse: rebuilt from the stored results.json files)' if args.reuse else ''}", "",
             "Deadline-miss rate: ticks with an empty queue, of the ticks after the first chunk arrived "
             "(before it: startup holds).", "",
             "| latency (ms) | success | 95 % CI | deadline-miss rate | startup holds / ticks | policy calls |",
             "|---:|---:|---|---:|---:|---:|"]
    from vla_runtime.sim.metrics import wilson_interval

    for row in rows:
        low, high = wilson_interval(row["successes"], row["episodes"])
        lines.append(f"| {row['latency_ms']:g} | {row['success_rate']:.1%} | [{low:.0%}, {high:.0%}] | "
                     f"{row['miss_rate']:.1%} | {row['startup_holds']} / {row['ticks']} | {row['policy_calls']} |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path, policy: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vla_runtime.sim.metrics import wilson_interval

    latency = [r["latency_ms"] for r in rows]
    success = [r["success_rate"] for r in rows]
    intervals = [wilson_interval(r["successes"], r["episodes"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.errorbar(latency, success, yerr=[[s - lo for s, (lo, _) in zip(success, intervals, strict=True)],
                                        [hi - s for s, (_, hi) in zip(success, intervals, strict=True)]],
                marker="o", capsize=4, label="success (pooled episodes, Wilson 95 % CI)")
    ax.plot(latency, [r["miss_rate"] for r in rows], marker="s", ls="--",
            label="deadline-miss rate (after the first chunk)")
    ax.set_xlabel("inference latency (ms), robot stepping at 80 Hz meanwhile")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{policy} on Meta-World MT10: what latency costs")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
