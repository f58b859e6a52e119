"""The ROS parameters of the nodes: defaults and descriptions in one table each, declared in one place."""

from __future__ import annotations

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node

# name -> (default, description). ROS parameters cannot be empty lists without a type: [""] means "not set".
CONTROL = {
    "policy": ("ref_dit", "registered policy name"),
    "checkpoint": ("", "checkpoint directory of that policy ('': the shipped one)"),
    "policy_options": ("{}", 'more settings of that policy, a JSON object (policy=remote: {"url": "ws://gpu:8000"})'),
    "suite": ("metaworld", "simulator suite whose expert episodes calibrate acceleration methods (when the "
                           "checkpoint ships no calibration artifact) and that random-weight policies are shaped for"),
    "suite_options": ("{}", 'more settings of that suite, a JSON object (SIMPLER offline: {"asset_dir": "<bundle>"})'),
    "accel": ("none", "acceleration profile(s), '+'-joined"),
    "accel_ladder": ([""], "profiles the budget governor picks from, most faithful first (needs budget_ms)"),
    "exec": ("eager", "execution backend: eager | compile | cuda_graphs; every profile the node may use is "
                      "compiled (warmed up on the calibration frames) before its loop starts"),
    "control_hz": (80.0, "control ticks per second"),
    "budget_ms": (0.0, "latency budget per policy call (0: none)"),
    "camera_names": ([""], "cameras the policy reads (default: its spec's)"),
    "image_topics": ([""], "one topic per camera (default: ros.common.camera_topic: /camera/<name>/image_raw)"),
    "resize_images": (False, "resize frames to the policy's image size instead of rejecting them (reason "
                             "'resolution')"),
    "joint_state_topic": ("/joint_states", "sensor_msgs/JointState with the robot state"),
    "joint_names": ([""], "order of the state's joints (default: as sent)"),
    "instruction_topic": ("/instruction", "std_msgs/String with the instruction (latched)"),
    "instruction": ("", "the instruction until one arrives on instruction_topic"),
    "action_topic": ("/vla/action", "where actions go, one per tick"),
    "action_type": ("joint_trajectory", "joint_trajectory | twist | float32_array"),
    "action_names": ([""], "joint names of the action (default: action_<i>)"),
    "max_message_age_s": (0.5, "messages stamped further from now are dropped (reason 'stale'; 0: off)"),
    "stale_observation_s": (0.5, "watchdog: hold the robot when the newest observation is older"),
    "request_when": ("latency", "latency: ask for the next chunk when the queue lasts less than the predicted "
                                "latency, or at request_threshold (a floor); count: only at request_threshold"),
    "request_threshold": (-1, "ask when this many actions are left (-1: once the policy's executed horizon ran)"),
    "execute_horizon": (0, "actions of each chunk queued (0: all; late ones are dropped)"),
    "chunking": ("naive", "naive | rtc: real-time chunking, each chunk guided towards the actions still queued "
                          "(flow-matching heads)"),
    "rtc_max_guidance": (5.0, "chunking=rtc: the cap of the guidance weight (RTC's beta)"),
    "hold_dims": ([-1], "action dimensions the safe action keeps at their last command ([-1]: the suite's)"),
    "num_threads": (0, "torch threads (0: torch's default)"),
    "diagnostics_hz": (1.0, "rate of /diagnostics"),
    "autostart": (True, "start the loop at launch (else call ~/start)"),
    "log_bag": ("", "an MCAP file to log observations, actions, latency and faults"),
}

BRIDGE = {
    "suite": ("metaworld", "simulator suite"),
    "task": ("drawer-close-v3", "task of that suite"),
    "suite_options": ("{}", 'more suite settings, a JSON object (SIMPLER offline: {"asset_dir": "<bundle>"})'),
    "first_episode": (0, "index of the first episode (eval seed index)"),
    "camera_names": ([""], "cameras to render (default: the suite's)"),
    "image_size": (0, "image size in pixels (0: the suite's)"),
    "step_hz": (0.0, "simulator steps per second (0: the suite's real-time rate)"),
    "camera_hz": (0.0, "images published per second (0: every step up to 20 Hz)"),
    "max_steps": (0, "steps before an episode is cut off (0: the suite's)"),
    "auto_reset": (True, "start the next episode when one ends"),
    "start_on_command": (True, "wait for the first action command before stepping"),
    "command_timeout_s": (0.5, "hold the robot when no command arrived for this long"),
    "joint_state_topic": ("/joint_states", "where the robot state goes"),
    "instruction_topic": ("/instruction", "where the instruction goes (latched)"),
    "action_topic": ("/vla/action", "where action commands come from"),
    "action_type": ("joint_trajectory", "joint_trajectory | twist | float32_array"),
    "episode_topic": ("/sim/episode", "episode status as json (latched)"),
}


def declare(node: Node, table: dict) -> dict:
    """Declares every parameter of `table` with its description; -> name: value ("not set" lists as [])."""
    values = {}
    for name, (default, description) in table.items():
        value = node.declare_parameter(name, default, ParameterDescriptor(description=description)).value
        values[name] = [v for v in value if v != ""] if isinstance(value, list) else value
    return values
