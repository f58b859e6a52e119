"""vla-replay over a vla-collect dataset and over ROS 2 bags (MCAP written like the control node does,
sqlite3 written by rosbags), and the errors of broken sources with their partial reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from vla_runtime.cli.collect import collect
from vla_runtime.cli.common import UsageError
from vla_runtime.cli.replay import run
from vla_runtime.data.episodes import EpisodeStore
from vla_runtime.data.rosbag import McapBagWriter
from vla_runtime.sim import make_suite

ACTION_TOPIC, IMAGE_TOPIC, STATE_TOPIC = "/vla/action", "/camera/corner4/image_raw", "/joint_states"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """One expert episode at ref_dit's camera and image size."""
    root = tmp_path_factory.mktemp("replay") / "demos"
    collect(make_suite("metaworld", image_size=128, default_max_steps=150), ["drawer-close-v3"], 1, root,
            max_attempts_per_task=3, workers=1, progress=False)
    return root


def replay(tmp_path: Path, source: Path, *overrides: str) -> dict:
    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        cfg = compose("replay", overrides=[f"source={source}", f"output_dir={tmp_path / 'out'}", "num_threads=1",
                                           *overrides])
    run(cfg)
    return json.loads((tmp_path / "out" / "replay.json").read_text())


def test_replay_over_a_collected_dataset(tmp_path, dataset):
    # bac first: the `none` pass after it also checks that removing bac restores the exact baseline.
    report = replay(tmp_path, dataset, "accel=[bac,none]", "budget_ms=1000")
    episode = EpisodeStore(dataset).read(EpisodeStore(dataset).episode_paths()[0])
    none, bac = report["profiles"]["none"], report["profiles"]["bac"]
    assert none["action_mse_vs_none"] == 0.0  # the unaccelerated policy against a separate pass of itself
    assert bac["action_mse_vs_none"] > 0.0  # bac approximates the action head
    assert 0.0 < none["action_mse_vs_logged"] < 0.5  # the trained policy follows the expert, not exactly
    assert none["policy_calls"] == bac["policy_calls"] == -(-episode.length // 4)
    assert none["latency_ms_p50"] > 0 and len(none["per_dim_mse_vs_logged"]) == 4
    assert report["steps"] == episode.length and report["error"] is None
    assert report["governor"]["initial"] in ("none", "bac")
    for plot in ("latency_cdf.png", "error_histogram.png", f"{episode.name}_actions.png"):
        assert (tmp_path / "out" / plot).stat().st_size > 0
    assert "| none |" in (tmp_path / "out" / "replay.md").read_text()


def test_replay_plays_latency_in_and_real_time_chunking_smooths_the_boundaries(tmp_path, dataset):
    naive = replay(tmp_path / "naive", dataset, "latency_ticks=2")["profiles"]["none"]
    rtc = replay(tmp_path / "rtc", dataset, "latency_ticks=2", "chunking=rtc")["profiles"]["none"]
    assert naive["policy_calls"] == rtc["policy_calls"] and naive["boundary_jump_mean"] > 0
    assert rtc["boundary_jump_mean"] < naive["boundary_jump_mean"]
    with pytest.raises(UsageError, match="latency_ticks"):
        replay(tmp_path / "bad", dataset, "chunking=rtc")
    with pytest.raises(UsageError, match="latency_ticks must be a whole number"):
        replay(tmp_path / "bad", dataset, "latency_ticks=-2")


def write_mcap_bag(path: Path, episode, image_encoding: str = "rgb8", skip_topic: str | None = None) -> None:
    """The episode as the control node logs it: image + joint state, then the action taken."""
    from builtin_interfaces.msg import Time
    from rclpy.serialization import serialize_message
    from std_msgs.msg import String

    from vla_runtime.ros.messages import action_to_msg, image_to_msg, state_to_joint_state

    writer = McapBagWriter(path)
    if skip_topic != "/instruction":
        writer.write("/instruction", "std_msgs/msg/String", serialize_message(String(data=episode.instruction)), 0)
    for step in range(episode.length):
        ns = (step + 1) * 12_500_000
        stamp = Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)
        image = image_to_msg(episode.images["corner4"][step], stamp, "corner4")
        image.encoding = image_encoding
        state = state_to_joint_state(episode.state[step], ["hand_x", "hand_y", "hand_z", "gripper"], stamp)
        action = action_to_msg("joint_trajectory", episode.action[step], stamp, ["a0", "a1", "a2", "a3"], 0.0125)
        for topic, msgtype, msg in ((IMAGE_TOPIC, "sensor_msgs/msg/Image", image),
                                    (STATE_TOPIC, "sensor_msgs/msg/JointState", state),
                                    (ACTION_TOPIC, "trajectory_msgs/msg/JointTrajectory", action)):
            if topic != skip_topic:
                writer.write(topic, msgtype, serialize_message(msg), ns)
    writer.close()


def write_sqlite3_bag(path: Path, episode) -> None:
    """A rosbag2 sqlite3 bag, written with rosbags (no ROS needed), action as Float32MultiArray."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    types = store.types
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id="")
    with Writer(path, version=9) as writer:
        connections = {topic: writer.add_connection(topic, msgtype, typestore=store) for topic, msgtype in (
            (IMAGE_TOPIC, "sensor_msgs/msg/Image"), (STATE_TOPIC, "sensor_msgs/msg/JointState"),
            (ACTION_TOPIC, "std_msgs/msg/Float32MultiArray"), ("/instruction", "std_msgs/msg/String"))}
        writer.write(connections["/instruction"], 0, store.serialize_cdr(types["std_msgs/msg/String"](
            data=episode.instruction), "std_msgs/msg/String"))
        layout = types["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
        for step in range(episode.length):
            ns = (step + 1) * 12_500_000
            frame = episode.images["corner4"][step]
            messages = {
                IMAGE_TOPIC: types["sensor_msgs/msg/Image"](header=header, height=128, width=128, encoding="rgb8",
                                                            is_bigendian=0, step=384, data=frame.reshape(-1)),
                STATE_TOPIC: types["sensor_msgs/msg/JointState"](
                    header=header, name=[], position=episode.state[step].astype(np.float64),
                    velocity=np.zeros(0), effort=np.zeros(0)),
                ACTION_TOPIC: types["std_msgs/msg/Float32MultiArray"](layout=layout, data=episode.action[step]),
            }
            for topic, message in messages.items():
                writer.write(connections[topic], ns, store.serialize_cdr(message, connections[topic].msgtype))


@pytest.fixture(scope="module")
def episode(dataset):
    store = EpisodeStore(dataset)
    return store.read(store.episode_paths()[0])


def test_replay_over_ros2_bags_matches_the_dataset_replay(tmp_path, dataset, episode):
    pytest.importorskip("rclpy", reason="writing the MCAP bag needs the [ros] extra")
    write_mcap_bag(tmp_path / "bags" / "episode.mcap", episode)
    write_sqlite3_bag(tmp_path / "sqlite_bag", episode)
    from_dataset = replay(tmp_path / "dataset", dataset)["profiles"]["none"]
    from_mcap = replay(tmp_path / "mcap", tmp_path / "bags")["profiles"]["none"]
    from_sqlite = replay(tmp_path / "sqlite", tmp_path / "sqlite_bag", "topics.action_type=float32_array")
    assert from_sqlite["steps"] == from_mcap["steps"] == episode.length
    # The same frames and actions, whatever the container: the same predictions.
    for row in (from_mcap, from_sqlite["profiles"]["none"]):
        assert row["action_mse_vs_logged"] == pytest.approx(from_dataset["action_mse_vs_logged"], rel=1e-6)


def test_a_truncated_bag_names_the_file_and_keeps_the_episodes_before_it(tmp_path, episode):
    pytest.importorskip("rclpy", reason="writing the MCAP bag needs the [ros] extra")
    bags = tmp_path / "bags"
    write_mcap_bag(bags / "a_complete.mcap", episode)
    data = (bags / "a_complete.mcap").read_bytes()
    (bags / "b_truncated.mcap").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="b_truncated.mcap: truncated or corrupt MCAP"):
        replay(tmp_path, bags)
    report = json.loads((tmp_path / "out" / "replay.json").read_text())
    assert len(report["episodes"]) == 1 and "b_truncated.mcap" in report["error"]
    assert report["profiles"]["none"]["steps"] == episode.length


@pytest.mark.parametrize("case, words", [
    ("missing_topic", "no messages on topic '/joint_states' (joint_state)"),
    ("encoding", "topic '/camera/corner4/image_raw': image encoding 'rgba8'"),
    ("no_instruction", "has no instruction (bag topic '/instruction'); give one with instruction="),
])
def test_broken_bags_name_the_file_and_topic(tmp_path, episode, case, words):
    pytest.importorskip("rclpy", reason="writing the MCAP bag needs the [ros] extra")
    bag = tmp_path / "bag.mcap"
    skipped = {"missing_topic": STATE_TOPIC, "no_instruction": "/instruction"}.get(case)
    write_mcap_bag(bag, episode, image_encoding="rgba8" if case == "encoding" else "rgb8", skip_topic=skipped)
    with pytest.raises(UsageError, match=str(bag)) as error:
        replay(tmp_path, bag)
    assert words in str(error.value)
    assert json.loads((tmp_path / "out" / "replay.json").read_text())["episodes"] == []


def test_unreplayable_sources_are_named(tmp_path, dataset):
    empty = tmp_path / "empty"
    shutil.copytree(dataset, empty)
    shutil.rmtree(empty / "episodes")
    (empty / "episodes").mkdir()
    with pytest.raises(UsageError, match="has no episodes"):
        replay(tmp_path, empty)
    with pytest.raises(UsageError, match="not a dataset"):
        replay(tmp_path, tmp_path / "out")  # a directory, but nothing replayable
    lerobot = tmp_path / "lerobot"
    (lerobot / "meta").mkdir(parents=True)
    (lerobot / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v3.0", "features": {}}))
    try:
        import lerobot as _  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="setup.sh --lerobot"):
            replay(tmp_path, lerobot)


def test_an_eval_log_replays_to_the_actions_it_executed(tmp_path):
    """vla-eval save_episodes=true keeps what the policy saw and did; replaying the same policy over it
    predicts exactly the executed actions (same frames, same call steps, same noise sequence)."""
    from vla_runtime.cli import eval as eval_cli

    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        cfg = compose("eval", overrides=["policy=ref_dit", "tasks=[drawer-close-v3]", "episodes_per_task=1",
                                         "workers=1", "save_episodes=true", "sim.default_max_steps=40",
                                         f"output_dir={tmp_path / 'eval'}"])
    eval_cli.run(cfg)
    report = replay(tmp_path, tmp_path / "eval" / "episodes")
    assert report["steps"] == json.loads((tmp_path / "eval" / "results.json").read_text())["episodes"][0]["length"]
    assert report["profiles"]["none"]["action_mse_vs_logged"] < 1e-10
    with pytest.raises(UsageError, match="already holds 1 episodes"):
        eval_cli.run(cfg)
