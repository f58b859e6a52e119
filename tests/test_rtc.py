"""Real-time chunking: the guidance, the loop's side of it (leftover + delay), the delay estimate."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from test_accel import TINY, observations, untrained
from test_control import HZ, ChunkPolicy, FakeRobot, simulated_loop

from vla_runtime.accel.head_cache import HeadCacheConfig
from vla_runtime.accel.head_cache import apply as apply_head_cache
from vla_runtime.control.executor import SyncExecutor
from vla_runtime.control.loop import RuntimeConfig
from vla_runtime.control.rtc import (
    DelayEstimator,
    RealTimeChunking,
    RTCConfig,
    chunked,
    guidance_weight,
    prefix_weights,
)
from vla_runtime.policies.ref_vla.policy import random_init_policy
from vla_runtime.sim.metaworld import INSTRUCTIONS
from vla_runtime.types import ChunkPrefix


def guided(policy, obs, prefix, **config):
    rtc = RealTimeChunking(policy, RTCConfig(**config))
    try:
        policy.reset()
        return rtc.predict_chunk(dataclasses.replace(obs, prefix=prefix)).actions
    finally:
        rtc.remove()


def unguided(policy, obs):
    policy.reset()
    return policy.predict_chunk(obs).actions


def test_prefix_weights_freeze_the_delay_decay_over_the_overlap_and_stop_after_it():
    weights = prefix_weights(overlap=6, delay=2, horizon=8)
    assert weights[:2].tolist() == [1, 1] and weights[6:].tolist() == [0, 0]
    assert np.all(np.diff(weights[2:6]) < 0) and 0 < weights[5] < weights[2] < 1
    assert prefix_weights(6, 2, 8, "ones")[:6].tolist() == [1] * 6
    assert prefix_weights(6, 2, 8, "zeros").tolist() == [1, 1] + [0] * 6
    assert prefix_weights(12, 3, 8).shape == (8,)  # an overlap longer than the chunk is cut to it
    assert guidance_weight(0.0, 5.0) == 5.0 and guidance_weight(0.5, 5.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="exp, linear, ones, zeros"):
        RTCConfig(schedule="cosine")


def test_guidance_weight_zero_gives_the_unguided_chunk_exactly():
    policy = untrained("dit")
    obs = observations(1)[0]
    prefix = ChunkPrefix(np.full((3, 4), 0.5, np.float32), delay=1)
    chunk = guided(policy, obs, prefix, max_guidance=0.0)
    baseline = unguided(policy, obs)
    assert np.array_equal(chunk[1:], baseline[1:])
    assert np.array_equal(chunk[:1], prefix.actions[:1])  # the frozen action is the prefix's own


@pytest.mark.parametrize("cached", [False, True])
def test_guidance_pulls_the_overlap_onto_the_previous_chunk_and_leaves_the_rest(cached):
    # An untrained adaLN-Zero head predicts zero velocity: the unguided chunk is its initial noise and the
    # end-point estimate is the sample itself, so the guidance acts alone and its effect is exact to check.
    policy = random_init_policy(list(INSTRUCTIONS.values()), 0, head="dit", chunk_size=4, **TINY)
    if cached:  # composes with head caching: its branches run inside the differentiated step
        apply_head_cache(policy, HeadCacheConfig(mode="static", interval=2))
    obs = observations(1)[0]
    baseline = unguided(policy, obs)
    previous = np.full((3, 4), 0.25, np.float32)
    chunk = guided(policy, obs, ChunkPrefix(previous, delay=1), schedule="ones")
    assert np.array_equal(chunk[0], previous[0])  # frozen: the prefix's own action
    assert np.abs(chunk[1:3] - previous[1:3]).max() < 0.1 * np.abs(baseline[1:3] - previous[1:3]).max()
    assert np.allclose(chunk[3], baseline[3], atol=1e-6)  # past the overlap: weight 0, nothing pulls it
    assert np.array_equal(unguided(policy, obs), baseline)  # removed: the policy is as before


def test_a_delay_of_the_whole_chunk_or_more_is_refused():
    policy = untrained("dit")
    obs = observations(1)[0]
    with pytest.raises(ValueError, match="no action of the new chunk would ever run"):
        guided(policy, obs, ChunkPrefix(np.zeros((4, 4), np.float32), delay=4))
    with pytest.raises(ValueError, match="delay must be >= 0"):
        ChunkPrefix(np.zeros((4, 4), np.float32), delay=-1)


def test_rtc_refuses_a_policy_without_a_flow_matching_head():
    with pytest.raises(ValueError, match="denoising_head"):
        RealTimeChunking(untrained("ar"))


def test_warm_up_calls_do_not_enter_the_delay_estimate():
    delays = DelayEstimator(period_s=1 / HZ, warmup_calls=1)
    assert delays.ticks() == 0
    delays.observe(2.0)  # the first call compiled: 160 ticks
    assert delays.ticks() == 0
    for _ in range(5):
        delays.observe(0.05)
    assert delays.ticks() == 4


class PrefixRecorder(ChunkPolicy):
    """Records each request's prefix; every action of call n is 0.01 n in every dimension."""

    def __init__(self, horizon):
        super().__init__(horizon)
        self.prefixes = []

    def predict_chunk(self, obs):
        self.prefixes.append(obs.prefix)
        return super().predict_chunk(obs)


def test_the_loop_sends_the_leftover_and_the_delay_and_runs_the_previous_chunk_meanwhile():
    # 16-action chunks, 50 ms = 4 ticks of latency, asked for when 5 actions are left (p95 + one tick).
    policy = PrefixRecorder(horizon=16)
    robot = FakeRobot()
    loop = simulated_loop(policy, latency_ms=50, robot=robot, chunking="rtc", request_when="latency",
                          warmup_calls=0)
    metrics = loop.run(200)
    assert metrics.misses == 0 and policy.prefixes[0] is None  # nothing was queued before the first chunk
    for call, prefix in enumerate(policy.prefixes[1:], start=1):
        # What was queued from the request's tick on: call n's last 5 actions, and the 4 ticks they cover.
        assert prefix.delay == 4 and len(prefix.actions) == 5 and np.allclose(prefix.actions, 0.01 * call)
    # Commands: 4 startup holds, then each chunk runs until the next arrives 4 ticks after its request; the
    # actions the new chunk has for those 4 ticks are never executed (its values would show up early).
    values = np.round(np.array([c[0] for c in robot.commands]) / 0.01).astype(int)
    runs = [len(list(group)) for _, group in itertools.groupby(values)]
    assert values[0] == 0 and runs[0] == 4
    assert runs[1:-1] and all(run == 11 for run in runs[1:-1])  # 16 actions - 5 left when asked
    assert np.array_equal(np.unique(np.diff(values[4:])), [0, 1])
    assert np.allclose(metrics.boundary_jumps, 0.02)  # 0.01 in each of 4 dimensions, at every boundary
    assert metrics.rtc_delays == [4] * (len(policy.prefixes) - 1)


def test_rtc_takes_replace_merge_and_realtime_only():
    with pytest.raises(ValueError, match="merge=replace"):
        simulated_loop(ChunkPolicy(), 0, chunking="rtc", merge="temporal_ensemble")
    with pytest.raises(ValueError, match="naive, rtc, rtc_trained, auto"):
        simulated_loop(ChunkPolicy(), 0, chunking="smooth")


def test_guided_step_runs_compiled():
    from vla_runtime.execution import ExecConfig, apply_execution

    policy = untrained("dit")
    obs = observations(1)[0]
    prefix = ChunkPrefix(np.full((3, 4), 0.3, np.float32), delay=1)
    eager = guided(policy, obs, prefix)
    handle = apply_execution(policy, ExecConfig("compile"))
    try:
        compiled = guided(policy, obs, prefix)
    finally:
        handle.remove()
    assert np.allclose(compiled, eager, atol=1e-4)
    torch._dynamo.reset()


def test_the_open_loop_executor_plays_latency_in_and_sends_the_prefix():
    # vla-replay's executor: 4 of 8 actions per call, 2 ticks of latency: the 2 steps after a call still run
    # the previous chunk (actions 4 and 5), then the new chunk from its action 2 on.
    policy = PrefixRecorder(horizon=8)
    executor = SyncExecutor(policy, actions_per_chunk=4, latency_ticks=2, chunking="rtc")
    executor.reset()
    obs = FakeRobot().observe()
    executed = [executor.act(obs)[0] for _ in range(12)]
    assert np.allclose(executed, [0.01] * 4 + [0.01] * 2 + [0.02] * 2 + [0.02] * 2 + [0.03] * 2)
    assert policy.prefixes[0] is None
    assert all(p.delay == 2 and len(p.actions) == 4 for p in policy.prefixes[1:])
    assert np.allclose(executor.boundary_jumps, 0.02)
    naive = PrefixRecorder(horizon=8)  # the same latency, naive: the requests carry nothing
    executor = SyncExecutor(naive, actions_per_chunk=4, latency_ticks=2)
    executor.reset()
    assert [executor.act(obs)[0] for _ in range(12)] == pytest.approx(executed)
    assert naive.prefixes and all(p is None for p in naive.prefixes)


def rtc_trained_policy():
    return untrained("dit", chunk_size=6, rtc_max_delay=3)  # the woken head and flag: given actions steer the rest


def test_a_policy_trained_for_rtc_starts_its_chunk_with_the_given_actions_and_continues_them():
    policy = rtc_trained_policy()
    assert policy.spec.rtc_max_delay == 3
    obs = observations(1)[0]
    plain = unguided(policy, obs)
    given = np.full((5, 4), 0.5, np.float32)
    policy.reset()
    chunk = policy.predict_chunk(dataclasses.replace(obs, prefix=ChunkPrefix(given, delay=2))).actions
    assert np.array_equal(chunk[:2], given[:2])  # exactly what the robot runs meanwhile
    assert not np.allclose(chunk[2:], plain[2:], atol=1e-4)  # the rest conditioned on them
    policy.reset()  # a delay beyond what it was trained for: the first 3 given, no more
    longer = policy.predict_chunk(dataclasses.replace(obs, prefix=ChunkPrefix(given, delay=5))).actions
    assert np.array_equal(longer[:3], given[:3]) and not np.allclose(longer[3], given[3])
    policy.reset()  # a delay of 0: nothing given, the plain chunk
    assert np.array_equal(policy.predict_chunk(dataclasses.replace(obs, prefix=ChunkPrefix(given, 0))).actions, plain)


def test_training_for_rtc_puts_no_loss_on_the_given_actions():
    head = rtc_trained_policy().model.dit
    cognition, targets = torch.randn(4, 32), torch.randn(4, 6, 4)
    pad = torch.zeros(4, 6, dtype=torch.bool)

    def loss(spoil):
        def spoiled(module, args, output):  # garbage wherever the position was given
            return output + spoil * args[3][..., None] if len(args) > 3 else output

        hook = head.register_forward_hook(spoiled)
        torch.manual_seed(0)
        try:
            return head.loss(cognition, targets, pad, repeats=8).item()
        finally:
            hook.remove()

    assert loss(0.0) == pytest.approx(loss(1e3), rel=1e-6)


def test_chunking_auto_and_rtc_trained_follow_what_the_policy_declares():
    trained, plain = rtc_trained_policy(), untrained("dit")
    assert RuntimeConfig().for_policy(trained.spec).chunking == "rtc_trained"
    assert RuntimeConfig().for_policy(plain.spec).chunking == "naive"
    assert RuntimeConfig(chunking="rtc").for_policy(trained.spec).chunking == "rtc"
    assert chunked(trained, "rtc_trained", RTCConfig()) is trained
    with pytest.raises(ValueError, match="needs a policy trained for real-time chunking"):
        chunked(plain, "rtc_trained", RTCConfig())


def test_inference_time_rtc_does_not_also_hand_the_prefix_to_a_policy_trained_for_it():
    policy = rtc_trained_policy()
    obs = observations(1)[0]
    prefix = ChunkPrefix(np.full((5, 4), 0.5, np.float32), delay=2)
    # With beta 0 the guidance is off: the chunk is the plain one but for the 2 frozen actions.
    chunk = guided(policy, obs, prefix, max_guidance=0.0)
    assert np.allclose(chunk[2:], unguided(policy, obs)[2:])


def test_the_loop_feeds_the_prefix_to_a_policy_trained_for_rtc_by_default():
    policy = PrefixRecorder(horizon=16)
    policy.spec = dataclasses.replace(policy.spec, rtc_max_delay=8)
    loop = simulated_loop(policy, latency_ms=50, warmup_calls=0)
    assert loop.config.chunking == "rtc_trained"
    assert loop.run(100).misses == 0
    assert all(p.delay == 4 for p in policy.prefixes[1:]) and len(policy.prefixes) > 3
