import numpy as np
import pytest

from vla_runtime.sim import INSTRUCTIONS, MT10, MT50, MetaWorldConfig, MetaWorldEnv
from vla_runtime.sim.metaworld_suite import SeedRange, resolve_task, resolve_tasks, task_for_instruction
from vla_runtime.sim.runner import run_episode
from vla_runtime.types import ActionChunk, PolicyStructure


def test_same_seed_gives_identical_first_image_and_state(small_sim):
    with MetaWorldEnv("push", small_sim) as first, MetaWorldEnv("push", small_sim) as second:
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
    assert task_for_instruction("open the drawer") == "drawer-open-v3"


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError) as err:
        resolve_task("make-coffee")
    assert "make-coffee" in str(err.value)
    assert "drawer-open-v3" in str(err.value) and "window-close-v3" in str(err.value)


def test_task_sets_and_short_names():
    assert resolve_tasks("mt10") == list(MT10)
    assert resolve_tasks(["drawer-open", "reach-v3"]) == ["drawer-open-v3", "reach-v3"]
    with pytest.raises(ValueError, match="Empty task list"):
        resolve_tasks([])


def test_missing_camera_is_a_clear_error():
    with pytest.raises(ValueError, match="Camera 'wrist' does not exist.*corner4"):
        MetaWorldEnv("reach", MetaWorldConfig(cameras=("wrist",)))


def test_train_and_eval_seeds_must_be_disjoint():
    with pytest.raises(ValueError, match="overlap"):
        MetaWorldConfig(train_seeds=SeedRange(0, 100), eval_seeds=SeedRange(50, 100))
    with pytest.raises(IndexError):
        SeedRange(0, 10).seed(10)


class RecordingPolicy:
    """Test double: remembers what it was shown, moves nowhere."""

    camera_names = ("corner4",)
    privileged = False

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
    with MetaWorldEnv("pick-place", MetaWorldConfig(image_size=64, default_max_steps=12)) as env:
        result = run_episode(env, policy, seed=3)
    assert result.length == 12 and not result.success
    assert result.policy_calls == 3  # chunks of 5 actions, executed whole
    for obs in policy.seen:
        assert obs.privileged_state is None
        assert obs.state.shape == (4,)  # end-effector xyz + gripper, nothing about objects or goal
        assert set(obs.images) == {"corner4"}
        assert obs.instruction == INSTRUCTIONS["pick-place-v3"]
    assert [obs.timestamp for obs in policy.seen] == pytest.approx([0.0, 5 * 0.0125, 10 * 0.0125])


def test_non_finite_action_is_refused(small_sim):
    with MetaWorldEnv("reach", small_sim, render=False) as env:
        env.reset(0)
        with pytest.raises(ValueError, match="Non-finite action"):
            env.step(np.array([np.nan, 0, 0, 0]))
        with pytest.raises(ValueError, match="4 dimensions"):
            env.step(np.zeros(3))
