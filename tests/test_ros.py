"""ROS 2 integration over real rclpy/DDS (loopback only, a random ROS_DOMAIN_ID per test module).

The bridge runs in its own process (as under `ros2 launch`), the control node with the shipped ref_dit
and a probe node in this one. One closed-loop episode; malformed images and joint states injected while
it runs; e-stop; the episode's MCAP bag read back. Then vla-robot killed with SIGKILL mid-episode.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="needs the [ros] extra")

from builtin_interfaces.msg import Time  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from vla_runtime.cli.robot import start_bridge  # noqa: E402
from vla_runtime.cli.tune import write_profile  # noqa: E402
from vla_runtime.data.messages import stamp_ns  # noqa: E402
from vla_runtime.data.rosbag import BagError, read_bag  # noqa: E402
from vla_runtime.evaluation.tuning import Candidate as TuneCandidate  # noqa: E402
from vla_runtime.ros.common import LATCHED, speed_up_thread_switching  # noqa: E402
from vla_runtime.ros.control_node import ControlNode  # noqa: E402
from vla_runtime.ros.messages import image_to_msg  # noqa: E402

CONTROL_HZ = 20.0
IMAGE_TOPIC = "/camera/corner4/image_raw"


@pytest.fixture(scope="module")
def ros_domain():
    """An isolated DDS domain: another test run on this machine cannot cross-talk."""
    saved = {key: os.environ.get(key) for key in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE")}
    os.environ["ROS_DOMAIN_ID"] = str(random.randint(1, 101))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    yield
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


class Probe:
    """A node that watches actions, diagnostics and the episode status, and injects bad messages."""

    def __init__(self, node):
        self.node = node
        self.actions: list[tuple[float, JointTrajectory]] = []  # (receive time, message)
        self.diagnostics: list[dict] = []
        self.episode: dict = {}
        node.create_subscription(JointTrajectory, "/vla/action",
                                 lambda m: self.actions.append((time.monotonic(), m)), 10)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        node.create_subscription(String, "/sim/episode", lambda m: setattr(self, "episode", json.loads(m.data)),
                                 LATCHED)
        self.images = node.create_publisher(Image, IMAGE_TOPIC, qos_profile_sensor_data)
        self.joint_states = node.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == "vla_runtime: vla_control":
                self.diagnostics.append({kv.key: kv.value for kv in status.values})

    def call(self, service: str) -> Trigger.Response:
        client = self.node.create_client(Trigger, service)
        assert client.wait_for_service(timeout_sec=10), f"{service} not available"
        future = client.call_async(Trigger.Request())
        wait_for(future.done, 10, f"{service} to answer")
        return future.result()


def test_closed_loop_episode_with_faults_estop_and_bag(ros_domain, tmp_path):
    speed_up_thread_switching()
    bag_path = tmp_path / "episode.mcap"
    bridge = start_bridge({"task": "drawer-close-v3", "max_steps": 60, "step_hz": CONTROL_HZ,
                           "auto_reset": False, "action_type": "joint_trajectory"})
    rclpy.init()
    executor = MultiThreadedExecutor(num_threads=2)
    control = None
    try:
        # A loaded CI machine can hold the node's callbacks back by more than the default 0.5 s: the malformed messages
        # below would then be counted as stale, not for what is wrong with them. The stale one is a minute old.
        control = ControlNode(parameter_overrides={"policy": "ref_dit", "control_hz": CONTROL_HZ, "num_threads": 1,
                                                   "log_bag": str(bag_path), "max_message_age_s": 5.0})
        probe = Probe(rclpy.create_node("probe"))
        executor.add_node(control)
        executor.add_node(probe.node)
        threading.Thread(target=executor.spin, daemon=True).start()

        # Closed loop: chunks from ref_dit reach the bridge as commands.
        wait_for(lambda: control.summary()["policy_calls"] >= 3 and len(probe.actions) >= 10, 120,
                 "ref_dit chunks published as actions")

        # Malformed inputs mid-episode: each one dropped and counted, actions keep flowing.
        actions_before = len(probe.actions)
        stamp = control.get_clock().now().to_msg()
        bad_size = image_to_msg(np.zeros((128, 128, 3), np.uint8), stamp, "corner4")
        bad_size.data = bad_size.data[:-7]
        bad_encoding = image_to_msg(np.zeros((128, 128, 3), np.uint8), stamp, "corner4")
        bad_encoding.encoding = "32FC1"
        nan_state = JointState(name=["hand_x", "hand_y", "hand_z", "gripper"], position=[0.0, float("nan"), 0.0, 1.0])
        nan_state.header.stamp = stamp
        short_state = JointState(position=[0.0, 0.6])
        short_state.header.stamp = stamp
        stale_image = image_to_msg(np.zeros((128, 128, 3), np.uint8), Time(sec=stamp.sec - 60), "corner4")
        # Well-formed, but not the 128x128 the policy's spec declares: a counted fault, not a failing policy call.
        wrong_resolution = image_to_msg(np.zeros((256, 256, 3), np.uint8), stamp, "corner4")
        for _ in range(2):  # best-effort QoS: repeat until each kind has been counted
            for msg in (bad_size, bad_encoding, stale_image, wrong_resolution):
                probe.images.publish(msg)
            for msg in (nan_state, short_state):
                probe.joint_states.publish(msg)
            time.sleep(0.2)
        wait_for(lambda: set(control.summary()["message_faults_by_reason"]) >= {"size", "encoding", "nan", "stale",
                                                                                "resolution"},
                 10, "every kind of bad message to be counted")
        wait_for(lambda: len(probe.actions) >= actions_before + 10, 20, "actions after the bad messages")
        assert control.summary()["state"] == "running" and control.summary()["policy_errors"] == 0

        # The episode runs to its end (success or the 60-step limit).
        wait_for(lambda: probe.episode.get("done"), 120, "the bridge to finish the episode")
        assert probe.episode["commands_received"] > 0

        # E-stop: no command is stamped later than one tick after the service answered.
        response = probe.call("/vla_control/estop")
        estopped_at_ns = control.get_clock().now().nanoseconds
        assert response.success, response.message
        published_at_estop = control.commands_published
        time.sleep(5 / CONTROL_HZ)
        assert control.commands_published == published_at_estop
        tick_ns = 1e9 / CONTROL_HZ
        late = [m for _, m in probe.actions if stamp_ns(m.header.stamp) > estopped_at_ns + tick_ns]
        assert late == []
        assert not probe.call("/vla_control/start").success  # latched until reset
        wait_for(lambda: probe.diagnostics and probe.diagnostics[-1]["state"] == "estopped", 5,
                 "diagnostics to report the e-stop")
        last = probe.diagnostics[-1]
        assert int(last["message_faults"]) >= 4 and int(last["policy_calls"]) >= 3
        assert probe.call("/vla_control/reset").success
        assert control.summary()["state"] == "idle"
    finally:
        executor.shutdown()
        if control is not None:
            control.destroy_node()  # closes the bag
        rclpy.try_shutdown()
        bridge.send_signal(signal.SIGINT)
        bridge.wait(timeout=20)

    messages = list(read_bag(bag_path))
    topics = {m.topic for m in messages}
    assert {IMAGE_TOPIC, "/joint_states", "/instruction", "/vla/action", "/vla_runtime/inference",
            "/vla_runtime/faults", "/diagnostics"} <= topics
    actions = [m for m in messages if m.topic == "/vla/action"]
    assert len(actions) == published_at_estop
    assert len(actions[0].message.points[0].positions) == 4
    faults = [m.message.status[0] for m in messages if m.topic == "/vla_runtime/faults"]
    assert {next(kv.value for kv in f.values if kv.key == "reason") for f in faults} >= {"size", "encoding", "nan"}
    instruction = next(m.message.data for m in messages if m.topic == "/instruction")
    assert instruction == "close the drawer"


def test_the_budget_governor_steps_down_a_ladder_from_a_tune_runs_front(ros_domain, tmp_path):
    """A budget no call can meet: after one window of calls the governor leaves the front's most faithful profile
    (no method) for the next (bac), and the node's policy then runs with it applied; with real-time chunking on,
    outermost on the head's step. The ladder is a vla-tune run's `front/` folder as vla-tune writes it."""
    front = tmp_path / "front"
    for index, methods in enumerate([{}, {"head_cache": {"mode": "bac", "updates": 4}}]):
        write_profile(front / f"{index:02d}_trial{index}.yaml", TuneCandidate(index, methods, 1.0, 1.0, 0.0, 1.0, 0.0))
    first, second = (str(path) for path in sorted(front.iterdir()))
    speed_up_thread_switching()
    rclpy.init()
    executor = MultiThreadedExecutor(num_threads=2)
    control = None
    try:
        control = ControlNode(parameter_overrides={
            "policy": "ref_dit", "control_hz": CONTROL_HZ, "num_threads": 1, "instruction": "close the drawer",
            "accel_ladder": [str(front)], "budget_ms": 1.0, "chunking": "rtc"})
        assert control.profiles.active == first and control.profiles.handle is None
        probe = Probe(rclpy.create_node("probe"))
        executor.add_node(control)
        executor.add_node(probe.node)
        threading.Thread(target=executor.spin, daemon=True).start()
        frame = np.full((128, 128, 3), 90, np.uint8)
        deadline = time.monotonic() + 120
        while control.profiles.active == first and time.monotonic() < deadline:
            stamp = control.get_clock().now().to_msg()
            probe.images.publish(image_to_msg(frame, stamp, "corner4"))
            state = JointState(position=[0.0, 0.6, 0.2, 1.0])
            state.header.stamp = stamp
            probe.joint_states.publish(state)
            time.sleep(1 / CONTROL_HZ)
        summary = control.summary()
        assert summary["profile"] == second, summary
        assert summary["profile_switches"][0]["from"] == first and summary["profile_switches"][0]["to"] == second
        assert summary["policy_calls"] >= 20  # one full governor window under the first
        assert control.profiles.handle is not None and control.profiles.handle.profile.methods == {
            "head_cache": {"mode": "bac", "updates": 4}}
        assert summary["policy_errors"] == 0 and control.loop.metrics.rtc_delays  # guided requests, none failed
    finally:
        executor.shutdown()
        if control is not None:
            control.destroy_node()
        rclpy.try_shutdown()


def test_vla_robot_killed_with_sigkill_leaves_a_readable_bag(ros_domain, tmp_path):
    bag_path, output = tmp_path / "robot.mcap", tmp_path / "vla-robot.log"
    with open(output, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "vla_runtime.cli.robot", f"log_bag={bag_path}", "control_hz=20", "max_steps=400"],
            start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    def chunks_logged() -> int:
        if not bag_path.exists():
            return 0
        count = 0
        try:
            for message in read_bag(bag_path, topics=["/vla_runtime/inference"]):
                count += message is not None
        except BagError:
            pass  # mid-write: the tail is incomplete
        return count

    try:
        wait_for(lambda: chunks_logged() >= 5 or process.poll() is not None, 180, "vla-robot to log 5 chunks")
        assert process.poll() is None, output.read_text()
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # vla-robot and its bridge, no chance to clean up
        process.wait(timeout=20)
    assert process.returncode == -signal.SIGKILL

    messages = []
    try:
        for message in read_bag(bag_path):
            messages.append(message)
    except BagError as error:  # a write cut short by the kill: named, and everything before it kept
        assert str(bag_path) in str(error)
    by_topic = {topic: [m for m in messages if m.topic == topic] for topic in {m.topic for m in messages}}
    assert len(by_topic["/vla_runtime/inference"]) >= 5
    assert by_topic[IMAGE_TOPIC][0].message.width == 128
    assert len(by_topic["/vla/action"]) >= 5
    assert Path(bag_path).stat().st_size > 0


def test_vla_robot_ends_cleanly_on_sigterm(ros_domain, tmp_path):
    """SIGTERM: the bag is closed (complete MCAP, no truncation), the bridge stopped, the summary printed."""
    bag_path, output = tmp_path / "robot.mcap", tmp_path / "vla-robot.log"
    with open(output, "w") as log:
        # policy= names a config group too; vla-robot takes it itself (hydra would refuse it).
        process = subprocess.Popen([sys.executable, "-m", "vla_runtime.cli.robot", "policy=ref_dit",
                                    f"log_bag={bag_path}", f"output_dir={tmp_path}"], start_new_session=True,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        # ~3 s of 20 Hz camera frames (49 KB each) after the first: the first chunks are out by then.
        wait_for(lambda: bag_path.exists() and bag_path.stat().st_size > 3_000_000 or process.poll() is not None,
                 180, "vla-robot to log")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, output.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    messages = list(read_bag(bag_path))  # raises on a truncated file
    assert any(m.topic == "/vla/action" for m in messages), output.read_text()
    summary = json.loads((tmp_path / "robot.json").read_text())
    assert summary["command"].endswith("policy=ref_dit")
    # The summary is taken just before the loop stops: the log holds at least those commands.
    assert 0 < summary["control"]["commands_published"] <= sum(m.topic == "/vla/action" for m in messages)
    assert "ticks" in output.read_text()
    bridges = subprocess.run(["pgrep", "-s", str(process.pid), "-f", "vla_runtime.ros.sim_bridge"],
                             capture_output=True, text=True)
    assert bridges.stdout.strip() == ""  # no bridge left running in the session


# How each is started: what a terminal's Ctrl-C reaches is a process group.
LAUNCHES = {
    "ros2 launch": [[sys.executable, "-m", "vla_runtime.ros.sim_bridge", "--ros-args", "-p", "step_hz:=20.0"],
                    [sys.executable, "-m", "vla_runtime.ros.control_node", "--ros-args", "-p", "suite:=metaworld",
                     "-p", "control_hz:=20.0", "-p", "num_threads:=1"]],
    "vla-robot": [[sys.executable, "-m", "vla_runtime.cli.robot"]],  # the bridge is its child, in its group
}


@pytest.mark.parametrize("launch", LAUNCHES)
def test_ctrl_c_ends_every_node_with_status_0_and_no_traceback(ros_domain, tmp_path, launch):
    """Ctrl-C is SIGINT to every process of the terminal's group; then the launcher sends each node it started
    one of its own (ros2 launch each node, vla-robot its bridge), and an impatient user presses Ctrl-C again:
    interrupts arrive at every stage of a node's shutdown, down to the interpreter's teardown."""
    rclpy.init()
    probe = rclpy.create_node("ctrl_c_probe")
    actions = []
    probe.create_subscription(JointTrajectory, "/vla/action", actions.append, 10)
    logs = [tmp_path / f"process_{i}.log" for i in range(len(LAUNCHES[launch]))]
    processes = []
    try:
        for command, log in zip(LAUNCHES[launch], logs, strict=True):
            with open(log, "w") as stderr:
                processes.append(subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                                                  stderr=stderr))
        deadline = time.monotonic() + 120
        while len(actions) < 5:  # the loop runs: the policy's actions reach the bridge
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), \
                [log.read_text() for log in logs]
            rclpy.spin_once(probe, timeout_sec=0.1)
        deadline = time.monotonic() + 30
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):  # that group has ended
                    os.killpg(process.pid, signal.SIGINT)
            time.sleep(0.05)
        codes = [process.wait(timeout=1) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        probe.destroy_node()
        rclpy.try_shutdown()
    stderr = "\n".join(log.read_text() for log in logs)
    assert codes == [0] * len(processes) and "Traceback" not in stderr, stderr


def test_bridge_suite_options_and_camera_topics():
    """The bridge's suite settings arrive as a JSON object (one-line errors otherwise); camera names that
    start with a digit (SIMPLER's) still make legal ROS topic names."""
    from vla_runtime.ros import node_parameters, robot_defaults
    from vla_runtime.ros.common import camera_topic, suite_options

    assert suite_options('{"asset_dir": "bundle.tgz"}') == {"asset_dir": "bundle.tgz"} and suite_options("") == {}
    # vla-robot 'suite_options={asset_dir: bundle.tgz}' arrives parsed by hydra: both nodes get it as JSON.
    control, bridge = node_parameters({**robot_defaults(), "suite_options": {"asset_dir": "bundle.tgz"}})
    for node in (control, bridge):
        assert suite_options(node["suite_options"]) == {"asset_dir": "bundle.tgz"}
    with pytest.raises(ValueError, match="suite_options is not JSON"):
        suite_options("{asset_dir: x}")
    with pytest.raises(ValueError, match="must be a JSON object"):
        suite_options('["bundle.tgz"]')
    assert camera_topic("corner4") == "/camera/corner4/image_raw"
    assert camera_topic("3rd_view_camera") == "/camera/camera_3rd_view_camera/image_raw"
