"""SIMPLER-Bridge suite: the protocol settings, one real ManiSkill3 environment from the offline asset
bundle, the expert's first moves, bad names and missing assets."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from vla_runtime.sim import make_suite
from vla_runtime.sim.simpler import suite as simpler_suite
from vla_runtime.sim.suite import configured_suite

# Not importorskip: ManiSkill fixes its asset folder when first imported, and the suite sets it.
if importlib.util.find_spec("mani_skill") is None:
    pytest.skip("the SIMPLER extra is not installed (bash scripts/setup.sh --simpler)", allow_module_level=True)

# The offline asset bundle (its README gives the provenance); VLA_SIMPLER_ASSETS names another copy.
BUNDLE = Path(os.environ.get("VLA_SIMPLER_ASSETS",
                             Path(__file__).resolve().parents[2] / "shared" / "simpler" / "bridge_assets.tgz"))
CARROT = "widowx_carrot_on_plate"


@pytest.fixture(scope="module")
def suite():
    if not BUNDLE.is_file():
        pytest.skip(f"the offline SIMPLER asset bundle is not at {BUNDLE} (set VLA_SIMPLER_ASSETS)")
    return configured_suite("simpler_bridge", asset_dir=str(BUNDLE))[0]


@pytest.fixture(scope="module")
def env(suite):
    with suite.make_env(CARROT) as env:
        yield env


def test_protocol_settings():
    """SimplerEnv's Bridge protocol; a change here breaks comparability."""
    suite, default_tasks = configured_suite("simpler_bridge")
    assert default_tasks == ["widowx_carrot_on_plate", "widowx_spoon_on_towel", "widowx_stack_cube"]
    assert "widowx_put_eggplant_in_basket" in suite.task_sets["bridge_all"]
    assert suite.config.max_steps == 60 and (suite.eval_seeds.start, suite.eval_seeds.count) == (0, 24)
    spec = suite.spec
    assert (spec.action_dim, spec.state_dim, spec.control_dt) == (7, 8, 0.2)  # 5 Hz
    assert spec.cameras == ("3rd_view_camera",) and spec.hold_dims == (6,)
    assert suite.instruction("PutCarrotOnPlateInScene-v1") == "put carrot on plate"
    assert suite.settings()["label"] == "ManiSkill3 port, stand-in table"


def test_bad_names_and_options_are_one_line_errors():
    suite = make_suite("simpler_bridge")
    with pytest.raises(ValueError, match="Unknown SIMPLER-Bridge task 'carrot'.*widowx_carrot_on_plate"):
        suite.resolve_tasks("carrot")
    with pytest.raises(ValueError, match="evaluation configurations"):
        make_suite("simpler_bridge", train_seeds={"start": 0, "count": 100}, eval_seeds={"start": 500, "count": 24})
    with pytest.raises(ValueError, match="one camera"):
        make_suite("simpler_bridge", cameras=["wrist"])
    with pytest.raises(FileNotFoundError, match="holds no data/ folder"):
        make_suite("simpler_bridge", asset_dir="/nonexistent").make_env(CARROT)


def test_cli_unknown_task_is_one_line(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "vla_runtime.cli.eval", "sim=simpler_bridge", "policy=expert", "tasks=carrot",
         "workers=1", f"output_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert "Unknown SIMPLER-Bridge task 'carrot'" in process.stderr and "Traceback" not in process.stderr


def test_missing_task_assets_are_named(suite):
    """The offline bundle has no eggplant: the error says which files, and how to get them."""
    with pytest.raises(FileNotFoundError, match=r"custom/models/eggplant/textured.*download_asset"):
        suite.make_env("widowx_put_eggplant_in_basket")


def test_configurations_are_fixed_and_other_seeds_place_at_random(env):
    first, again = env.reset(0), env.reset(0)
    assert np.allclose(first.privileged_state, again.privileged_state, atol=1e-5)
    assert not np.allclose(env.reset(1).privileged_state[:3], first.privileged_state[:3], atol=1e-3)
    placed = env.reset(1000).privileged_state
    assert np.allclose(placed, env.reset(1000).privileged_state, atol=1e-5)
    assert not np.allclose(placed[:3], env.reset(1001).privileged_state[:3], atol=1e-3)
    grid = [env.reset(seed).privileged_state for seed in range(24)]
    assert min(np.linalg.norm(placed[:3] - state[:3]) for state in grid) > 1e-3
    # ... turned by at most 30 degrees (plus settling) from one of the configurations' orientations
    def orientation(state):
        return Rotation.from_quat(np.roll(state[3:7], -1))  # wxyz -> xyzw
    for seed in range(1000, 1006):
        turn = min((orientation(env.reset(seed).privileged_state) * orientation(state).inv()).magnitude()
                   for state in grid)
        assert np.degrees(turn) < 33
    env.reset(0)  # the grid is back after a random placement
    assert np.allclose(env.observe().privileged_state, first.privileged_state, atol=1e-5)


def test_observation_layout_image_and_success_at_the_end(env):
    obs = env.reset(3, render=True)
    image = obs.images["3rd_view_camera"]
    assert image.shape == (160, 160, 3) and image.dtype == np.uint8 and image.std() > 10
    assert obs.instruction == "put carrot on plate" and obs.state.shape == (8,) and obs.state.dtype == np.float32
    assert obs.privileged_state.shape == (simpler_suite.PRIVILEGED_DIM,)
    # The hand points down: its x axis along -z of the base frame.
    assert Rotation.from_rotvec(obs.state[3:6]).as_matrix()[2, 0] < -0.99
    assert env.reset(3, render=False).images == {}
    _, _, success, truncated, _ = env.step(np.zeros(7))
    assert env.steps == 1 and not success and not truncated
    with pytest.raises(ValueError, match="7 dimensions"):
        env.step(np.zeros(4))
    with pytest.raises(ValueError, match="Non-finite action"):
        env.step(np.array([np.nan] * 7))


def test_a_crop_renders_that_part_of_the_frame(env):
    import dataclasses

    import cv2

    env.reset(3, render=False)
    config = env.config
    try:
        env.config = dataclasses.replace(config, image_crop=None)
        full = env.render("3rd_view_camera")
        env.config = dataclasses.replace(config, image_crop=[0.25, 0.25, 0.75, 0.75])
        centre = env.render("3rd_view_camera")
    finally:
        env.config = config
    assert centre.shape == full.shape == (160, 160, 3)
    # The middle half of the frame, at twice the resolution of the whole frame's rendering of it.
    halved = cv2.resize(centre, (80, 80), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(halved - full[40:120, 40:120]).mean() < 4
    assert np.abs(halved - full[:80, :80]).mean() > 4 * np.abs(halved - full[40:120, 40:120]).mean()


def test_a_crop_is_part_of_the_robot_spec_and_a_policy_without_it_is_refused():
    cropped = make_suite("simpler_bridge", image_size=128, image_crop=[0.25, 0.25, 0.75, 0.75])
    assert cropped.spec.image_crop == (0.25, 0.25, 0.75, 0.75)
    assert cropped.settings()["image_crop"] == [0.25, 0.25, 0.75, 0.75]
    whole = make_suite("simpler_bridge", image_crop=None).settings()  # datasets collected without one resume
    assert "image_crop" not in whole and whole["image_resize"] == "640x480 -> square, area interpolation, no crop"
    from vla_runtime.policies import make_policy

    with pytest.raises(ValueError, match=r"image crop \[0, 0, 1, 1\] vs \[0.25, 0.25, 0.75, 0.75\]"):
        cropped.check_policy(make_policy("ref_dit", checkpoint="ref_dit_simpler_bridge"), "ref_dit_simpler")
    with pytest.raises(ValueError, match="image_crop must be"):
        make_suite("simpler_bridge", image_crop=[0.5, 0.0, 0.4, 1.0])


def test_expert_reaches_over_the_carrot_with_the_hand_open(suite, env):
    expert = suite.expert()
    expert.reset()
    obs = env.reset(5)
    carrot = obs.privileged_state[:3]
    start = np.linalg.norm(obs.state[:2] - carrot[:2])
    for _ in range(10):  # to above the carrot, hand open, without touching it
        action = expert.predict_chunk(obs).actions[0]
        assert action.shape == (7,) and action[6] == 1.0
        obs, *_ = env.step(action)
        if np.linalg.norm(obs.state[:2] - carrot[:2]) < 0.02:
            break
    assert start > 0.05 and np.linalg.norm(obs.state[:2] - carrot[:2]) < 0.02
    assert obs.state[2] > carrot[2] + 0.03


def test_grasp_yaw_closes_across_the_narrow_side_and_picks_the_nearest_of_symmetric_grasps():
    from vla_runtime.sim.simpler.expert import _grasp_yaw
    carrot = np.array([0.10, 0.03, 0.03])  # long along its own x axis, lying flat
    yaw = _grasp_yaw(Rotation.from_euler("z", 30, degrees=True), carrot)
    assert np.isclose(np.degrees(yaw), 30)  # the fingers close along the carrot's y axis
    cube = np.array([0.0301, 0.03, 0.0302])  # sides that differ by a fraction of a millimetre
    for turn in (-170, -100, -80, 10, 80, 100, 170):
        yaw = np.degrees(_grasp_yaw(Rotation.from_euler("z", turn, degrees=True), cube))
        off_axis = (yaw - turn) % 90  # a grasp of a cube is one of its sides: a multiple of 90 degrees from its turn
        assert abs(yaw) <= 45 + 1e-6 and min(off_axis, 90 - off_axis) < 1e-6


def test_ros_bridge_runs_a_simpler_task(monkeypatch, suite):
    """The simulator bridge on real DDS with the offline bundle (`suite_options`): the overlay camera and the
    8-D state out, 7-D WidowX commands in."""
    pytest.importorskip("rclpy", reason="needs the [ros] extra")
    import json

    from bridge_probe import drive_bridge

    images, states, first, status = drive_bridge(
        monkeypatch, {"suite": "simpler_bridge", "task": CARROT, "camera_hz": 5.0,
                      "suite_options": json.dumps({"asset_dir": str(BUNDLE)})},
        ("3rd_view_camera",), command=[0.0, 0.0, 0.02, 0.0, 0.0, 0.0, 1.0], steps=10)  # up 2 cm a step, open
    assert (images["3rd_view_camera"].height, images["3rd_view_camera"].width) == (160, 160)
    assert list(states[-1].name) == list(suite.spec.state_names)
    assert states[-1].position[2] > first.position[2] + 0.05 and status["task"] == CARROT
    assert status["instruction"] == "put carrot on plate"


def test_shipped_simpler_policy_fits_the_suite(suite, env):
    from vla_runtime.policies import make_policy

    policy = make_policy("ref_dit", checkpoint="ref_dit_simpler_crop160")
    suite.check_policy(policy, "ref_dit_simpler")  # the suite's default image size and crop are the policy's
    assert policy.spec.cameras == ("3rd_view_camera",) and policy.spec.control_dt == 0.2
    chunk = policy.predict_chunk(env.reset(0))
    assert chunk.actions.shape == (8, 7) and np.all(np.isfinite(chunk.actions))
