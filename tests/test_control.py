import dataclasses
import math
import threading

import numpy as np
import pytest

from vla_runtime.control.action_queue import ActionQueue
from vla_runtime.control.governor import BudgetGovernor, Candidate
from vla_runtime.control.inference import LatencyModel, SimulatedInferenceWorker, ThreadedInferenceWorker
from vla_runtime.control.loop import ControlLoop, RuntimeConfig, SimulatedClock
from vla_runtime.control.rtc import DelayEstimator
from vla_runtime.control.safety import SafetyConfig, SafetyLayer
from vla_runtime.types import ActionChunk, Observation, PolicySpec, PolicyStructure

HZ = 80.0


class ChunkPolicy:
    """Test double: chunks of `horizon` actions whose value encodes the call number; can be told to
    sleep (real latency), raise, or return NaN on chosen calls."""

    def __init__(self, horizon=8, sleep_s=0.0, raise_on=(), nan_on=()):
        self.spec = PolicySpec(action_dim=4, state_dim=4, chunk_size=horizon, control_dt=1 / HZ)
        self.structure = PolicyStructure()
        self.horizon, self.sleep_s, self.raise_on, self.nan_on = horizon, sleep_s, set(raise_on), set(nan_on)
        self.calls = 0
        self._stop = threading.Event()

    def reset(self):
        pass

    def predict_chunk(self, obs):
        self.calls += 1
        if self.sleep_s:
            self._stop.wait(self.sleep_s)
        if self.calls in self.raise_on:
            raise RuntimeError("model on fire")
        actions = np.full((self.horizon, 4), 0.01 * self.calls, dtype=np.float32)
        if self.calls in self.nan_on:
            actions[:] = np.nan
        return ActionChunk(actions, t0=obs.timestamp, dt=1 / HZ)


class FakeRobot:
    def __init__(self, age_s=0.0, on_send=None):
        self.commands = []
        self.age_s = age_s
        self.on_send = on_send

    def observation_age_s(self):
        return self.age_s

    def observe(self):
        return Observation({}, np.zeros(4, np.float32), "test", 0.0)

    def send(self, command):
        self.commands.append(command)
        if self.on_send:
            self.on_send(len(self.commands))


def simulated_loop(policy, latency_ms, robot=None, latency_model=None, delays=None, **config):
    config = RuntimeConfig(control_hz=HZ, **config).for_policy(policy.spec)
    worker = SimulatedInferenceWorker(policy, latency_model or LatencyModel("fixed", latency_ms), 1 / HZ,
                                      config.max_in_flight)
    return ControlLoop(robot or FakeRobot(), worker, config, clock=SimulatedClock(), delays=delays)


def test_latency_below_chunk_duration_gives_no_misses():
    # 8 actions last 100 ms; a 50 ms model asked when 4 or fewer actions are left is always in time.
    loop = simulated_loop(ChunkPolicy(horizon=8), latency_ms=50, request_when="count", request_threshold=4)
    metrics = loop.run(400)
    assert metrics.misses == 0 and metrics.ticks == 400
    assert metrics.startup_holds == 4  # the very first chunk takes 50 ms = 4 ticks
    assert metrics.policy_calls == pytest.approx(400 / 4, abs=2)


def test_latency_from_predicted_p95_also_avoids_misses():
    loop = simulated_loop(ChunkPolicy(horizon=8), latency_ms=50, request_when="latency")
    assert loop.run(400).misses == 0


def test_a_request_threshold_is_a_floor_under_the_latency_rule():
    # 0 ms latency alone would ask when 1 action is left; a floor of 6 replans every 2 ticks instead.
    metrics = simulated_loop(ChunkPolicy(horizon=8), latency_ms=0, request_when="latency", request_threshold=6).run(40)
    assert metrics.misses == 0 and metrics.policy_calls == 20


def test_the_default_threshold_is_the_policys_executed_horizon():
    spec = PolicySpec(action_dim=4, state_dim=4, chunk_size=8, actions_per_chunk=4)
    assert RuntimeConfig().for_policy(spec).request_threshold == 4  # all 8 queued, asked again after 4
    assert RuntimeConfig().for_policy(spec, actions_per_chunk=2).request_threshold == 6
    assert RuntimeConfig(execute_horizon=6).for_policy(spec).request_threshold == 2
    assert RuntimeConfig(request_threshold=1).for_policy(spec).request_threshold == 1  # set: kept
    assert RuntimeConfig().for_policy(PolicySpec(action_dim=4, state_dim=4, chunk_size=8)).request_threshold == 0
    with pytest.raises(ValueError, match="for_policy"):
        ControlLoop(FakeRobot(), None, RuntimeConfig())
    with pytest.raises(ValueError, match="execute_horizon must be an integer >= 1"):
        RuntimeConfig(execute_horizon=0)
    with pytest.raises(ValueError, match="max_in_flight must be an integer >= 1"):
        RuntimeConfig(max_in_flight=0)


class HalfChunkPolicy(ChunkPolicy):
    """8-action chunks of which it executes 4 before asking again, as ref_dit does."""

    def __init__(self):
        super().__init__(horizon=8)
        self.spec = dataclasses.replace(self.spec, actions_per_chunk=4)


def test_defaults_keep_a_policy_with_a_short_executed_horizon_fed_at_50_ms():
    # The old defaults (queue the 4 executed actions, ask when the queue is empty) missed every tick after
    # each chunk; the defaults queue all 8 and ask once 4 ran, or when the rest lasts less than the latency.
    old = simulated_loop(HalfChunkPolicy(), latency_ms=50, request_when="count", request_threshold=0,
                         execute_horizon=4).run(400)
    new = simulated_loop(HalfChunkPolicy(), latency_ms=50).run(400)
    assert old.misses > 100
    assert new.misses == 0 and new.startup_holds == 4
    at_zero = simulated_loop(HalfChunkPolicy(), latency_ms=0).run(400)
    assert at_zero.misses == 0 and at_zero.policy_calls == 100  # replanned every 4 ticks, as in sync


def test_latency_above_chunk_duration_counts_misses_and_discards_late_actions():
    # 8 actions = 100 ms but each chunk takes 200 ms: the robot holds between chunks.
    robot = FakeRobot()
    loop = simulated_loop(ChunkPolicy(horizon=8), latency_ms=200, robot=robot, request_when="count")
    metrics = loop.run(320)
    assert metrics.ticks == 320 and len(robot.commands) == 320  # the executor kept its rate
    assert metrics.misses > 0
    # Every chunk arrives 16 ticks after its observation: all 8 of its actions are already late.
    executed = sum(1 for c in robot.commands if c[0] > 0)
    assert executed == 0 and metrics.discarded_actions == 8 * metrics.policy_calls


def test_threaded_worker_never_stalls_the_executor():
    from vla_runtime.control.loop import MonotonicClock

    policy = ChunkPolicy(horizon=2, sleep_s=0.1)  # 2 actions at 50 Hz = 40 ms, inference 100 ms
    worker = ThreadedInferenceWorker(policy)
    robot = FakeRobot()
    loop = ControlLoop(robot, worker, RuntimeConfig(control_hz=50).for_policy(policy.spec), clock=MonotonicClock())
    try:
        metrics = loop.run(25)
    finally:
        worker.close()
    assert metrics.ticks == 25 and len(robot.commands) == 25
    assert metrics.misses > 0  # the robot was held while the policy thought, not stopped
    assert policy.calls < 25


@pytest.mark.parametrize("failure", ["raise_on", "nan_on"])
def test_a_policy_that_raises_or_returns_nan_gets_the_safe_action_and_the_loop_lives(failure):
    robot = FakeRobot()
    loop = simulated_loop(ChunkPolicy(horizon=4, **{failure: [2, 3]}), latency_ms=0, robot=robot)
    metrics = loop.run(40)
    assert metrics.ticks == 40 and metrics.faults >= 2
    safe = np.zeros(4, np.float32)
    safe[3] = 0.01  # the gripper keeps the last command it had
    held = [c for c in robot.commands[4:12]]
    assert any(np.array_equal(c, safe) for c in held)
    assert all(np.all(np.isfinite(c)) for c in robot.commands)
    assert robot.commands[-1][0] > 0.03  # later chunks are executed again


def test_stale_observation_holds():
    robot = FakeRobot(age_s=2.0)
    metrics = simulated_loop(ChunkPolicy(), latency_ms=0, robot=robot).run(10)
    assert metrics.safety_events["stale"] == 10
    assert all(np.array_equal(c, np.zeros(4)) for c in robot.commands)


def test_estop_sends_no_further_commands():
    loop = None

    def press_estop_after_five(sent):
        if sent == 5:
            loop.estop()

    robot = FakeRobot(on_send=press_estop_after_five)
    loop = simulated_loop(ChunkPolicy(), latency_ms=0, robot=robot)
    loop.run(100)
    assert len(robot.commands) == 5
    assert loop.run(100).ticks == 5  # latched: running again sends nothing


def test_action_queue_merges():
    replace = ActionQueue("replace")
    replace.merge(0, np.ones((4, 1)), now=0)
    replace.merge(2, np.full((4, 1), 3.0), now=2)
    assert replace.ticks() == [2, 3, 4, 5] and replace.pop(2)[0] == 3.0

    ensemble = ActionQueue("temporal_ensemble", ensemble_decay=0.5)
    ensemble.merge(0, np.ones((4, 1)), now=0)
    ensemble.merge(2, np.full((4, 1), 3.0), now=2)
    first, second = 1.0, np.exp(-0.5)
    assert ensemble.pop(2)[0] == pytest.approx((first * 1 + second * 3) / (first + second))
    assert ensemble.pop(4)[0] == pytest.approx(3.0)  # only the new chunk predicted tick 4

    average = ActionQueue("weighted_average", old_weight=0.3)
    average.merge(0, np.ones((4, 1)), now=0)
    average.merge(1, np.full((4, 1), 2.0), now=1)
    assert average.pop(1)[0] == pytest.approx(0.3 * 1 + 0.7 * 2)

    late = ActionQueue()
    assert late.merge(0, np.ones((5, 1)), now=3) == 3 and late.ticks() == [3, 4]
    assert late.pop(4) is not None and late.discarded == 4  # tick 3 was never popped
    with pytest.raises(ValueError, match="Unknown chunk merge 'blend'"):
        ActionQueue("blend")


def test_safety_clips_and_rate_limits():
    safety = SafetyLayer(SafetyConfig(max_delta_per_tick=0.1))
    command, status = safety.filter(np.array([5.0, -0.05, 0.0, 0.0]), 0.0)
    assert status == "clipped" and command.tolist() == pytest.approx([0.1, -0.05, 0.0, 0.0])
    command, _ = safety.filter(np.array([1.0, 0.0, 0.0, 0.0]), 0.0)
    assert command[0] == pytest.approx(0.2)
    assert safety.filter(np.zeros(3), 0.0)[1] == "fault"  # wrong dimension
    with pytest.raises(ValueError, match="hold_dims"):
        SafetyConfig(hold_dims=[7])


def synthetic_profiles():
    return [Candidate("none", 120.0, 0.90), Candidate("efficientvla", 60.0, 0.88), Candidate("full", 30.0, 0.80)]


def test_governor_picks_the_least_lossy_profile_that_fits():
    assert BudgetGovernor(synthetic_profiles(), budget_ms=200).current.name == "none"
    assert BudgetGovernor(synthetic_profiles(), budget_ms=100).current.name == "efficientvla"
    assert BudgetGovernor(synthetic_profiles(), budget_ms=40).current.name == "full"
    assert BudgetGovernor(synthetic_profiles(), budget_ms=10).current.name == "full"  # nothing fits: fastest


def test_governor_switches_with_hysteresis():
    governor = BudgetGovernor(synthetic_profiles(), budget_ms=100, hysteresis=0.1, window=10)
    for _ in range(30):  # 105 ms: over budget, but inside the hysteresis band
        governor.observe(105.0)
    assert governor.current.name == "efficientvla" and not governor.switches
    calls = 0
    while governor.current.name == "efficientvla" and calls < 10:  # 130 ms: clearly over
        governor.observe(130.0)
        calls += 1
    assert governor.current.name == "full" and len(governor.switches) == 1
    for _ in range(10):  # 20 ms: room to spare, but efficientvla was measured too slow: stay
        governor.observe(20.0)
    assert governor.current.name == "full"
    assert governor.switches[0].from_profile == "efficientvla" and "over budget" in governor.switches[0].reason


def test_governor_switches_up_when_a_better_profile_fits():
    profiles = [Candidate("none", 150.0, 0.9), Candidate("full", 30.0, 0.8)]
    governor = BudgetGovernor(profiles, budget_ms=100, window=5)
    assert governor.current.name == "full"
    governor.expected_ms["none"] = 80.0  # e.g. measured faster on this machine than on the bench
    for _ in range(5):
        governor.observe(25.0)
    assert governor.current.name == "none"


def test_latency_models():
    assert LatencyModel("fixed", 200).latency(0.001) == pytest.approx(0.2)
    assert LatencyModel("measured").latency(0.03) == pytest.approx(0.03)
    with pytest.raises(ValueError, match="needs runtime.recorded_latencies"):
        LatencyModel("recorded")
    with pytest.raises(ValueError, match="Unknown latency model 'gaussian'"):
        LatencyModel("gaussian")


def test_sync_executor_queues_actions_per_chunk_and_hides_privileged_state():
    from vla_runtime.control.executor import SyncExecutor, policy_view

    policy = ChunkPolicy(horizon=8)
    seen = []
    predict = policy.predict_chunk
    policy.predict_chunk = lambda obs: seen.append(obs) or predict(obs)
    executor = SyncExecutor(policy, actions_per_chunk=3)
    executor.reset()
    obs = Observation({}, np.zeros(4, np.float32), "test", 0.0, privileged_state=np.ones(7))
    assert executor.needs_observation
    commands = [executor.act(obs)[0] for _ in range(7)]
    assert commands == pytest.approx([0.01] * 3 + [0.02] * 3 + [0.03])  # 3 actions of each chunk, then ask again
    assert policy.calls == 3 and len(executor.latency_s) == 3 and not executor.needs_observation
    assert all(o.privileged_state is None for o in seen)  # a learned policy never sees simulator state
    executor.reset()
    assert executor.needs_observation and executor.last_chunk is None
    expert = ChunkPolicy()
    expert.spec = PolicySpec(action_dim=4, state_dim=4, privileged=True)
    assert policy_view(expert, obs) is obs and policy_view(policy, obs).privileged_state is None


class EveryOtherReuse:
    """A reuse gate that holds the last chunk every second time it is asked."""

    def __init__(self):
        self.asked = 0

    def should_reuse(self, obs, last_chunk):
        self.asked += 1
        return self.asked % 2 == 1

    def on_inference(self, obs, chunk):
        pass

    def reset(self):
        self.asked = 0


def test_sync_executor_replays_a_reused_chunk_as_the_loop_does():
    """The synchronous protocol is the loop with zero latency: a reused chunk's executed actions run again (the
    separate executor it replaced had nothing queued after a reuse)."""
    from vla_runtime.control.executor import SyncExecutor

    policy = ChunkPolicy(horizon=8)
    executor = SyncExecutor(policy, actions_per_chunk=2, gate=EveryOtherReuse())
    obs = Observation({}, np.zeros(4, np.float32), "test", 0.0)
    commands = [executor.act(obs)[0] for _ in range(8)]
    assert commands == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.02, 0.02, 0.02, 0.02])
    assert policy.calls == 2 and executor.reuses == 2 and len(executor.gate_s) == 3


class LongChunkPolicy(ChunkPolicy):
    """32-action chunks executing 16 (ref_dit_long's shape)."""

    def __init__(self):
        super().__init__(horizon=32)
        self.spec = dataclasses.replace(self.spec, actions_per_chunk=16)


def test_one_request_in_flight_cannot_keep_up_past_half_the_chunk_and_pipelining_can():
    # 300 ms = 24 ticks against 32-action chunks: one request at a time leaves 8 actions per chunk for 24 ticks.
    one = simulated_loop(LongChunkPolicy(), latency_ms=300).run(800)
    assert one.misses > 400 and one.max_in_flight == 1
    # Asked for when what is queued or in flight lasts less than the latency plus a tick: every 7 ticks, so 4 lanes.
    # Before the first chunk, the loop knows the latency only from earlier episodes (the shared delay estimate).
    delays = DelayEstimator(1 / HZ, warmup_calls=0)
    first, second = (simulated_loop(LongChunkPolicy(), latency_ms=300, max_in_flight=4, delays=delays).run(800)
                     for _ in range(2))
    assert 0 < first.misses <= 16 and first.startup_holds == 24  # the first chunk arrives with 8 of its 32 left
    assert second.misses == 0 and second.startup_holds == 24
    assert second.max_in_flight == 4 and second.stale_chunks == 0
    # Each request answers a newer observation: chunks arrive every 7 ticks, not every 24.
    assert second.policy_calls > 3 * one.policy_calls


def test_a_pipelined_request_counts_the_chunks_in_flight_as_queued():
    # Under the latency rule at 50 ms one request suffices: a second one in flight would only replan more often
    # than the policy asks.
    metrics = simulated_loop(LongChunkPolicy(), latency_ms=50, max_in_flight=3, request_when="latency").run(400)
    assert metrics.misses == 0 and metrics.max_in_flight == 1
    assert metrics.policy_calls == pytest.approx(400 / 16, abs=2)


@pytest.mark.parametrize(("latency_ms", "lanes", "every", "in_flight"),
                         [(50, 1, 4, 1), (50, 2, 2, 2), (300, 1, 24, 1), (300, 6, 4, 6), (200, 1, 16, 1), (10, 1, 1, 1),
                          (400, 1, 32, 1)])
def test_asap_asks_every_latency_over_lanes_ticks(latency_ms, lanes, every, in_flight):
    # The default: as soon as the latency allows. 50 ms = 4 ticks: one lane asks as each chunk lands (every 4
    # ticks, where the policy's horizon alone asks every 16), two lanes every 2; 300 ms = 24 ticks: one lane back to
    # back, six every 4. Each request answers a fresher frame; the floor stays the executed horizon.
    delays = DelayEstimator(1 / HZ, warmup_calls=0)
    first, second = (simulated_loop(LongChunkPolicy(), latency_ms, max_in_flight=lanes, delays=delays).run(960)
                     for _ in range(2))
    latency_ticks = math.ceil(latency_ms * HZ / 1000)
    assert second.policy_calls == pytest.approx((960 - latency_ticks) / every, abs=2)  # calls whose chunk landed
    assert second.max_in_flight == in_flight
    assert second.stale_chunks == 0
    if latency_ms * HZ / 1000 <= 16 or lanes > 1:  # one lane past half the chunk starves whatever the rule
        assert second.misses == 0


def test_asap_at_zero_latency_keeps_the_synchronous_cadence():
    for policy in (LongChunkPolicy(), HalfChunkPolicy()):
        asap = simulated_loop(policy, latency_ms=0, max_in_flight=4).run(480)
        previous = simulated_loop(policy, latency_ms=0, max_in_flight=4, request_when="latency").run(480)
        assert asap.policy_calls == previous.policy_calls == 480 // policy.spec.actions_per_chunk


def test_a_chunk_overtaken_by_a_newer_one_is_dropped():
    class Reversed(LatencyModel):
        """The first call slow, the rest fast: the second request's chunk arrives first."""

        def latency(self, measured_s):
            self.calls = getattr(self, "calls", 0) + 1
            return 0.2 if self.calls == 2 else 0.05

    policy = ChunkPolicy(horizon=32)
    robot = FakeRobot()
    loop = simulated_loop(policy, 0, robot=robot, latency_model=Reversed("fixed", 0), max_in_flight=2,
                          request_threshold=28)
    metrics = loop.run(40)
    assert metrics.stale_chunks == 1 and metrics.misses == 0
    assert not any(np.isclose(c[0], 0.02) for c in robot.commands)  # the overtaken chunk (call 2) never ran


def test_the_threaded_worker_refuses_more_lanes_than_the_policy_serves():
    with pytest.raises(ValueError, match="computes 1 request"):
        ThreadedInferenceWorker(ChunkPolicy(), lanes=2)


def test_the_threaded_worker_runs_requests_in_parallel_lanes():
    from vla_runtime.control.loop import MonotonicClock

    policy = LongChunkPolicy()
    policy.spec = dataclasses.replace(policy.spec, concurrent_requests=3)
    policy.sleep_s = 0.05  # 4 ticks at 80 Hz
    worker = ThreadedInferenceWorker(policy, lanes=3)
    loop = ControlLoop(FakeRobot(), worker, RuntimeConfig(control_hz=HZ, request_threshold=30).for_policy(policy.spec),
                       clock=MonotonicClock())
    try:
        metrics = loop.run(80)
    finally:
        worker.close()
    assert metrics.max_in_flight > 1 and metrics.policy_calls > 10 and not metrics.policy_errors


def test_jerk_is_the_second_difference_of_executed_actions_without_the_held_dimensions():
    class Ramp(ChunkPolicy):
        def predict_chunk(self, obs):  # position ramps: a constant velocity, zero jerk; the gripper flips
            actions = np.zeros((self.horizon, 4), np.float32)
            actions[:, 0] = 0.1 * np.arange(self.horizon)
            actions[:, 3] = np.where(np.arange(self.horizon) % 2, 1.0, -1.0)
            return ActionChunk(actions, t0=obs.timestamp, dt=1 / HZ)

    safety = SafetyConfig(hold_dims=[3])
    metrics = simulated_loop(Ramp(horizon=8), 0, request_when="count", request_threshold=0, safety=safety).run(16)
    # Inside each 8-action chunk the ramp has no jerk; across a boundary it restarts at 0: |0 - 2*0.7 + 0.6| = 0.8
    # at the first action of the new chunk, |0.1 - 0 + 0.7| = 0.8 at the second.
    assert metrics.jerk_ticks == 14
    assert metrics.jerk_sum == pytest.approx(1.6)
