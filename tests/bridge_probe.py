"""Drives the simulator bridge over real DDS from a test: start it in its own process, wait for every camera's
first frame and a state, publish one 7-D command until the episode has taken `steps` steps."""

from __future__ import annotations

import json
import random
import subprocess
import time


def drive_bridge(monkeypatch, parameters: dict, cameras: tuple[str, ...], command: list[float], steps: int = 20,
                 timeout_s: float = 90.0) -> tuple[dict, list, list, dict]:
    """-> (first image per camera, joint states, the first state, the last episode status)."""
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Float32MultiArray, String

    from vla_runtime.cli.robot import start_bridge
    from vla_runtime.ros.common import LATCHED, camera_topic

    monkeypatch.setenv("ROS_DOMAIN_ID", str(random.randint(1, 101)))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    bridge = start_bridge({"max_steps": 0, "action_type": "float32_array", "auto_reset": False, **parameters})
    rclpy.init()
    node = rclpy.create_node("bridge_probe")
    images, states, status = {}, [], {}
    for camera in cameras:
        node.create_subscription(Image, camera_topic(camera),
                                 lambda msg, camera=camera: images.setdefault(camera, msg), qos_profile_sensor_data)
    node.create_subscription(JointState, "/joint_states", states.append, qos_profile_sensor_data)
    node.create_subscription(String, "/sim/episode", lambda msg: status.update(json.loads(msg.data)), LATCHED)
    commands = node.create_publisher(Float32MultiArray, "/vla/action", 10)
    try:
        deadline = time.monotonic() + timeout_s
        while len(images) < len(cameras) or not states:  # the first frame, shown until the first command
            assert time.monotonic() < deadline and bridge.poll() is None, "no frame from the bridge"
            rclpy.spin_once(node, timeout_sec=0.1)
        first = states[-1]
        while status.get("step", 0) < steps:
            assert time.monotonic() < deadline, f"the bridge did not step: {status}"
            commands.publish(Float32MultiArray(data=command))
            rclpy.spin_once(node, timeout_sec=0.05)
    finally:
        node.destroy_node()
        rclpy.shutdown()
        bridge.terminate()
        try:
            bridge.wait(timeout=30)
        except subprocess.TimeoutExpired:  # seen once in CI for SIMPLER (SAPIEN's teardown): not what is tested
            bridge.kill()
            bridge.wait(timeout=30)
    return images, states, first, status
