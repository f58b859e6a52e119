"""ROS 2 control node, simulator bridge and message conversion (extra: vla-runtime[ros]).

`node_parameters` maps the settings of configs/robot.yaml (shared by vla-robot and launch/robot.launch.py)
to the parameters of each node; importing it needs no ROS.
"""

from __future__ import annotations

CONTROL_KEYS = ("policy", "checkpoint", "accel", "control_hz", "budget_ms", "action_type", "log_bag")
BRIDGE_KEYS = ("task", "max_steps", "action_type")
LAUNCH_ARGUMENTS = (*CONTROL_KEYS, "use_sim", "task", "max_steps")


def robot_defaults() -> dict:
    """configs/robot.yaml without its hydra block: the defaults of vla-robot and of the launch file."""
    from importlib.resources import files

    import yaml

    config = yaml.safe_load((files("vla_runtime.configs") / "robot.yaml").read_text())
    config.pop("hydra", None)
    return config


def node_parameters(config: dict) -> tuple[dict, dict]:
    """(control node parameters, bridge parameters). The bridge steps the simulator at control_hz."""
    control = {key: config[key] for key in CONTROL_KEYS}
    bridge = {key: config[key] for key in BRIDGE_KEYS}
    bridge["step_hz"] = float(config["control_hz"])
    control["control_hz"] = float(config["control_hz"])
    control["budget_ms"] = float(config["budget_ms"])
    return {**control, **(config.get("control") or {})}, {**bridge, **(config.get("bridge") or {})}
