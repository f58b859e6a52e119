"""ROS 2 messages -> arrays, with the validation the control node applies to every incoming message.

A message that fails validation raises `MessageRejected` with a short `reason` (the key it is counted
under in diagnostics) and a detail that names what was wrong. These readers only read attributes, so they
take rclpy messages and messages decoded from bags alike and need no ROS install (vla-replay reads bags
with them); the writers live in `vla_runtime.ros.messages`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vla_runtime.types import ImageCrop, crop_frame

if TYPE_CHECKING:
    from builtin_interfaces.msg import Time
    from sensor_msgs.msg import Image, JointState

CHANNELS = {"rgb8": 3, "bgr8": 3, "mono8": 1}
# The ROS type of each action message kind
ACTION_TYPE_NAMES = {"joint_trajectory": "trajectory_msgs/msg/JointTrajectory",
                     "twist": "geometry_msgs/msg/TwistStamped", "float32_array": "std_msgs/msg/Float32MultiArray"}


class MessageRejected(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def stamp_ns(stamp: Time) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def check_stamp(stamp: Time, now_ns: int, max_age_s: float, what: str) -> None:
    """A stamp older than `max_age_s` (or that far in the future: another clock) is stale; 0 disables."""
    if max_age_s <= 0:
        return
    age_s = (now_ns - stamp_ns(stamp)) / 1e9
    if abs(age_s) > max_age_s:
        raise MessageRejected("stale", f"{what} stamp is {age_s:+.3f} s from now (limit {max_age_s} s)")


def image_from_msg(msg: Image) -> np.ndarray:
    """uint8 [H, W, 3] RGB from an rgb8 / bgr8 / mono8 image."""
    if msg.encoding not in CHANNELS:
        raise MessageRejected("encoding", f"image encoding '{msg.encoding}' is not one of {sorted(CHANNELS)}")
    channels = CHANNELS[msg.encoding]
    height, width, step = msg.height, msg.width, msg.step
    if height == 0 or width == 0:
        raise MessageRejected("size", f"image is {width}x{height}")
    if step < width * channels:
        raise MessageRejected("size", f"image step {step} < width {width} * {channels} channels")
    if len(msg.data) != step * height:
        raise MessageRejected("size", f"image data has {len(msg.data)} bytes, expected step {step} * height "
                                      f"{height} = {step * height}")
    rows = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(height, step)
    pixels = rows[:, : width * channels].reshape(height, width, channels)
    if msg.encoding == "bgr8":
        pixels = pixels[..., ::-1]
    elif msg.encoding == "mono8":
        pixels = np.repeat(pixels, 3, axis=2)
    return np.array(pixels)  # a writable copy: the message's buffer is read-only


def fit_image(image: np.ndarray, size: tuple[int, int], resize: bool, crop: ImageCrop | None = None) -> np.ndarray:
    """`image` at (height, width) `size`: as it is (a frame at the policy's size is its input already, as a
    simulator bridge renders it), or, when `resize`, the camera's full frame cut to the policy's `crop` and resized
    (bilinear); else rejected for its resolution (a well-formed frame at the wrong size would make every policy
    call fail)."""
    if image.shape[:2] == tuple(size):
        return image
    if not resize:
        raise MessageRejected("resolution", f"image is {image.shape[1]}x{image.shape[0]}, the policy needs "
                                            f"{size[1]}x{size[0]} (set resize_images to resize)")
    from PIL import Image as PILImage

    image = np.ascontiguousarray(crop_frame(image, crop))
    return np.asarray(PILImage.fromarray(image).resize((size[1], size[0]), PILImage.BILINEAR))


def state_from_joint_state(msg: JointState, names: list[str], expected_dim: int | None) -> np.ndarray:
    """Positions as float32 [S]; ordered by `names` when given, else as sent."""
    positions = np.asarray(msg.position, dtype=np.float64)
    if names:
        missing = [name for name in names if name not in msg.name]
        if missing or len(msg.name) != len(positions):
            raise MessageRejected("joint_names", f"joint state lacks joints {missing} (has {list(msg.name)}) "
                                                 f"or names/positions differ in length")
        positions = positions[[list(msg.name).index(name) for name in names]]
    if expected_dim is not None and len(positions) != expected_dim:
        raise MessageRejected("size", f"joint state has {len(positions)} positions, the policy needs {expected_dim}")
    if not np.all(np.isfinite(positions)):
        raise MessageRejected("nan", f"joint state positions contain NaN/Inf: {positions.tolist()}")
    return positions.astype(np.float32)


def action_from_msg(kind: str, msg, action_dim: int) -> np.ndarray:
    if kind not in ACTION_TYPE_NAMES:
        raise ValueError(f"Unknown action_type '{kind}'; use one of {sorted(ACTION_TYPE_NAMES)}")
    if kind == "joint_trajectory":
        if not msg.points:
            raise MessageRejected("size", "joint trajectory has no points")
        values = list(msg.points[0].positions)
    elif kind == "twist":
        linear, angular = msg.twist.linear, msg.twist.angular
        values = [linear.x, linear.y, linear.z, angular.x, angular.y, angular.z][:action_dim]
    else:
        values = list(msg.data)
    action = np.asarray(values, dtype=np.float64)
    if len(action) != action_dim:
        raise MessageRejected("size", f"action has {len(action)} values, expected {action_dim}")
    if not np.all(np.isfinite(action)):
        raise MessageRejected("nan", f"action contains NaN/Inf: {action.tolist()}")
    return action
