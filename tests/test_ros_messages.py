"""ROS 2 message conversion and validation, the launch description, the ROS 2 install layout, and the control
node's parameters, robot contract and fault log."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="needs the [ros] extra")

from builtin_interfaces.msg import Time  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402

from vla_runtime.cli import robot  # noqa: E402
from vla_runtime.cli.common import UsageError  # noqa: E402
from vla_runtime.cli.robot import settings  # noqa: E402
from vla_runtime.control import inference  # noqa: E402
from vla_runtime.data.messages import (  # noqa: E402
    MessageRejected,
    action_from_msg,
    check_stamp,
    fit_image,
    image_from_msg,
    state_from_joint_state,
)
from vla_runtime.execution import exec_config  # noqa: E402
from vla_runtime.policies import make_policy  # noqa: E402
from vla_runtime.ros import LAUNCH_ARGUMENTS, node_parameters, robot_defaults  # noqa: E402
from vla_runtime.ros.control_node import ControlNode  # noqa: E402
from vla_runtime.ros.messages import action_to_msg, image_to_msg  # noqa: E402
from vla_runtime.ros.parameters import BridgeParams, ControlParams, as_parameters, declare  # noqa: E402
from vla_runtime.ros.profile_manager import ProfileManager  # noqa: E402
from vla_runtime.ros.robot_adapter import FaultLog  # noqa: E402
from vla_runtime.ros.robot_contract import read_robot_file, robot_contract, suite_fields  # noqa: E402
from vla_runtime.types import PolicySpec, RobotSpec  # noqa: E402

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
    # A policy trained on a crop of the frame gets that crop of a full frame (the top half here: all 200).
    cropped = fit_image(frame, (64, 128), resize=True, crop=(0.0, 0.0, 1.0, 0.5))
    assert cropped.shape == (64, 128, 3) and cropped.min() == 200


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
        "launch.substitutions": {"IfElseSubstitution": Recorded, "LaunchConfiguration": Recorded},
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
        assert set(launched) | set(extra) == set(expected)
        # Each launched parameter is the launch argument of the same name (step_hz: control_hz), but the control
        # node's suite: the bridge's with use_sim, else none (as vla-robot's node_parameters).
        names = {name: value.args[0].args[0] for name, value in launched.items()
                 if (executable, name) != ("control_node", "suite")}
        assert all(arg == name or (name, arg) == ("step_hz", "control_hz") for name, arg in names.items())
    condition, with_sim, without_sim = nodes["control_node"]["parameters"][0]["suite"].args[0].args
    assert (condition.args[0], with_sim.args[0], without_sim) == ("use_sim", "suite", "")
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


# ---- the control node's parameters and robot contract ---------------------------------------------------------
METAWORLD = RobotSpec(action_dim=4, state_dim=4, cameras=("corner4",), image_size=(128, 128), control_dt=0.0125,
                      action_low=(-1.0,) * 4, action_high=(1.0,) * 4, hold_dims=(3,))
POLICY = PolicySpec(action_dim=4, state_dim=4, control_dt=0.0125)


@pytest.fixture
def ros_context():
    """rclpy for nodes that only declare parameters, in a DDS domain of their own."""
    rclpy.init(domain_id=random.randint(1, 101))
    yield
    rclpy.try_shutdown()


def test_node_parameters_are_typed_frozen_dataclasses(ros_context):
    node = rclpy.create_node("params", parameter_overrides=as_parameters(
        {"control_hz": 20, "action_low": [-1, -0.5], "camera_names": [], "accel_ladder": ["none", "bac"]},
        ControlParams))
    params = declare(node, ControlParams)
    assert params.control_hz == 20.0 and isinstance(params.control_hz, float)  # an int where a float is due
    assert params.action_low == (-1.0, -0.5) and params.action_high is None and params.hold_dims is None
    assert params.camera_names == () and params.accel_ladder == ("none", "bac") and params.suite == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.policy = "ref_ar"
    assert all(node.describe_parameter(field.name).description for field in dataclasses.fields(ControlParams))
    assert declare(rclpy.create_node("bridge_params"), BridgeParams) == BridgeParams()
    with pytest.raises(ValueError, match="hold_dims: ROS cannot pass an empty list of numbers.*robot_file"):
        as_parameters({"hold_dims": []}, ControlParams)


def test_the_robot_contract_comes_from_parameters_then_robot_file_then_suite():
    alone = robot_contract([], POLICY, "ref_dit")
    assert (alone.action_low, alone.action_high, alone.hold_dims, alone.state_dim, alone.control_hz) == \
        ((-1.0,) * 4, (1.0,) * 4, (), None, 80.0)
    assert alone.origins["hold_dims"] == "default" and alone.origins["control_hz"] == "policy ref_dit"
    suite = ("suite metaworld", suite_fields(METAWORLD))
    assert robot_contract([suite], POLICY, "ref_dit").hold_dims == (3,)
    robot_file = ("robot_file arm.yaml", {"hold_dims": (), "control_hz": 20.0, "action_high": (0.5,) * 4})
    contract = robot_contract([("parameter", {"control_hz": 10.0}), robot_file, suite], POLICY, "ref_dit")
    assert (contract.action_low, contract.action_high, contract.hold_dims, contract.state_dim,
            contract.control_hz) == ((-1.0,) * 4, (0.5,) * 4, (), 4, 10.0)
    assert contract.describe() == ("4-D actions in [-1, 0.5] (suite metaworld, robot_file arm.yaml), held dims [] "
                                   "(robot_file arm.yaml), 4-D state, 10 Hz (parameter)")


@pytest.mark.parametrize("fields, policy, message", [
    ({"action_low": (-1.0,) * 7, "action_high": (1.0,) * 7}, POLICY,
     r"the robot takes 7-D actions \(action_low \(from robot_file arm.yaml\)\); policy ref_dit outputs 4-D"),
    ({"state_dim": 9}, POLICY, r"9-D state \(state_dim \(from robot_file arm.yaml\)\); policy ref_dit reads 4-D"),
    ({"hold_dims": (4,)}, POLICY, r"hold_dims \(from robot_file arm.yaml\) \[4\] is outside the robot's 4 action"),
    ({"action_low": (2.0,) * 4}, POLICY, r"action_low \(from robot_file arm.yaml\) exceeds action_high \(from "
                                         r"default\) in dimension\(s\) \[0, 1, 2, 3\]"),
    ({}, PolicySpec(action_dim=4, state_dim=4), "no control rate: set control_hz"),
])
def test_a_contract_the_policy_does_not_fit_is_one_line_naming_the_field_and_its_source(fields, policy, message):
    with pytest.raises(ValueError, match=message):
        robot_contract([("robot_file arm.yaml", fields)], policy, "ref_dit")


@pytest.mark.parametrize("text, message", [
    ("action_hi: [1, 1]", "unknown field 'action_hi' \\(did you mean 'action_high'\\?\\); fields: action_low"),
    ("action_low: [a, 1]", "action_low must be a list of numbers, got \\['a', 1\\]"),
    ("hold_dims: [1.5]", "hold_dims must be a list of integers"),
    ("control_hz: 0", "control_hz must be a positive number"),
    ("state_dim: true", "state_dim must be a non-negative integer"),
    ("- 1\n- 2", "must be a mapping of action_low, action_high, hold_dims, state_dim, control_hz"),
    ("{action_low: [", "is not YAML or JSON"),
])
def test_a_bad_robot_file_is_one_line_naming_the_file_and_the_field(tmp_path, text, message):
    path = tmp_path / "arm.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"robot_file {path}.*{message}") as error:
        read_robot_file(str(path))
    assert "\n" not in str(error.value)


def test_a_robot_file_in_json(tmp_path):
    path = tmp_path / "arm.json"
    path.write_text('{"action_low": [-1, -2], "action_high": [1, 2], "hold_dims": [1], "control_hz": 30}')
    assert read_robot_file(str(path)) == {"action_low": (-1.0, -2.0), "action_high": (1.0, 2.0), "hold_dims": (1,),
                                          "control_hz": 30.0}
    with pytest.raises(FileNotFoundError, match="robot_file nowhere.yaml: no such file"):
        read_robot_file("nowhere.yaml")


def test_the_control_node_asks_for_a_suite_only_where_one_is_needed(ros_context, tmp_path):
    with pytest.raises(ValueError, match="policy random is built for a simulator suite's robot: set suite:=<one of "
                                         ".*metaworld"):
        ControlNode(parameter_overrides={"policy": "random", "autostart": False})
    # A profile to calibrate, no artifact for it in the checkpoint, no suite: named at startup.
    checkpoint = tmp_path / "ref_dit"
    checkpoint.mkdir()
    for part in (REPO / "checkpoints" / "ref_dit").iterdir():
        if part.name != "calibration":
            (checkpoint / part.name).symlink_to(part)
    policy = make_policy("ref_dit", checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match=f"profile 'bac' needs calibration observations and the node has no suite: "
                                         f"set suite:=.* or ship the checkpoint's calibration artifacts in "
                                         f"{checkpoint}/calibration"):
        ProfileManager(policy, "ref_dit", "bac", [], 0.0, None)
    with pytest.raises(ValueError, match="exec=compile warms profile 'none' up on calibration observations and the "
                                         "node has no suite: set suite:="):
        ProfileManager(policy, "ref_dit", "none", [], 0.0, None, exec_config("compile"))
    with pytest.raises(ValueError, match="the robot takes 7-D actions \\(action_low \\(from parameter\\)\\)"):
        ControlNode(policy, {"action_low": [-1.0] * 7, "action_high": [1.0] * 7, "autostart": False})


def test_the_fault_log_throttles_each_kind_apart():
    """A flood of frames at the wrong resolution does not hide NaN joint states; each kind says what it left out."""
    lines, now = [], [0.0]
    log = FaultLog(lines.append, interval_s=1.0, clock=lambda: now[0])
    for _ in range(100):
        log("/camera/corner4/image_raw", MessageRejected("resolution", "256x256, the policy needs 128x128"))
    log("/joint_states", MessageRejected("nan", "joint state positions contain NaN"))
    log("/camera/corner4/image_raw", MessageRejected("size", "59 bytes"))
    assert [line.split(":")[0] for line in lines] == ["dropped message on /camera/corner4/image_raw",
                                                      "dropped message on /joint_states",
                                                      "dropped message on /camera/corner4/image_raw"]
    assert "NaN" in lines[1] and "59 bytes" in lines[2]
    now[0] = 1.0  # an interval later: one line per kind again, with the count of what was not logged
    log("/camera/corner4/image_raw", MessageRejected("resolution", "256x256, the policy needs 128x128"))
    log("/joint_states", MessageRejected("nan", "joint state positions contain NaN"))
    assert lines[3].endswith("(99 more 'resolution' not logged since the last)") and lines[4].endswith("NaN")


def test_vla_robot_takes_its_arguments_as_given_and_its_suite_only_with_the_simulator(capsys):
    argv = list(sys.argv)
    config, command = settings(["policy=ref_ar", "control_hz=10", "use_sim=false", "robot_file=arm.yaml"])
    assert sys.argv == argv
    assert config["policy"] == "ref_ar" and config["control_hz"] == 10
    assert command == "vla-robot control_hz=10 use_sim=false robot_file=arm.yaml policy=ref_ar"
    control, bridge = node_parameters(config)
    assert control["suite"] == "" and control["robot_file"] == "arm.yaml" and bridge["suite"] == "metaworld"
    assert node_parameters(robot_defaults())[0]["suite"] == "metaworld"  # use_sim: the bridge's suite
    with pytest.raises(UsageError, match="takes key=value overrides of configs/robot.yaml .*, not '--cfg'"):
        settings(["--cfg", "job"])
    robot.main(["--help"])
    assert "usage: vla-robot [key=value ...]" in capsys.readouterr().out


def test_vla_robot_says_which_profiles_the_governor_switched_between():
    from vla_runtime.cli.robot import describe

    control = {"latency_ms": {"p50": 40.0}, "image_to_action_ms": {"p50": None}, "tick_jitter_ms": {},
               "ticks": 90, "commands_published": 90, "deadline_misses": 0, "message_faults": 0, "loop_faults": 0,
               "profile_switches": [{"tick": 41, "from": "none", "to": "bac"},
                                    {"tick": 82, "from": "bac", "to": "efficientvla"}]}
    text = describe({"episodes": [], "control": control})
    assert "  profile none -> bac (tick 41) -> efficientvla (tick 82)" in text.splitlines()
    assert "profile" not in describe({"episodes": [], "control": {**control, "profile_switches": []}})
