"""Episodes on Ray against the serial runner: the same results, and the wall clock with 1 and 2 actors.

    python benchmarks/ray_scaling.py --policy ref_dit --episodes-per-task 10 --out benchmarks/ray

Runs `vla-eval tasks=mt10` (sync) serially (launcher=local workers=1), then with launcher=ray and 1 and 2 actors,
and compares every episode's (task, seed, success, length) with the serial run's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def run(args, name: str, overrides: list[str]) -> tuple[dict, float]:
    out = Path(args.out) / name
    command = [sys.executable, "-m", "vla_runtime.cli.eval", f"policy={args.policy}", f"tasks={args.tasks}",
               f"episodes_per_task={args.episodes_per_task}", f"output_dir={out}", *overrides]
    print("$", shlex.join(command[2:]), flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True)
    return json.loads((out / "results.json").read_text()), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="ref_dit")
    parser.add_argument("--tasks", default="mt10")
    parser.add_argument("--episodes-per-task", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/ray")
    args = parser.parse_args()
    # The serial run on one torch thread, as each actor has: another thread count changes float reductions, and
    # a closed loop turns that into an episode a step longer or shorter.
    runs = {"serial (launcher=local, workers=1, 1 thread)": run(args, "serial", ["launcher=local", "workers=1",
                                                                                 "+policy.num_threads=1"]),
            "ray, 1 actor": run(args, "ray1", ["launcher=ray", "workers=1"]),
            "ray, 2 actors": run(args, "ray2", ["launcher=ray", "workers=2"])}

    def episodes(results: dict) -> list[tuple]:
        return [(e["task"], e["seed"], e["success"], e["length"]) for e in results["episodes"]]

    serial = episodes(next(iter(runs.values()))[0])
    one_actor = runs["ray, 1 actor"][1]
    lines = [f"# {args.policy} on {args.tasks}: episodes on Ray vs the serial runner", "",
             f"Command: `python benchmarks/ray_scaling.py --policy {args.policy} --tasks {args.tasks} "
             f"--episodes-per-task {args.episodes_per_task} --out {args.out}` (2 cores; wall clock of the whole "
             "vla-eval process, Ray's start-up included)", "",
             "| run | episodes | success | same episodes as serial | wall clock (s) | vs 1 actor |",
             "|---|---:|---:|---|---:|---:|"]
    for name, (results, seconds) in runs.items():
        same = episodes(results) == serial
        lines.append(f"| {name} | {len(results['episodes'])} | {results['success_rate']:.1%} | "
                     f"{'yes' if same else 'NO'} | {seconds:.0f} | {one_actor / seconds:.2f}x |")
    (Path(args.out) / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
