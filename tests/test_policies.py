import functools

import numpy as np
import pytest

from vla_runtime.control.loop import RuntimeConfig
from vla_runtime.evaluation.runner import evaluate, run_episode
from vla_runtime.evaluation.specs import LatencySpec, RealtimeSpec
from vla_runtime.policies import make_policy, policy_names
from vla_runtime.sim.metaworld.expert import MetaWorldExpert
from vla_runtime.types import Policy, PolicySpec, PolicyStructure


def test_registry_builds_policies_and_rejects_unknown_names(small_sim):
    assert {"expert", "random"} <= set(policy_names())
    assert isinstance(make_policy("random", suite=small_sim), Policy)
    assert isinstance(make_policy("expert", suite=small_sim), MetaWorldExpert)
    with pytest.raises(ValueError, match="Unknown policy 'gpt'.*expert"):
        make_policy("gpt")
    with pytest.raises(ValueError, match="Policy 'random' is built from a simulator suite; none was given"):
        make_policy("random")


@pytest.mark.parametrize("task", ["drawer-close", "button-press-topdown"])
def test_expert_succeeds(small_sim, task):
    expert = make_policy("expert", suite=small_sim)
    assert expert.spec.privileged
    small_sim.check_policy(expert, "expert")
    with small_sim.make_env(task, render=False) as env:
        results = [run_episode(env, expert, seed=small_sim.seeds("eval").seed(i)) for i in range(3)]
    assert all(r.success for r in results), [(r.seed, r.length) for r in results]
    assert all(r.length < small_sim.config.max_steps_for(env.task) for r in results)


def test_random_policy_actions_are_in_range(small_sim):
    policy = make_policy("random", suite=small_sim, chunk_size=8, seed=1)
    assert policy.spec.chunk_size == 8 and not policy.spec.privileged and policy.spec.cameras == ()
    small_sim.check_policy(policy, "random")
    chunk = policy.predict_chunk(type("Obs", (), {"timestamp": 0.0})())
    assert chunk.actions.shape == (8, 4)
    assert np.all(np.abs(chunk.actions) <= 1.0)
    assert chunk.dt == small_sim.spec.control_dt


class ExplodingPolicy:
    spec = PolicySpec(action_dim=4, state_dim=4)
    structure = PolicyStructure()

    def reset(self):
        pass

    def predict_chunk(self, obs):
        raise RuntimeError("model on fire")


def test_an_episode_that_raises_is_recorded_and_the_rest_still_run(small_sim):
    results = evaluate(ExplodingPolicy, small_sim, ["reach-v3"], episodes_per_task=2, progress=False)
    assert [r.error for r in results] == ["RuntimeError: model on fire"] * 2
    assert not any(r.success for r in results)


def test_parallel_workers_give_the_same_results_as_inline(small_sim):
    factory = functools.partial(make_policy, "expert", suite=small_sim)
    inline = evaluate(factory, small_sim, ["drawer-close-v3"], 2, workers=1, progress=False)
    parallel = evaluate(factory, small_sim, ["drawer-close-v3"], 2, workers=2, progress=False)
    def outcomes(results):
        return [(r.seed, r.success, r.length) for r in results]

    assert outcomes(inline) == outcomes(parallel)


def test_realtime_mode_with_zero_latency_equals_sync(small_sim):
    realtime = RealtimeSpec(RuntimeConfig(control_hz=80.0), LatencySpec("fixed", 0.0))
    factory = functools.partial(make_policy, "expert", suite=small_sim)
    tasks = ["drawer-open-v3", "peg-insert-side-v3"]
    sync = evaluate(factory, small_sim, tasks, 3, progress=False)
    realtime_results = evaluate(factory, small_sim, tasks, 3, progress=False, realtime=realtime)
    assert [(r.seed, r.success, r.length) for r in sync] == [(r.seed, r.success, r.length) for r in realtime_results]
    assert all(r.loop["deadline_misses"] == 0 and r.loop["startup_holds"] == 0 for r in realtime_results)


def test_realtime_latency_costs_ticks(small_sim):
    realtime = RealtimeSpec(RuntimeConfig(control_hz=80.0), LatencySpec("fixed", 100.0))
    (result,) = evaluate(functools.partial(make_policy, "expert", suite=small_sim), small_sim, ["drawer-close-v3"], 1,
                         progress=False, realtime=realtime)
    # One action per chunk, each chunk 8 ticks late: the robot holds on 7 of every 8 ticks.
    assert result.loop["deadline_misses"] > 5 * result.loop["policy_calls"]
