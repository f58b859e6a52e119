"""The ROS parameters of the nodes: one typed, frozen dataclass per node (`ControlParams`, `BridgeParams`)
whose fields are the parameters, each with its default and the description `ros2 param describe` prints.

The node declares them once and reads attributes from then on. Lists are tuples. A field that may be left
unset is `X | None = None`, declared with its ROS type and no value (ROS has no typed empty list, and an
unset field must be told apart from any value), and reads back as its default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.parameter import Parameter

P = TypeVar("P")
SCALARS = {str: Parameter.Type.STRING, bool: Parameter.Type.BOOL, int: Parameter.Type.INTEGER,
           float: Parameter.Type.DOUBLE}
ARRAYS = {str: Parameter.Type.STRING_ARRAY, bool: Parameter.Type.BOOL_ARRAY, int: Parameter.Type.INTEGER_ARRAY,
          float: Parameter.Type.DOUBLE_ARRAY}


def parameter(default: Any, description: str) -> Any:
    """A dataclass field that is a ROS parameter."""
    return dataclasses.field(default=default, metadata={"description": description})


@dataclass(frozen=True)
class ControlParams:
    policy: str = parameter("ref_dit", "registered policy name")
    checkpoint: str = parameter("", "checkpoint directory of that policy ('': the shipped one)")
    policy_options: str = parameter("{}", 'more settings of that policy, a JSON object (policy=remote: '
                                          '{"url": "ws://gpu:8000"})')
    suite: str = parameter("", "a simulator suite, only when one is wanted ('': none): its expert episodes calibrate "
                               "acceleration profiles the checkpoint ships no calibration artifact for, random-weight "
                               "policies are shaped for its robot, and its robot gives the contract fields that the "
                               "parameters and robot_file leave out")
    suite_options: str = parameter("{}", 'more settings of that suite, a JSON object (SIMPLER offline: '
                                         '{"asset_dir": "<bundle>"})')
    robot_file: str = parameter("", "a YAML or JSON file with the robot contract: action_low, action_high, hold_dims, "
                                    "state_dim, control_hz, each optional; the parameters of those names override it")
    action_low: tuple[float, ...] | None = parameter(None, "lowest command of each action dimension; their number is "
                                                           "the robot's action dimension (unset: the robot file's, "
                                                           "else the suite's, else -1.0 in each of the policy's)")
    action_high: tuple[float, ...] | None = parameter(None, "highest command of each action dimension (unset: the "
                                                            "robot file's, else the suite's, else 1.0)")
    hold_dims: tuple[int, ...] | None = parameter(None, "action dimensions the safe action keeps at their last "
                                                        "command, e.g. a gripper (unset: the robot file's, else the "
                                                        "suite's, else none)")
    state_dim: int | None = parameter(None, "dimension of the robot's state, checked against the policy's (unset: the "
                                            "robot file's, else the suite's, else not checked)")
    control_hz: float | None = parameter(None, "control ticks per second (unset: the robot file's, else the suite's "
                                               "real-time rate, else the rate the policy declares)")
    accel: str = parameter("none", "acceleration profile(s), '+'-joined")
    accel_ladder: tuple[str, ...] = parameter((), "profiles the budget governor picks from, most faithful first "
                                                  "(needs budget_ms); a folder stands for its profile files in name "
                                                  "order, e.g. a vla-tune run's <output_dir>/front")
    calibration_dir: str = parameter("", "where acceleration methods find and keep their calibration artifacts "
                                         "(default: the checkpoint's calibration folder; a vla-tune run's front: its "
                                         "<output_dir>/calibration)")
    exec: str = parameter("eager", "execution backend: eager | compile | cuda_graphs; every profile the node may use "
                                   "is compiled (warmed up on the calibration frames) before its loop starts")
    budget_ms: float = parameter(0.0, "latency budget per policy call (0: none)")
    camera_names: tuple[str, ...] = parameter((), "cameras the policy reads (default: its spec's)")
    image_topics: tuple[str, ...] = parameter((), "one topic per camera (default: ros.common.camera_topic: "
                                                  "/camera/<name>/image_raw)")
    resize_images: bool = parameter(False, "cut full frames to the policy's image crop and resize them to its image "
                                           "size instead of rejecting them (reason 'resolution')")
    joint_state_topic: str = parameter("/joint_states", "sensor_msgs/JointState with the robot state")
    joint_names: tuple[str, ...] = parameter((), "order of the state's joints (default: as sent)")
    instruction_topic: str = parameter("/instruction", "std_msgs/String with the instruction (latched)")
    instruction: str = parameter("", "the instruction until one arrives on instruction_topic")
    action_topic: str = parameter("/vla/action", "where actions go, one per tick")
    action_type: str = parameter("joint_trajectory", "joint_trajectory | twist | float32_array")
    action_names: tuple[str, ...] = parameter((), "joint names of the action (default: action_<i>)")
    max_message_age_s: float = parameter(0.5, "messages stamped further from now are dropped (reason 'stale'; 0: off)")
    stale_observation_s: float = parameter(0.5, "watchdog: hold the robot when the newest observation is older")
    request_when: str = parameter("asap", "asap: ask for the next chunk as soon as the latency allows (one request "
                                          "in flight: as soon as the previous one lands), at the latest as latency "
                                          "would; latency: when the queue lasts less than the predicted latency, or "
                                          "at request_threshold (a floor); count: only at request_threshold")
    request_threshold: int = parameter(-1, "ask when this many actions are left (-1: once the policy's executed "
                                           "horizon ran)")
    execute_horizon: int = parameter(0, "actions of each chunk queued (0: all; late ones are dropped)")
    chunking: str = parameter("auto", "naive | rtc: real-time chunking, each chunk guided towards the actions still "
                                      "queued (flow-matching heads) | rtc_trained: a policy trained for it continues "
                                      "them | auto: rtc_trained for a policy trained for it, else naive")
    max_in_flight: int = parameter(0, "requests in flight at once (pipelining; 0: what the policy computes at once, "
                                      "1 for a model in this process, a vla-serve's slots for policy=remote)")
    rtc_max_guidance: float = parameter(5.0, "chunking=rtc: the cap of the guidance weight (RTC's beta)")
    num_threads: int = parameter(0, "torch threads (0: torch's default)")
    diagnostics_hz: float = parameter(1.0, "rate of /diagnostics")
    autostart: bool = parameter(True, "start the loop at launch (else call ~/start)")
    log_bag: str = parameter("", "an MCAP file to log observations, actions, latency and faults")


@dataclass(frozen=True)
class BridgeParams:
    suite: str = parameter("metaworld", "simulator suite")
    task: str = parameter("drawer-close-v3", "task of that suite")
    suite_options: str = parameter("{}", 'more suite settings, a JSON object (SIMPLER offline: '
                                         '{"asset_dir": "<bundle>"})')
    first_episode: int = parameter(0, "index of the first episode (eval seed index)")
    camera_names: tuple[str, ...] = parameter((), "cameras to render (default: the suite's)")
    image_size: int = parameter(0, "image size in pixels (0: the suite's)")
    step_hz: float = parameter(0.0, "simulator steps per second (0: the suite's real-time rate)")
    camera_hz: float = parameter(0.0, "images published per second (0: every step up to 20 Hz)")
    max_steps: int = parameter(0, "steps before an episode is cut off (0: the suite's)")
    auto_reset: bool = parameter(True, "start the next episode when one ends")
    start_on_command: bool = parameter(True, "wait for the first action command before stepping")
    command_timeout_s: float = parameter(0.5, "hold the robot when no command arrived for this long")
    joint_state_topic: str = parameter("/joint_states", "where the robot state goes")
    instruction_topic: str = parameter("/instruction", "where the instruction goes (latched)")
    action_topic: str = parameter("/vla/action", "where action commands come from")
    action_type: str = parameter("joint_trajectory", "joint_trajectory | twist | float32_array")
    episode_topic: str = parameter("/sim/episode", "episode status as json (latched)")


def ros_type(hint: Any) -> Parameter.Type:
    """The ROS type of a field annotated str, bool, int, float or tuple[X, ...], each maybe `| None`."""
    if isinstance(hint, types.UnionType):
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is tuple:
        return ARRAYS[typing.get_args(hint)[0]]
    return SCALARS[hint]


def field_types(params: type) -> dict[str, Parameter.Type]:
    """name -> ROS type of every field of a parameter dataclass."""
    return {name: ros_type(hint) for name, hint in typing.get_type_hints(params).items()}


def declare(node: Node, params: type[P]) -> P:
    """Declares every field of `params` as a parameter of `node`; -> their values. "" in a list of strings is
    dropped: [""] is how a launch file or a YAML override says "no names"."""
    kinds = field_types(params)
    values = {}
    for field in dataclasses.fields(params):
        kind, default = kinds[field.name], field.default
        unset = default is None or default == ()
        initial = kind if unset else list(default) if isinstance(default, tuple) else default
        value = node.declare_parameter(field.name, initial,
                                       ParameterDescriptor(description=field.metadata["description"])).value
        if value is None:
            values[field.name] = default
        elif kind.name.endswith("_ARRAY"):
            values[field.name] = tuple(v for v in value if v != "")
        else:
            values[field.name] = value
    return params(**values)


def as_parameters(overrides: dict, params: type) -> list[Parameter]:
    """Parameter overrides from Python values, typed by the fields of `params`: an integer where a float is due
    becomes a float (20 for 20.0); an empty list becomes [""], which `declare` reads as empty (rclpy types an
    override by its value, and an empty list has no type)."""
    kinds = field_types(params)
    result = []
    for name, value in overrides.items():
        kind = kinds.get(name)
        value = list(value) if isinstance(value, tuple) else value
        if value == []:
            if kind not in (None, Parameter.Type.STRING_ARRAY):
                raise ValueError(f"{name}: ROS cannot pass an empty list of numbers as a parameter; write "
                                 f"'{name}: []' in a robot_file")
            value = [""]
        elif kind == Parameter.Type.DOUBLE and _is_int(value):
            value = float(value)
        elif kind == Parameter.Type.DOUBLE_ARRAY and isinstance(value, list):
            value = [float(v) if _is_int(v) else v for v in value]
        result.append(Parameter(name, value=value))
    return result


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
