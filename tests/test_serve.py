"""vla-serve: openpi's client drives it, bad requests get answers and leave it up, clients keep their own state,
a remote policy runs in the loop."""

import threading
import urllib.request

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from vla_runtime.cli.serve import build_server
from vla_runtime.policies import make_policy
from vla_runtime.serve.protocol import ObservationKeys, ProtocolError, pack, unpack
from vla_runtime.serve.remote import RemotePolicy
from vla_runtime.serve.server import PolicyServer, ServeConfig, ServerThread
from vla_runtime.sim import make_suite
from vla_runtime.types import ActionChunk, ChunkPrefix, Observation, PolicySpec, PolicyStructure

SPEC = PolicySpec(action_dim=4, state_dim=4, cameras=("corner4",), image_size=(8, 8), chunk_size=3,
                  control_dt=0.0125)


class CountingPolicy:
    """Test double: action value = calls since its last reset; can be held inside a call until released."""

    def __init__(self, hold: threading.Event | None = None):
        self.spec, self.structure = SPEC, PolicyStructure()
        self.calls = 0
        self.hold = hold
        self.inside = threading.Event()

    def reset(self):
        self.calls = 0

    def predict_chunk(self, obs):
        self.last_prefix = obs.prefix
        self.inside.set()
        if self.hold is not None:
            self.hold.wait(10)
        self.calls += 1
        return ActionChunk(np.full((3, 4), self.calls, np.float32), obs.timestamp, 0.0125)


def request(value=0):
    return {"observation/image": np.full((8, 8, 3), value, np.uint8), "observation/state": np.zeros(4, np.float32),
            "prompt": "close the drawer"}


def serve(*policies, **config):
    return ServerThread(PolicyServer(list(policies), ServeConfig(port=0, slots=len(policies), **config),
                                     {"policy": "counting", "spec": {"action_dim": 4, "state_dim": 4,
                                                                     "cameras": ["corner4"], "image_size": [8, 8],
                                                                     "chunk_size": 3, "control_dt": 0.0125}}))


def call(ws, message):
    ws.send(message if isinstance(message, (bytes, str)) else pack(message))
    reply = ws.recv(timeout=10)
    return reply if isinstance(reply, str) else unpack(reply)


def test_openpi_client_drives_the_shipped_ref_dit_for_an_episode_like_local_inference():
    from openpi_client import websocket_client_policy as openpi  # setup.sh --dev installs it
    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        cfg = compose("serve", overrides=["policy=ref_dit", "port=0", "num_threads=1"])
    local = make_policy("ref_dit")
    suite = make_suite("metaworld")
    env = suite.make_env("drawer-close-v3", render=True)
    with ServerThread(build_server(cfg)) as server:
        client = openpi.WebsocketClientPolicy(server.url)
        assert client.get_server_metadata()["policy"] == "ref_dit"
        env.reset(1000000, render=False)
        local.reset()
        steps = 0
        while steps < 40:
            obs = env.observe(render=True)
            reply = client.infer({"observation/image": obs.images["corner4"], "observation/state": obs.state,
                                  "prompt": obs.instruction})
            expected = local.predict_chunk(obs.without_privileged_state()).actions
            np.testing.assert_allclose(reply["actions"], expected, atol=1e-6)
            assert reply["server_timing"]["infer_ms"] > 0
            for action in reply["actions"][: local.spec.actions_per_chunk]:
                _, _, success, truncated, _ = env.step(action, render=False)
                steps += 1
            if success or truncated:
                break
    env.close()


BAD_REQUESTS = [
    ("text instead of msgpack", "hello", "expected a binary msgpack message"),
    ("bytes that are not msgpack", b"\xc1\xc1\xc1", "not a msgpack message"),
    ("a list, not a dict", [1, 2, 3], "expected an observation dict"),
    ("missing image", {"observation/state": np.zeros(4, np.float32), "prompt": "x"}, "'observation/image'"),
    ("wrong image shape", {**request(), "observation/image": np.zeros((9, 8, 3), np.uint8)}, "8x8x3"),
    ("float image", {**request(), "observation/image": np.zeros((8, 8, 3), np.float32)}, "uint8"),
    ("NaN state", {**request(), "observation/state": np.array([0, np.nan, 0, 0], np.float32)}, "finite"),
    ("short state", {**request(), "observation/state": np.zeros(2, np.float32)}, "4 finite numbers"),
    ("prompt not a string", {**request(), "prompt": 7}, "must be a string"),
    ("object array", {b"__ndarray__": True, b"data": b"", b"dtype": "|O", b"shape": [0]}, "numeric arrays only"),
    ("truncated array", {b"__ndarray__": True, b"data": b"\x00" * 3, b"dtype": "<f4", b"shape": [2]},
     "malformed array"),
]


def test_bad_requests_are_answered_and_the_server_stays_up():
    with serve(CountingPolicy(), max_message_mb=0.01) as server, connect(server.url) as ws:
        unpack(ws.recv(timeout=10))  # metadata
        for what, message, words in BAD_REQUESTS:
            reply = call(ws, message)
            assert isinstance(reply, str) and words in reply, (what, reply)
        assert call(ws, request())["actions"].shape == (3, 4)  # the same connection still works
        assert server.server.counters["errors"] == len(BAD_REQUESTS)
    with serve(CountingPolicy(), max_message_mb=0.01) as server:
        with connect(server.url) as ws:
            ws.recv(timeout=10)
            ws.send(pack({**request(), "padding": np.zeros(20_000, np.uint8)}))  # over 10 kB
            with pytest.raises(Exception, match="1009|too big"):
                ws.recv(timeout=10)
        with connect(server.url) as ws:  # the server took the next client
            ws.recv(timeout=10)
            assert call(ws, request())["actions"].shape == (3, 4)


def test_health_is_answered_while_a_policy_computes_and_a_full_queue_says_busy():
    release = threading.Event()
    policy = CountingPolicy(hold=release)
    with serve(policy, max_queue=1) as server, connect(server.url) as first, connect(server.url) as second:
        first.recv(timeout=10), second.recv(timeout=10)
        first.send(pack(request()))
        assert policy.inside.wait(10)  # the inference is running, and held
        health = urllib.request.urlopen(server.url.replace("ws://", "http://") + "/healthz", timeout=5)
        assert health.status == 200
        assert "busy" in call(second, request())  # the one slot's queue stays full: busy after busy_wait_ms
        release.set()
        assert unpack(first.recv(timeout=10))["actions"].shape == (3, 4)


def test_each_client_starts_from_a_reset_policy_and_keeps_its_state():
    policy = CountingPolicy()
    with serve(policy) as server, connect(server.url) as a, connect(server.url) as b:
        a.recv(timeout=10), b.recv(timeout=10)
        assert [call(a, request())["actions"][0, 0] for _ in range(3)] == [1, 2, 3]
        assert call(b, request())["actions"][0, 0] == 1  # b never continues a's episode
        assert call(a, request())["actions"][0, 0] == 1  # one slot, two clients: a switch resets
        assert call(a, {"reset": True}) == {"reset": True}
        assert call(a, request())["actions"][0, 0] == 1
    policies = [CountingPolicy(), CountingPolicy()]
    with serve(*policies) as server, connect(server.url) as a, connect(server.url) as b:
        a.recv(timeout=10), b.recv(timeout=10)
        for _ in range(2):
            call(a, request()), call(b, request())
        assert call(a, request())["actions"][0, 0] == 3  # a slot each: nothing resets
        assert [p.calls for p in policies] == [3, 2]


def test_a_token_is_required_when_set():
    with serve(CountingPolicy(), token="s3cret") as server:
        with pytest.raises(InvalidStatus, match="401"):
            connect(server.url).recv(timeout=10)
        with connect(server.url, additional_headers={"Authorization": "Api-Key s3cret"}) as ws:
            assert unpack(ws.recv(timeout=10))["policy"] == "counting"


def test_the_remote_policy_predicts_through_the_server_and_a_dead_server_raises():
    with serve(CountingPolicy()) as server:
        remote = RemotePolicy(server.url)
        assert remote.spec == SPEC
        obs = Observation({"corner4": np.zeros((8, 8, 3), np.uint8)}, np.zeros(4, np.float32), "x", 0.0)
        assert remote.predict_chunk(obs).actions[0, 0] == 1
        remote.reset()
        assert remote.predict_chunk(obs).actions[0, 0] == 1
    with pytest.raises(ConnectionError, match="policy server"):
        remote.predict_chunk(obs)
    with pytest.raises(ConnectionError, match="no policy server"):
        remote.predict_chunk(obs)  # and the next call tries again


def test_protocol_round_trip_and_keys():
    message = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": np.float32(2.5), "c": "text"}
    decoded = unpack(pack(message))
    assert np.array_equal(decoded["a"], message["a"]) and decoded["a"].dtype == np.int16 and decoded["c"] == "text"
    with pytest.raises(ProtocolError, match="numeric"):
        pack({"x": np.array(["a"], dtype=object)})
    keys = ObservationKeys(images={"corner4": "img"}, state="s", prompt="p")
    assert keys.image_keys(("corner4",)) == {"corner4": "img"}
    assert ObservationKeys().image_keys(("a", "b", "c")) == {"a": "observation/image", "b": "observation/wrist_image",
                                                            "c": "observation/image_2"}
    # Real-time chunking's prefix travels with a request, checked like the rest.
    obs = Observation({"corner4": np.zeros((8, 8, 3), np.uint8)}, np.zeros(4, np.float32), "x", 0.0,
                      prefix=ChunkPrefix(np.full((2, 4), 0.5, np.float32), delay=1))
    message = unpack(pack(ObservationKeys().to_message(obs, ("corner4",))))
    back = ObservationKeys().to_observation(message, SPEC, 0.0)
    assert back.prefix.delay == 1 and np.array_equal(back.prefix.actions, obs.prefix.actions)
    assert ObservationKeys().to_observation(request(), SPEC, 0.0).prefix is None
    for bad, match in (({"rtc/prefix_delay": -1}, "an integer >= 0"), ({"rtc/prefix_delay": 1.5}, "an integer"),
                       ({"rtc/prefix_actions": np.zeros((2, 3), np.float32)}, "rows of 4 finite numbers"),
                       ({"rtc/prefix_actions": np.zeros((9, 4), np.float32)}, "1 to 3 rows"),
                       ({"rtc/prefix_actions": [[float("nan")] * 4]}, "finite")):
        with pytest.raises(ProtocolError, match=match):
            ObservationKeys().to_observation({**message, **bad}, SPEC, 0.0)


def test_a_server_that_dies_mid_run_shows_as_policy_errors_and_the_loop_holds_the_robot():
    from test_control import FakeRobot

    from vla_runtime.control.inference import LatencyModel, SimulatedInferenceWorker
    from vla_runtime.control.loop import ControlLoop, RuntimeConfig, SimulatedClock

    class CameraRobot(FakeRobot):
        def observe(self):
            return Observation({"corner4": np.zeros((8, 8, 3), np.uint8)}, np.zeros(4, np.float32), "x", 0.0)

    server = serve(CountingPolicy()).__enter__()
    robot = CameraRobot(on_send=lambda sent: server.__exit__(None, None, None) if sent == 20 else None)
    remote = RemotePolicy(server.url, timeout_s=5)
    loop = ControlLoop(robot, SimulatedInferenceWorker(remote, LatencyModel("fixed", 0), 0.0125),
                       RuntimeConfig(control_hz=80).for_policy(remote.spec), clock=SimulatedClock())
    metrics = loop.run(60)
    assert metrics.ticks == 60 and len(robot.commands) == 60  # the loop kept its rate to the end
    assert metrics.policy_errors and all("policy server" in error for error in metrics.policy_errors)
    assert all(np.all(command[:3] == 0) for command in robot.commands[24:])  # held: zero motion


def test_a_remote_policy_on_a_server_with_two_slots_takes_two_requests_at_once():
    from vla_runtime.control.inference import ThreadedInferenceWorker

    release = threading.Event()
    policies = [CountingPolicy(release), CountingPolicy(release)]
    obs = Observation({"corner4": np.zeros((8, 8, 3), np.uint8)}, np.zeros(4, np.float32), "x", 0.0,
                      prefix=ChunkPrefix(np.full((2, 4), 0.5, np.float32), delay=1))
    with serve(*policies) as server:
        remote = RemotePolicy(server.url)
        assert remote.spec.concurrent_requests == 2
        worker = ThreadedInferenceWorker(remote, lanes=2)
        results = []
        try:
            assert worker.request(obs, 0) and worker.request(obs, 1) and not worker.request(obs, 2)
            assert all(policy.inside.wait(10) for policy in policies)  # both slots compute at once
            release.set()
            for _ in range(500):
                while (result := worker.poll(0)) is not None:
                    results.append(result)
                if len(results) == 2:
                    break
                threading.Event().wait(0.01)
            assert [policy.calls for policy in policies] == [1, 1]
            remote.reset()  # every connection's episode: each slot's next request starts from a reset policy
            assert worker.request(obs, 2) and worker.request(obs, 3)
            for _ in range(500):
                if len(results) == 4:
                    break
                while (result := worker.poll(0)) is not None:
                    results.append(result)
                threading.Event().wait(0.01)
        finally:
            worker.close()
            remote.close()
    assert sorted(r.request_tick for r in results) == [0, 1, 2, 3] and not any(r.error for r in results)
    assert all(policy.last_prefix is not None and policy.last_prefix.delay == 1 for policy in policies)
    assert [policy.calls for policy in policies] == [1, 1]
