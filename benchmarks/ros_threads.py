"""Why the control node sets Python's thread switch interval, and why the bridge runs in its own process.

    python benchmarks/ros_threads.py --rounds 2 --seconds 10 --out benchmarks/ros

Each trial is a fresh process running the control node (shipped ref_dit, one torch thread, 20 Hz) on
the Meta-World bridge, closed loop over DDS, for `--seconds` after the first chunk, then reports the
policy-call latency. Configurations: the bridge in its own process or in the node's process; Python's
default 5 ms GIL switch interval or the node's 0.5 ms. Trials take turns round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIGS = {
    "bridge in its own process, switch interval 0.5 ms (what the node does)": ("process", 0.0005),
    "bridge in its own process, switch interval 5 ms (Python's default)": ("process", 0.005),
    "bridge in the node's process, switch interval 0.5 ms": ("thread", 0.0005),
}
PARAMETERS = {"task": "drawer-close-v3", "max_steps": 400, "step_hz": 20.0, "action_type": "joint_trajectory"}


def trial(bridge_mode: str, switch_interval: float, seconds: float) -> dict:
    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    from vla_runtime.cli.robot import start_bridge
    from vla_runtime.ros.control_node import ControlNode
    from vla_runtime.ros.sim_bridge import SimBridgeNode

    sys.setswitchinterval(switch_interval)
    process = start_bridge(PARAMETERS) if bridge_mode == "process" else None
    rclpy.init()
    executor = MultiThreadedExecutor(num_threads=2)
    nodes = [SimBridgeNode(PARAMETERS)] if bridge_mode == "thread" else []
    try:
        control = ControlNode(parameter_overrides={"policy": "ref_dit", "suite": "metaworld", "control_hz": 20.0,
                                                   "num_threads": 1})
        nodes.append(control)
        for node in nodes:
            executor.add_node(node)
        threading.Thread(target=executor.spin, daemon=True).start()
        while control.summary()["policy_calls"] == 0:
            time.sleep(0.05)
        time.sleep(seconds)
        summary = control.summary()
    finally:
        executor.shutdown()
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown()
        if process is not None:
            process.terminate()
            process.wait(timeout=20)
    return {"latency_ms": summary["latency_ms"], "policy_calls": summary["policy_calls"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default="benchmarks/ros")
    parser.add_argument("--trial", nargs=2, help=argparse.SUPPRESS)  # bridge mode, switch interval
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(trial(args.trial[0], float(args.trial[1]), args.seconds)))
        return
    env = {**os.environ, "ROS_DOMAIN_ID": str(random.randint(1, 101)), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (mode, interval) in CONFIGS.items():
            run = subprocess.run([sys.executable, __file__, "--seconds", str(args.seconds), "--trial", mode,
                                  str(interval)], env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(name, results[name][-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ros_threads.json").write_text(json.dumps({"command": " ".join(sys.argv), "results": results},
                                                     indent=2) + "\n")
    lines = ["# Control node: GIL switch interval and where the bridge runs", "",
             f"Command: `python benchmarks/ros_threads.py --rounds {args.rounds} --seconds {args.seconds:g} "
             f"--out {args.out}` (2-core CPU; ref_dit, one torch thread, 20 Hz closed loop; each trial "
             f"{args.seconds:g} s after the first chunk, a fresh process; configurations interleaved).", "",
             "| configuration | policy call p50 (ms), per trial | p95 (ms), per trial | calls, per trial |",
             "|---|---|---|---|"]
    for name, trials in results.items():
        cells = [" / ".join(f"{t['latency_ms'][key]:.0f}" for t in trials) for key in ("p50", "p95")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {' / '.join(str(t['policy_calls']) for t in trials)} |")
    (out / "ros_threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
