"""vla-robot: the nodes of launch/robot.launch.py without the ros2 CLI (for machines with only the rclpy wheels).

The bridge runs in its own process, as `ros2 launch` would start it (the control node's inference then
does not share a Python interpreter with the renderer); the control node runs in this one. SIGINT or
SIGTERM, or `episodes` finished simulator episodes, end it cleanly: the bag is closed, the bridge stopped.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from importlib.resources import files
from pathlib import Path

from vla_runtime.cli import CONFIG_MODULE
from vla_runtime.cli.common import UsageError, as_dict, check_overrides, friendly_errors, write_json
from vla_runtime.ros import node_parameters


def require_rclpy() -> None:
    try:
        import rclpy  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"vla-robot needs ROS 2's rclpy ({exc}). Install the extra: pip install "
                         "'vla-runtime[ros]' (ROS 2 Kilted wheels), or source a ROS 2 installation") from exc


def ros_args(parameters: dict) -> list[str]:
    """`--ros-args -p name:=value ...`; values are YAML to ROS, and JSON is YAML."""
    args = ["--ros-args"]
    for name, value in parameters.items():
        args += ["-p", f"{name}:={json.dumps(value)}"]
    return args


def start_bridge(parameters: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vla_runtime.ros.sim_bridge", *ros_args(parameters)])


class EpisodeMonitor:
    """Collects the bridge's finished episodes from its (latched) status topic."""

    def __init__(self, node, topic: str):
        from std_msgs.msg import String

        from vla_runtime.ros.common import LATCHED

        self.finished: dict[int, dict] = {}
        self._lock = threading.Lock()
        node.create_subscription(String, topic, self._on_status, LATCHED)

    def _on_status(self, msg) -> None:
        status = json.loads(msg.data)
        if status.get("done"):
            with self._lock:
                self.finished.setdefault(status["episode"], status)

    def episodes(self) -> list[dict]:
        with self._lock:
            return [self.finished[index] for index in sorted(self.finished)]


def run(config: dict, command: str | None = None) -> dict:
    require_rclpy()
    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    from vla_runtime.ros.common import init_ros, shutdown_ros, speed_up_thread_switching, spin_until_shutdown
    from vla_runtime.ros.control_node import ControlNode

    if not isinstance(config["episodes"], int) or config["episodes"] < 0:
        raise UsageError(f"episodes must be a non-negative integer, got {config['episodes']!r}")
    control_parameters, bridge_parameters = node_parameters(config)
    speed_up_thread_switching()
    running = init_ros(args=["vla-robot"])  # SIGINT / SIGTERM shut ROS down; vla-robot's own arguments are not ROS's
    bridge = start_bridge(bridge_parameters) if config["use_sim"] else None
    executor = MultiThreadedExecutor(num_threads=2)
    node = spinner = None
    try:
        node = ControlNode(parameter_overrides=control_parameters)
        running.set()
        monitor = EpisodeMonitor(node, (config.get("bridge") or {}).get("episode_topic", "/sim/episode"))
        executor.add_node(node)
        spinner = threading.Thread(target=spin_until_shutdown, args=(executor.spin,), daemon=True)
        spinner.start()
        while rclpy.ok():
            if bridge is not None and bridge.poll() is not None:
                raise RuntimeError(f"the simulator bridge exited with status {bridge.returncode}")
            if config["episodes"] and len(monitor.episodes()) >= config["episodes"]:
                break
            time.sleep(0.1)
        episodes = monitor.episodes()[: config["episodes"] or None]
        summary = {"command": command, "config": config, "episodes": episodes,
                   "success_rate": sum(e["success"] for e in episodes) / len(episodes) if episodes else None,
                   "control": node.summary(),
                   # raw samples, for distributions across runs (benchmarks/ros_latency.py)
                   "image_to_action_ms_samples": [1000 * s for s in node.publish_latency_s],
                   "tick_jitter_ms_samples": [1000 * s for m in node.run_metrics for s in m.tick_jitter_s]}
    finally:
        # Loop first (it publishes), then the executor and its thread, then the node: destroying a node that an
        # executor still spins leaves "cannot use Destroyable" errors behind, and a daemon thread still inside
        # rclpy when the interpreter exits can abort it.
        if node is not None:
            node.stop()
        executor.shutdown()
        if spinner is not None:
            spinner.join(timeout=5.0)
        if node is not None:
            node.destroy_node()
        shutdown_ros()
        if bridge is not None:
            bridge.send_signal(signal.SIGINT)
            try:
                bridge.wait(timeout=10)
            except subprocess.TimeoutExpired:
                bridge.kill()
    if config.get("output_dir"):
        write_json(Path(config["output_dir"]) / "robot.json", summary)
    return summary


def describe(summary: dict) -> str:
    control = summary["control"]
    lines = [f"{len(summary['episodes'])} episode(s)" + (f", success {summary['success_rate']:.0%}"
                                                        if summary["episodes"] else "")]
    lines += [f"  episode {e['episode']} ({e['task']}, seed {e['seed']}): "
              f"{'success' if e['success'] else 'failure'} after {e['step']} steps" for e in summary["episodes"]]
    latency, publish, jitter = control["latency_ms"], control["image_to_action_ms"], control["tick_jitter_ms"]
    if publish["p50"] is not None:  # at least one chunk reached the robot
        lines.append(f"  policy calls {control['policy_calls']}, inference p50 {latency['p50']:.1f} ms, "
                     f"image -> action p50/p99 {publish['p50']:.1f}/{publish['p99']:.1f} ms, "
                     f"tick jitter p99 {jitter['p99']:.2f} ms")
    if control["profile_switches"]:
        lines.append("  profile " + " -> ".join([control["profile_switches"][0]["from"], *(
            f"{s['to']} (tick {s['tick']})" for s in control["profile_switches"])]))
    lines.append(f"  ticks {control['ticks']}, commands {control['commands_published']}, deadline misses "
                 f"{control['deadline_misses']}, message faults {control['message_faults']}, "
                 f"loop faults {control['loop_faults']}")
    return "\n".join(lines)


def settings(args: list[str]) -> tuple[dict, str]:
    """(vla-robot's settings, the command as typed) from its `key=value` overrides of configs/robot.yaml.

    `policy` also names a config group (configs/policy/, for vla-eval and friends) in the same search path,
    which hydra would read `policy=X` as, and refuse: the config is composed from the other overrides, and
    `policy=` is set on it after. Hence no `@hydra.main` here (it reads sys.argv).
    """
    from hydra import compose, initialize_config_module

    flags = [arg for arg in args if arg.startswith("-")]
    if flags:
        raise UsageError(f"vla-robot takes key=value overrides of configs/robot.yaml (episodes=1 policy=ref_dit "
                         f"robot_file=arm.yaml, docs/ros2.md), not {flags[0]!r}")
    policies = [arg.split("=", 1)[1] for arg in args if arg.startswith("policy=")]
    overrides = [arg for arg in args if not arg.startswith("policy=")]
    check_overrides("robot", overrides, version_base=None)
    with initialize_config_module(CONFIG_MODULE, version_base=None):
        config = as_dict(compose("robot", overrides=overrides))
    if policies:
        config["policy"] = policies[-1]
    return config, " ".join(["vla-robot", *overrides, *(f"policy={name}" for name in policies[-1:])])


@friendly_errors
def main(args: list[str] | None = None) -> None:
    """`vla-robot [key=value ...]`; `args`: the command line after the program (default: this process's)."""
    args = sys.argv[1:] if args is None else args
    if args in (["-h"], ["--help"]):  # the keys, their defaults and what each does
        print(f"usage: vla-robot [key=value ...]\n\n{__doc__}\n{(files(CONFIG_MODULE) / 'robot.yaml').read_text()}")
        return
    config, command = settings(args)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")  # no robot.log anywhere
    try:
        summary = run(config, command)
    except KeyboardInterrupt:  # stopped before the control node ran: nothing to summarise
        return
    print(describe(summary))


if __name__ == "__main__":
    main()
