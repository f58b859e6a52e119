"""What the ROS 2 nodes share: QoS, service answers, signals, the process entry point."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable

import rclpy
import rclpy.exceptions
import rclpy.executors
from rclpy._rclpy_pybind11 import RCLError
from rclpy.node import Node
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


def answer_trigger(handler: Callable[[], str], response):
    """A std_srvs/Trigger answer from `handler`: its message, or the error it raised."""
    try:
        response.message, response.success = handler(), True
    except Exception as exc:  # a service call must answer, not take the node down
        response.message, response.success = f"{type(exc).__name__}: {exc}", False
    return response


def init_ros(args: list[str] | None) -> threading.Event:
    """rclpy.init with SIGINT and SIGTERM as a request to stop; -> the event to set once the node runs.

    A terminal's Ctrl-C reaches every process of its group, and a launcher (ros2 launch, vla-robot) then sends
    its own SIGINT to the nodes it started: a node gets two, the second while it cleans up. rclpy's handler
    shuts ROS down and then calls Python's; that one raises KeyboardInterrupt only while the node is being
    built (a slow start can be cut short), never once it runs, so the cleanup finishes and the exit is 0.
    """
    running = threading.Event()

    def on_signal(signum: int, frame) -> None:
        if not running.is_set():
            raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)  # before rclpy.init: rclpy's handlers call the ones they replace
    rclpy.init(args=args)
    return running


def shutdown_ros() -> None:
    """rclpy.try_shutdown, then SIGINT and SIGTERM ignored: the node is done, and an interrupt that arrived during
    the interpreter's own teardown (which gives Python's handlers back to the default) would end the process by
    the signal instead of with its status."""
    rclpy.try_shutdown()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def spin_until_shutdown(spin: Callable[[], object]) -> None:
    """`spin()` (an executor's) until ROS shuts down. A signal shuts the context down at any moment, also between
    the executor's check of it and its next wait set, which then raises instead of returning."""
    try:
        spin()
    except rclpy.executors.ExternalShutdownException:
        pass
    except RCLError:
        if rclpy.ok():
            raise


def spin_node(node_class: Callable[[], Node], args: list[str] | None = None) -> None:
    """Run one node until SIGINT/SIGTERM (exit 0); a bad parameter ends it with one line naming it (exit 2)."""
    running = init_ros(args)
    try:
        node = node_class()
        running.set()
    except KeyboardInterrupt:  # stopped before it ran
        shutdown_ros()
        return
    except (ValueError, FileNotFoundError, rclpy.exceptions.InvalidParameterTypeException) as exc:
        hint = " (write floats with a decimal point: 20.0)" if "expecting type 'DOUBLE" in str(exc) else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        rclpy.try_shutdown()
        sys.exit(2)
    try:
        spin_until_shutdown(lambda: rclpy.spin(node))
    finally:
        node.destroy_node()
        shutdown_ros()


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
