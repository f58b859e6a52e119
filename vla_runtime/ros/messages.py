"""Arrays -> ROS 2 messages (rclpy's message classes); the readers, which need no ROS, are in
`vla_runtime.data.messages`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import numpy as np

from vla_runtime.data.messages import ACTION_TYPE_NAMES

if TYPE_CHECKING:
    from builtin_interfaces.msg import Time
    from sensor_msgs.msg import Image, JointState


def action_message_class(kind: str) -> type:
    if kind not in ACTION_TYPE_NAMES:
        raise ValueError(f"Unknown action_type '{kind}'; use one of {sorted(ACTION_TYPE_NAMES)}")
    package, _, name = ACTION_TYPE_NAMES[kind].split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def image_to_msg(image: np.ndarray, stamp: Time, frame_id: str) -> Image:
    from sensor_msgs.msg import Image

    height, width, _ = image.shape
    msg = Image(height=height, width=width, encoding="rgb8", is_bigendian=0, step=width * 3)
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.data = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    return msg


def state_to_joint_state(state: np.ndarray, names: list[str], stamp: Time) -> JointState:
    from sensor_msgs.msg import JointState

    msg = JointState(name=list(names), position=[float(x) for x in state])
    msg.header.stamp = stamp
    return msg


def action_to_msg(kind: str, action: np.ndarray, stamp: Time, names: list[str], period_s: float):
    """One action as the configured message type. `twist`: dims 0-2 linear, 3-5 angular (at most 6)."""
    from builtin_interfaces.msg import Duration
    from geometry_msgs.msg import TwistStamped
    from std_msgs.msg import Float32MultiArray, MultiArrayDimension
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    values = [float(x) for x in action]
    if kind == "joint_trajectory":
        msg = JointTrajectory(joint_names=list(names))
        msg.header.stamp = stamp
        nanoseconds = int(period_s * 1e9)
        msg.points = [JointTrajectoryPoint(positions=values, time_from_start=Duration(
            sec=nanoseconds // 1_000_000_000, nanosec=nanoseconds % 1_000_000_000))]
        return msg
    if kind == "twist":
        if len(values) > 6:
            raise ValueError(f"action_type=twist carries at most 6 dimensions; the policy outputs {len(values)}")
        padded = values + [0.0] * (6 - len(values))
        msg = TwistStamped()
        msg.header.stamp = stamp
        msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = padded[:3]
        msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = padded[3:]
        return msg
    if kind == "float32_array":
        msg = Float32MultiArray(data=values)
        msg.layout.dim = [MultiArrayDimension(label="action", size=len(values), stride=len(values))]
        return msg
    raise ValueError(f"Unknown action_type '{kind}'; use one of {sorted(ACTION_TYPE_NAMES)}")
