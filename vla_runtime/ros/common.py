"""What the ROS 2 nodes share: QoS, parameter overrides, service answers, the process entry point."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import rclpy
import rclpy.exceptions
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSDurabilityPolicy, QoSProfile

# Latched: a late-joining node still gets the current instruction / episode status.
LATCHED = QoSProfile(depth=1, durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)


def camera_topic(camera: str) -> str:
    """A camera's default image topic. A ROS name token cannot start with a digit, so SIMPLER's
    `3rd_view_camera` publishes on /camera/camera_3rd_view_camera/image_raw."""
    token = f"camera_{camera}" if camera[:1].isdigit() else camera
    return f"/camera/{token}/image_raw"


def speed_up_thread_switching() -> None:
    """The policy thread gives up the GIL for every torch op; with Python's default 5 ms switch interval
    it may wait that long behind a message callback each time (benchmarks/ros/ros_threads.md: p95 of a
    ref_dit call 105-109 ms at 0.5 ms against 141-235 ms at 5 ms)."""
    sys.setswitchinterval(0.0005)


def as_parameters(overrides: dict) -> list[Parameter]:
    # An empty list has no ROS parameter type; [""] is how the nodes spell "not set".
    return [Parameter(name, value=[""] if value == [] else value) for name, value in overrides.items()]


def answer_trigger(handler: Callable[[], str], response):
    """A std_srvs/Trigger answer from `handler`: its message, or the error it raised."""
    try:
        response.message, response.success = handler(), True
    except Exception as exc:  # a service call must answer, not take the node down
        response.message, response.success = f"{type(exc).__name__}: {exc}", False
    return response


def spin_node(node_class: Callable[[], Node], args: list[str] | None = None) -> None:
    """Run one node until SIGINT/SIGTERM; a bad parameter ends it with one line naming it (exit 2)."""
    rclpy.init(args=args)
    try:
        node = node_class()
    except (ValueError, FileNotFoundError, rclpy.exceptions.InvalidParameterTypeException) as exc:
        hint = " (write floats with a decimal point: 20.0)" if "expecting type 'DOUBLE'" in str(exc) else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        rclpy.try_shutdown()
        sys.exit(2)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def json_object(text: str, parameter: str, what: str) -> dict:
    """A parameter holding a JSON object of `what`."""
    try:
        options = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{parameter} is not JSON ({exc}): {text!r}") from exc
    if not isinstance(options, dict):
        raise ValueError(f"{parameter} must be a JSON object of {what}, got {text!r}")
    return options


def suite_options(text: str) -> dict:
    """The `suite_options` parameter: a JSON object of suite settings."""
    return json_object(text, "suite_options", "suite settings")
