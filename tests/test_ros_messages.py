"""ROS 2 message conversion and validation, the launch description, and the ROS 2 install layout."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="needs the [ros] extra")

from builtin_interfaces.msg import Time  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402

from vla_runtime.control import inference  # noqa: E402
from vla_runtime.data.messages import (  # noqa: E402
    MessageRejected,
    action_from_msg,
    check_stamp,
    fit_image,
    image_from_msg,
    state_from_joint_state,
)
from vla_runtime.ros import LAUNCH_ARGUMENTS, node_parameters, robot_defaults  # noqa: E402
from vla_runtime.ros.messages import action_to_msg, image_to_msg  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def rgb_image(height: int = 4, width: int = 5) -> np.ndarray:
    return np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)


def test_image_round_trip_and_encodings():
    image = rgb_image()
    msg = image_to_msg(image, Time(sec=1), "cam")
    np.testing.assert_array_equal(image_from_msg(msg), image)
    bgr = Image(height=4, width=5, encoding="bgr8", step=15, data=image[..., ::-1].tobytes())
    np.testing.assert_array_equal(image_from_msg(bgr), image)
    mono = Image(height=4, width=5, encoding="mono8", step=8, data=np.zeros((4, 8), np.uint8).tobytes())
    assert image_from_msg(mono).shape == (4, 5, 3)  # row padding (step 8 > width 5) is skipped


@pytest.mark.parametrize("changes, reason, words", [
    ({"encoding": "rgba16"}, "encoding", "rgba16"),
    ({"data": b"\0" * 59}, "size", "59 bytes"),
    ({"step": 10}, "size", "step 10"),
    ({"width": 0}, "size", "0x4"),
])
def test_malformed_images_are_rejected_with_the_reason(changes, reason, words):
    msg = image_to_msg(rgb_image(), Time(sec=1), "cam")
    for field, value in changes.items():
        setattr(msg, field, value)
    with pytest.raises(MessageRejected, match=words) as error:
        image_from_msg(msg)
    assert error.value.reason == reason


def test_a_frame_at_the_wrong_resolution_is_rejected_or_resized():
    frame = np.zeros((256, 256, 3), np.uint8)
    frame[:128] = 200
    with pytest.raises(MessageRejected, match="256x256, the policy needs 128x128") as rejected:
        fit_image(frame, (128, 128), resize=False)
    assert rejected.value.reason == "resolution"
    resized = fit_image(frame, (128, 128), resize=True)
    assert resized.shape == (128, 128, 3) and resized.dtype == np.uint8
    assert resized[:60].min() == 200 and resized[68:].max() == 0
    assert fit_image(resized, (128, 128), resize=False) is resized


def test_a_failing_policy_is_logged_once_per_interval(caplog):
    warn = inference._ThrottledWarning(interval_s=3600)
    with caplog.at_level("WARNING", logger=inference.log.name):
        for _ in range(50):
            warn("ValueError: bad image")
    assert len(caplog.records) == 1 and "bad image" in caplog.records[0].getMessage()
    warn._last_s -= 3600  # the interval has passed: one line, with the count of what was not logged
    with caplog.at_level("WARNING", logger=inference.log.name):
        warn("ValueError: bad image")
    assert len(caplog.records) == 2 and "49 more failures" in caplog.records[1].getMessage()


def test_joint_state_validation():
    msg = JointState(name=["b", "a"], position=[2.0, 1.0])
    np.testing.assert_array_equal(state_from_joint_state(msg, ["a", "b"], 2), [1.0, 2.0])
    with pytest.raises(MessageRejected, match="lacks joints \\['c'\\]"):
        state_from_joint_state(msg, ["a", "c"], None)
    with pytest.raises(MessageRejected, match="needs 4") as error:
        state_from_joint_state(msg, [], 4)
    assert error.value.reason == "size"
    with pytest.raises(MessageRejected, match="NaN") as error:
        state_from_joint_state(JointState(position=[0.0, float("nan")]), [], 2)
    assert error.value.reason == "nan"


def test_stale_and_future_stamps_are_rejected():
    now = 10_000_000_000
    check_stamp(Time(sec=9, nanosec=800_000_000), now, 0.5, "image")
    for stamp in (Time(sec=9), Time(sec=11)):
        with pytest.raises(MessageRejected, match="limit 0.5 s"):
            check_stamp(stamp, now, 0.5, "image")
    check_stamp(Time(sec=0), now, 0.0, "image")  # 0 disables the check


@pytest.mark.parametrize("kind", ["joint_trajectory", "twist", "float32_array"])
def test_action_messages_round_trip(kind):
    action = np.array([0.1, -0.2, 0.3, 1.0])
    msg = action_to_msg(kind, action, Time(sec=1), ["x", "y", "z", "g"], 0.05)
    np.testing.assert_allclose(action_from_msg(kind, msg, 4), action, atol=1e-6)
    wrong_dim = 7 if kind == "twist" else 3  # a twist always carries 6 numbers
    with pytest.raises(MessageRejected, match=f"expected {wrong_dim}"):
        action_from_msg(kind, msg, wrong_dim)


def test_twist_refuses_actions_it_cannot_carry():
    with pytest.raises(ValueError, match="at most 6"):
        action_to_msg("twist", np.zeros(7), Time(), [], 0.05)


def _stub_launch_modules(monkeypatch) -> None:
    """`launch` / `launch_ros` are not on the package index: record what the launch file builds."""

    class Recorded:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    modules = {
        "launch": {"LaunchDescription": Recorded},
        "launch.actions": {"DeclareLaunchArgument": Recorded},
        "launch.conditions": {"IfCondition": Recorded},
        "launch.substitutions": {"LaunchConfiguration": Recorded},
        "launch_ros": {},
        "launch_ros.actions": {"Node": Recorded},
        "launch_ros.parameter_descriptions": {"ParameterValue": Recorded},
    }
    for name, attributes in modules.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attributes))


def test_launch_file_starts_both_nodes_with_the_parameters_vla_robot_uses(monkeypatch):
    _stub_launch_modules(monkeypatch)
    spec = importlib.util.spec_from_file_location("robot_launch", REPO / "launch" / "robot.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    actions = description.args[0]
    arguments = {a.args[0]: a.kwargs["default_value"] for a in actions if "default_value" in a.kwargs}
    descriptions = {a.args[0]: a.kwargs["description"] for a in actions if "default_value" in a.kwargs}
    assert set(descriptions) == set(LAUNCH_ARGUMENTS) and all(len(text) > 10 for text in descriptions.values())
    nodes = {a.kwargs["executable"]: a.kwargs for a in actions if "executable" in a.kwargs}
    defaults = robot_defaults()
    assert arguments["policy"] == defaults["policy"] and arguments["use_sim"] == "true"
    control, bridge = node_parameters(defaults)
    for executable, expected in (("control_node", control), ("sim_bridge", bridge)):
        node = nodes[executable]
        assert node["package"] == "vla_runtime"
        launched, extra = node["parameters"]
        # Each launched parameter is the launch argument of the same name (step_hz: control_hz).
        names = {name: value.args[0].args[0] for name, value in launched.items()}
        assert set(names) | set(extra) == set(expected)
        assert all(arg == name or (name, arg) == ("step_hz", "control_hz") for name, arg in names.items())
    assert nodes["sim_bridge"]["condition"].args[0].args[0] == "use_sim"


def test_wheel_installs_the_ros2_package_layout(tmp_path, monkeypatch):
    """What `ros2 launch vla_runtime robot.launch.py` needs under the install prefix."""
    wheel_dir, prefix = tmp_path / "wheel", tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(wheel_dir), str(REPO)], check=True, capture_output=True)
    # --ignore-installed: without it pip would uninstall the developer's own install of vla-runtime first.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                    "--prefix", str(prefix), str(next(wheel_dir.glob("*.whl")))], check=True, capture_output=True)
    from ament_index_python.packages import get_package_prefix, get_package_share_directory

    monkeypatch.setenv("AMENT_PREFIX_PATH", str(prefix))
    assert Path(get_package_prefix("vla_runtime")) == prefix
    share = Path(get_package_share_directory("vla_runtime"))
    assert (share / "package.xml").is_file() and (share / "launch" / "robot.launch.py").is_file()
    executable = prefix / "lib" / "vla_runtime" / "control_node"
    assert os.access(executable, os.X_OK)
    # The executable runs the node with a Python that has vla_runtime (here: this venv's, on PATH).
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    result = subprocess.run([str(executable), "--ros-args", "-p", "policy:=no_such_policy"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Unknown policy 'no_such_policy'" in result.stderr
