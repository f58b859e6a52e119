"""ROS 2 control node, simulator bridge and message conversion (extra: vla-runtime[ros]).

`node_parameters` maps the settings of configs/robot.yaml (shared by vla-robot and launch/robot.launch.py)
to the parameters of each node; importing it needs no ROS.
"""

from __future__ import annotations

import json

CONTROL_KEYS = ("policy", "checkpoint", "suite", "suite_options", "robot_file", "accel", "control_hz", "budget_ms",
                "action_type", "log_bag")
BRIDGE_KEYS = ("suite", "suite_options", "task", "max_steps", "action_type")
# Every launch argument of launch/robot.launch.py, with what `ros2 launch ... --show-args` says about it.
LAUNCH_ARGUMENTS = {
    "policy": "registered policy of the control node (ref_dit, ref_ar, ...)",
    "checkpoint": "checkpoint directory of that policy ('': the shipped one)",
    "suite": "simulator suite of the bridge; with use_sim the control node gets it too (its robot contract and "
             "calibration frames); without, the control node has no suite",
    "suite_options": 'more settings of that suite for both nodes, a JSON object (SIMPLER offline: '
                     '{"asset_dir": "<bundle>"})',
    "robot_file": "control node: YAML or JSON file with the robot contract (action_low, action_high, hold_dims, "
                  "state_dim, control_hz), over the suite's ('': none)",
    "accel": "acceleration profile(s), '+'-joined: none, bac, efficientvla, flashvla+bac, ...",
    "control_hz": "control ticks per second; the bridge steps the simulator at the same rate",
    "budget_ms": "latency budget per policy call in ms (0: none); with control.accel_ladder the governor "
                 "switches profiles to meet it",
    "action_type": "action message: joint_trajectory, twist or float32_array (control node and bridge)",
    "log_bag": "MCAP file the control node logs observations, actions, latency and faults to ('': none)",
    "use_sim": "start the simulator bridge (false: a real robot publishes the sensor topics)",
    "task": "task of the bridge's suite",
    "max_steps": "bridge: steps before an episode is cut off (0: the suite's)",
}


def robot_defaults() -> dict:
    """configs/robot.yaml: the defaults of vla-robot and of the launch file."""
    from importlib.resources import files

    import yaml

    return yaml.safe_load((files("vla_runtime.configs") / "robot.yaml").read_text())


def node_parameters(config: dict) -> tuple[dict, dict]:
    """(control node parameters, bridge parameters). The bridge steps the simulator at control_hz; with use_sim
    the control node gets the bridge's suite (the robot it drives is that suite's), without it none (a real
    robot's contract is `robot_file`'s, or the node's own parameters under `control`)."""
    if isinstance(config.get("suite_options"), dict):  # vla-robot 'suite_options={asset_dir: x}' (hydra parses it)
        config = {**config, "suite_options": json.dumps(config["suite_options"])}
    control = {key: config[key] for key in CONTROL_KEYS}
    if not config["use_sim"]:
        control["suite"] = ""
    bridge = {key: config[key] for key in BRIDGE_KEYS}
    bridge["step_hz"] = float(config["control_hz"])
    control["control_hz"] = float(config["control_hz"])
    control["budget_ms"] = float(config["budget_ms"])
    return {**control, **(config.get("control") or {})}, {**bridge, **(config.get("bridge") or {})}
