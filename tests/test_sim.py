import numpy as np
import pytest

from vla_runtime.evaluation.runner import run_episode
from vla_runtime.sim import SeedRange, make_suite
from vla_runtime.sim.metaworld import INSTRUCTIONS, MT10, MT50, MetaWorldConfig, MetaWorldEnv, resolve_task
from vla_runtime.types import ActionChunk, PolicySpec, PolicyStructure


def test_same_seed_gives_identical_first_image_and_state(small_sim):
    with small_sim.make_env("push") as first, MetaWorldEnv("push", small_sim.config) as second:
        a, b = first.reset(seed=7), second.reset(seed=7)
        other = first.reset(seed=8)
    assert np.array_equal(a.state, b.state)
    assert np.array_equal(a.images["corner4"], b.images["corner4"])
    assert a.images["corner4"].shape == (64, 64, 3) and a.images["corner4"].dtype == np.uint8
    # The puck starts elsewhere for another seed, and the image shows it.
    assert not np.array_equal(a.privileged_state, other.privileged_state)
    assert not np.array_equal(a.images["corner4"], other.images["corner4"])


def test_every_task_has_a_distinct_instruction():
    assert set(MT10) <= set(MT50) and len(MT10) == 10 and len(MT50) == 50
    assert set(INSTRUCTIONS) == set(MT50)
    assert all(INSTRUCTIONS[task].strip() for task in MT50)
    assert len(set(INSTRUCTIONS.values())) == 50  # the expert finds its task from the instruction
    suite = make_suite("metaworld")
    assert suite.task_for_instruction("open the drawer") == "drawer-open-v3"
    assert suite.task_for_instruction("make coffee") is None
    assert suite.tasks() == MT50
    assert suite.task_id("drawer-open") == MT50.index("drawer-open-v3")
    assert all(suite.instruction(task) == INSTRUCTIONS[task] for task in MT50)


def test_unknown_task_lists_valid_names(small_sim):
    for resolve in (resolve_task, small_sim.resolve_task, small_sim.resolve_tasks):
        with pytest.raises(ValueError) as err:
            resolve("make-coffee")
        assert "make-coffee" in str(err.value)
        assert "drawer-open-v3" in str(err.value) and "window-close-v3" in str(err.value)


def test_task_sets_and_short_names(small_sim):
    assert small_sim.resolve_tasks("mt10") == list(MT10)
    assert small_sim.resolve_tasks("MT50") == list(MT50)
    assert small_sim.resolve_tasks(["drawer-open", "reach-v3"]) == ["drawer-open-v3", "reach-v3"]
    assert small_sim.resolve_tasks("drawer-open") == ["drawer-open-v3"]
    with pytest.raises(ValueError, match="Empty task list"):
        small_sim.resolve_tasks([])


def test_missing_camera_is_a_clear_error():
    with pytest.raises(ValueError, match="Camera 'wrist' does not exist.*corner4"):
        make_suite("metaworld", cameras=("wrist",)).make_env("reach")


def test_unknown_suite_and_option_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown simulator suite 'gazebo'.*libero, metaworld"):
        make_suite("gazebo")
    with pytest.raises(ValueError, match=r"Unknown Meta-World option\(s\) \['imagesize'\].*image_size"):
        make_suite("metaworld", imagesize=64)


def test_train_and_eval_seeds_must_be_disjoint(small_sim):
    with pytest.raises(ValueError, match="overlap"):
        MetaWorldConfig(train_seeds=SeedRange(0, 100), eval_seeds=SeedRange(50, 100))
    with pytest.raises(ValueError, match="overlap"):
        make_suite("metaworld", train_seeds={"start": 0, "count": 100}, eval_seeds={"start": 50, "count": 100})
    with pytest.raises(IndexError):
        SeedRange(0, 10).seed(10)
    assert small_sim.seeds("train") == small_sim.train_seeds and small_sim.seeds("eval") == small_sim.eval_seeds
    assert not small_sim.seeds("train").overlaps(small_sim.seeds("eval"))
    with pytest.raises(ValueError, match="Unknown seed split 'test'"):
        small_sim.seeds("test")


class RecordingPolicy:
    """Test double: remembers what it was shown, moves nowhere."""

    spec = PolicySpec(action_dim=4, state_dim=4, cameras=("corner4",), image_size=(64, 64), chunk_size=5,
                      control_dt=0.0125)

    def __init__(self):
        self.structure = PolicyStructure()
        self.seen = []

    def reset(self):
        pass

    def predict_chunk(self, obs):
        self.seen.append(obs)
        return ActionChunk(np.zeros((5, 4)), t0=obs.timestamp, dt=0.0125)


def test_learned_policy_sees_no_privileged_state(small_sim):
    policy = RecordingPolicy()
    with make_suite("metaworld", image_size=64, default_max_steps=12).make_env("pick-place") as env:
        result = run_episode(env, policy, seed=3)
    assert result.length == 12 and not result.success
    assert result.policy_calls == 3  # chunks of 5 actions, executed whole
    for obs in policy.seen:
        assert obs.privileged_state is None
        assert obs.state.shape == (4,)  # end-effector xyz + gripper, nothing about objects or goal
        assert set(obs.images) == {"corner4"}
        assert obs.instruction == INSTRUCTIONS["pick-place-v3"]
    assert [obs.timestamp for obs in policy.seen] == pytest.approx([0.0, 5 * 0.0125, 10 * 0.0125])


def test_suite_refuses_a_policy_that_does_not_fit_naming_both_specs(small_sim):
    small_sim.check_policy(RecordingPolicy(), "recorder")  # fits
    wrong = RecordingPolicy()
    wrong.spec = PolicySpec(action_dim=7, state_dim=4, cameras=("wrist",), image_size=(224, 224))
    with pytest.raises(ValueError) as err:
        small_sim.check_policy(wrong, "recorder")
    message = str(err.value)
    assert "Policy 'recorder'" in message and "suite 'metaworld'" in message
    assert "7-D actions" in message and "4-D actions" in message  # both specs
    assert "action dim 7 vs 4" in message and "cameras ['wrist'] are not rendered" in message
    assert "image size (224, 224) vs (64, 64)" in message


def test_non_finite_action_is_refused(small_sim):
    with small_sim.make_env("reach", render=False) as env:
        env.reset(0)
        with pytest.raises(ValueError, match="Non-finite action"):
            env.step(np.array([np.nan, 0, 0, 0]))
        with pytest.raises(ValueError, match="4 dimensions"):
            env.step(np.zeros(3))
