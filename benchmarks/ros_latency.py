"""ROS 2 control node: image arrival -> action publish latency and control-tick jitter, closed loop.

    python benchmarks/ros_latency.py --rounds 3 --out benchmarks/ros

Each configuration is one `vla-robot episodes=1 ...` run (a fresh process: the Meta-World bridge in its
own process, the control node with the policy in vla-robot's, real rclpy/DDS on loopback). The
configurations take turns round by round, so machine noise hits them alike. Latency: from the moment
the control node received the image a chunk was computed from to the moment it published the first
action of that chunk. Jitter: how late each control tick started against its fixed schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
from tqdm.auto import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONFIGS = {
    "ref_dit none @20 Hz": ["accel=none", "control_hz=20"],
    "ref_dit bac @20 Hz": ["accel=bac", "control_hz=20"],
    "ref_dit none @80 Hz (real time)": ["accel=none", "control_hz=80"],
}


def percentiles(values: list[float]) -> dict:
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)} if values else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--task", default="drawer-close-v3")
    parser.add_argument("--out", default="benchmarks/ros")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ROS_DOMAIN_ID": str(random.randint(1, 101)), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as scratch, tqdm(total=args.rounds * len(CONFIGS), unit="run") as bar:
        for round_index in range(args.rounds):
            for index, (name, overrides) in enumerate(CONFIGS.items()):
                run_dir = Path(scratch) / f"{round_index}-{index}"
                command = [sys.executable, "-m", "vla_runtime.cli.robot", "episodes=1", f"task={args.task}",
                           f"+bridge.first_episode={round_index}", f"output_dir={run_dir}", *overrides]
                subprocess.run(command, env=env, check=True, capture_output=True, text=True)
                runs[name].append(json.loads((run_dir / "robot.json").read_text()))
                bar.update()
    results = {}
    for name, config_runs in runs.items():
        latency = [x for run in config_runs for x in run["image_to_action_ms_samples"]]
        jitter = [x for run in config_runs for x in run["tick_jitter_ms_samples"]]
        controls = [run["control"] for run in config_runs]
        results[name] = {
            "overrides": CONFIGS[name], "episodes": len(config_runs),
            "successes": sum(run["success_rate"] for run in config_runs),
            "image_to_action_ms": percentiles(latency), "tick_jitter_ms": percentiles(jitter),
            "inference_ms_p50": float(np.median([c["latency_ms"]["p50"] for c in controls])),
            "ticks": sum(c["ticks"] for c in controls), "deadline_misses": sum(c["deadline_misses"] for c in controls),
            "chunks": len(latency), "image_to_action_ms_samples": latency, "tick_jitter_ms_samples": jitter,
        }
    (out / "ros_latency.json").write_text(json.dumps({"command": " ".join(sys.argv), "task": args.task,
                                                      "results": results}, indent=2) + "\n")
    write_markdown(out / "ros_latency.md", results, args)
    plot(out / "ros_latency.png", results)


def write_markdown(path: Path, results: dict, args) -> None:
    lines = ["# ROS 2 control node: image -> action latency and tick jitter (closed loop, Meta-World bridge)", "",
             f"Command: `python benchmarks/ros_latency.py --rounds {args.rounds} --task {args.task} --out {args.out}` "
             f"(2-core CPU machine, no GPU; each row: {args.rounds} episodes of `vla-robot episodes=1 <overrides>`, "
             "configurations interleaved round by round).", "",
             "| configuration | vla-robot overrides | image -> action p50 / p90 / p99 (ms) "
             "| tick jitter p50 / p99 (ms) | inference p50 (ms) | deadline misses / ticks | success |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lat, jit = r["image_to_action_ms"], r["tick_jitter_ms"]
        lines.append(f"| {name} | `{' '.join(r['overrides'])}` "
                     f"| {lat['p50']:.1f} / {lat['p90']:.1f} / {lat['p99']:.1f} "
                     f"| {jit['p50']:.2f} / {jit['p99']:.2f} | {r['inference_ms_p50']:.1f} "
                     f"| {r['deadline_misses']} / {r['ticks']} | {r['successes']:.0f}/{r['episodes']} |")
    lines += ["", "![latency CDF](ros_latency.png)", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, results: dict) -> None:
    figure, (latency_axis, jitter_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        for axis, key in ((latency_axis, "image_to_action_ms_samples"), (jitter_axis, "tick_jitter_ms_samples")):
            values = np.sort(r[key])
            axis.plot(values, np.arange(1, len(values) + 1) / len(values), label=name)
    latency_axis.set(xlabel="image arrival -> action publish (ms)", ylabel="fraction of chunks", title="latency")
    jitter_axis.set(xlabel="tick start - scheduled time (ms)", ylabel="fraction of ticks", title="tick jitter",
                    xscale="symlog")
    latency_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
