"""Logged episodes for replay, from any source, as `Episode`s (frame t paired with the action taken at t).

Sources:
  - a dataset directory of this project (vla-collect; dataset.json + episodes/);
  - ROS 2 bags: an .mcap or .db3 file, a rosbag2 directory (metadata.yaml), or a directory of those, one
    episode per bag. A `TopicMap` says which topic holds which camera, the joint state, the action and the
    instruction; every logged action becomes one step with the newest image / joint state before it;
  - LeRobotDataset directories, through the `lerobot` library when it is installed.
Anything unreadable raises `SourceError` naming the file (and topic); episodes already yielded stay valid.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vla_runtime.data.episodes import Episode, EpisodeStore
from vla_runtime.data.messages import MessageRejected, action_from_msg, image_from_msg, state_from_joint_state
from vla_runtime.data.rosbag import BagError, bag_topic_names, read_bag

SOURCE_TYPES = ("auto", "dataset", "rosbag", "lerobot")


class SourceError(ValueError):
    """A logged source that cannot be replayed; the message names the file and, for bags, the topic."""


@dataclass
class TopicMap:
    images: dict[str, str] = field(default_factory=lambda: {"corner4": "/camera/corner4/image_raw"})
    joint_state: str = "/joint_states"
    joint_names: list[str] = field(default_factory=list)
    action: str = "/vla/action"
    action_type: str = "joint_trajectory"
    action_dim: int | None = None  # None: what the replayed policy outputs (its spec)
    instruction: str = "/instruction"

    def roles(self) -> dict[str, str]:
        """topic -> what it is mapped as, for error messages."""
        roles = {topic: f"images.{camera}" for camera, topic in self.images.items()}
        return {**roles, self.joint_state: "joint_state", self.action: "action"}


@dataclass
class LeRobotKeys:
    images: dict[str, str] = field(default_factory=dict)  # camera -> feature; {}: every observation.images.<camera>
    state: str = "observation.state"
    action: str = "action"


def detect_source_type(path: Path) -> str:
    if (path / "dataset.json").exists():
        return "dataset"
    if (path / "meta" / "info.json").exists():
        return "lerobot"
    if _bags(path):
        return "rosbag"
    raise SourceError(f"{path}: not a dataset (dataset.json), a LeRobot dataset (meta/info.json) or a ROS 2 bag "
                      f"(.mcap / .db3 / metadata.yaml); say which with source_type=")


def logged_episodes(source: str | Path, source_type: str = "auto", topics: TopicMap | None = None,
                    lerobot_keys: LeRobotKeys | None = None, instruction: str | None = None,
                    task_of: Callable[[str], str | None] | None = None) -> Iterator[Episode]:
    """Episodes of `source`, one at a time. `instruction` replaces (or, for bags without an instruction
    topic, supplies) the language instruction. `task_of(instruction)` names the task of a bag's episode
    (a suite's `task_for_instruction`); without it, or when it knows none, the bag's name does."""
    path = Path(source)
    if not path.exists():
        raise SourceError(f"Replay source not found: {path}")
    if source_type not in SOURCE_TYPES:
        raise SourceError(f"Unknown source_type '{source_type}'; use one of {', '.join(SOURCE_TYPES)}")
    kind = detect_source_type(path) if source_type == "auto" else source_type
    if kind == "dataset":
        episodes = _dataset_episodes(path)
    elif kind == "rosbag":
        bags = _bags(path)
        if not bags:
            raise SourceError(f"{path}: no ROS 2 bags (.mcap, .db3, rosbag2 directories) here")
        episodes = (_bag_episode(bag, topics or TopicMap(), index, task_of) for index, bag in enumerate(bags))
    else:
        episodes = _lerobot_episodes(path, lerobot_keys or LeRobotKeys())
    for episode in episodes:
        if instruction:
            episode.instruction = instruction
        if not episode.instruction:
            where = f" (bag topic '{(topics or TopicMap()).instruction}')" if kind == "rosbag" else ""
            raise SourceError(f"{path}: episode {episode.name} has no instruction{where}; give one with instruction=")
        yield episode


def _dataset_episodes(path: Path) -> Iterator[Episode]:
    try:
        store = EpisodeStore(path)
    except (FileNotFoundError, ValueError) as exc:
        raise SourceError(str(exc)) from exc
    paths = store.episode_paths()
    if not paths:
        raise SourceError(f"{path}: the dataset has no episodes")
    for episode_path in paths:
        try:
            yield store.read(episode_path)
        except ValueError as exc:
            raise SourceError(str(exc)) from exc


def _bags(path: Path) -> list[Path]:
    """Each bag at `path`: itself (an .mcap / .db3 file or a rosbag2 directory), or the .mcap / .db3 files
    and rosbag2 directories inside it; [] when there are none."""
    if path.is_file():
        return [path] if path.suffix in (".mcap", ".db3") else []
    if (path / "metadata.yaml").exists():
        return [path]
    return sorted([*path.glob("*.mcap"), *path.glob("*.db3"), *(p.parent for p in path.glob("*/metadata.yaml"))])


def _bag_episode(bag: Path, topics: TopicMap, index: int, task_of: Callable[[str], str | None] | None) -> Episode:
    wanted = [*topics.images.values(), topics.joint_state, topics.action, topics.instruction]
    images: dict[str, list[np.ndarray]] = {camera: [] for camera in topics.images}
    states, actions, stamps = [], [], []
    latest_images: dict[str, np.ndarray] = {}
    latest_state = None
    instruction = ""
    seen: set[str] = set()
    camera_of = {topic: camera for camera, topic in topics.images.items()}
    try:
        for message in read_bag(bag, wanted):
            seen.add(message.topic)
            try:
                if message.topic in camera_of:
                    camera = camera_of[message.topic]
                    image = image_from_msg(message.message)
                    if camera in latest_images and image.shape != latest_images[camera].shape:
                        raise MessageRejected("size", f"image size changed from {latest_images[camera].shape} "
                                                      f"to {image.shape}")
                    latest_images[camera] = image
                elif message.topic == topics.joint_state:
                    latest_state = state_from_joint_state(message.message, topics.joint_names, None)
                elif message.topic == topics.instruction:
                    instruction = message.message.data
                elif message.topic == topics.action:
                    action = action_from_msg(topics.action_type, message.message, topics.action_dim)
                    if latest_state is not None and len(latest_images) == len(topics.images):
                        for camera, image in latest_images.items():
                            images[camera].append(image)
                        states.append(latest_state)
                        actions.append(action)
                        stamps.append(message.log_time_ns / 1e9)
            except MessageRejected as exc:
                raise SourceError(f"{bag}: topic '{message.topic}': {exc}") from exc
            except AttributeError as exc:  # a topic mapped to a message of another type
                raise SourceError(f"{bag}: topic '{message.topic}' holds {message.msgtype}, which does not "
                                  f"fit its role '{topics.roles().get(message.topic, 'instruction')}' ({exc})") from exc
    except BagError as exc:
        raise SourceError(str(exc)) from exc
    missing = [topic for topic in topics.roles() if topic not in seen]
    if missing:
        available = bag_topic_names(bag)
        described = ", ".join(f"'{topic}' ({topics.roles()[topic]})" for topic in missing)
        raise SourceError(f"{bag}: no messages on topic {described}; the bag has topics {sorted(available)}. "
                          f"Map them with topics.images / topics.joint_state / topics.action")
    if not actions:
        raise SourceError(f"{bag}: no action on '{topics.action}' came after an image and a joint state")
    start = stamps[0]
    return Episode(task=(task_of and task_of(instruction)) or bag.stem, task_id=-1, instruction=instruction, seed=index,
                   success=False, images={camera: np.stack(frames) for camera, frames in images.items()},
                   state=np.stack(states), action=np.stack(actions).astype(np.float32),
                   timestamp=np.asarray(stamps) - start)


def _lerobot_episodes(path: Path, keys: LeRobotKeys) -> Iterator[Episode]:
    from vla_runtime.data.lerobot_format import EPISODES_META, IMAGE_KEY, require_lerobot

    try:
        LeRobotDataset = require_lerobot(f"{path} is a LeRobot dataset; reading it").LeRobotDataset
    except ImportError as exc:
        raise SourceError(str(exc)) from exc
    try:
        info = json.loads((path / "meta" / "info.json").read_text())
        dataset = LeRobotDataset(repo_id=f"local/{path.name}", root=path)
    except Exception as exc:  # lerobot's own errors for a broken dataset are of many kinds
        raise SourceError(f"{path}: not a readable LeRobot dataset ({type(exc).__name__}: {exc})") from exc
    features = info["features"]
    images = keys.images or {key[len(IMAGE_KEY):]: key for key in features if key.startswith(IMAGE_KEY)}
    missing = [key for key in [*images.values(), keys.state, keys.action] if key not in features]
    if missing:
        raise SourceError(f"{path}: features {missing} are not in this LeRobot dataset (it has "
                          f"{sorted(features)}); map them with lerobot.images / lerobot.state / lerobot.action")
    # Datasets we wrote say which task and seed each episode was (LeRobot keeps only the instruction).
    ours = path / EPISODES_META
    names = json.loads(ours.read_text())["episodes"] if ours.exists() else []

    def image(tensor) -> np.ndarray:  # float [3, H, W] in [0, 1] -> uint8 [H, W, 3]
        return (tensor.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)

    if not dataset.num_episodes:
        raise SourceError(f"{path}: the LeRobot dataset has no episodes")
    for index in range(dataset.num_episodes):
        start = int(dataset.meta.episodes["dataset_from_index"][index])
        stop = int(dataset.meta.episodes["dataset_to_index"][index])
        frames = [dataset[i] for i in range(start, stop)]
        named = names[index] if index < len(names) else {}
        yield Episode(task=named.get("task", str(frames[0]["task"])), task_id=named.get("task_id", -1),
                      instruction=str(frames[0]["task"]), seed=named.get("seed", index),
                      success=named.get("success", False),
                      images={camera: np.stack([image(f[key]) for f in frames]) for camera, key in images.items()},
                      state=np.stack([f[keys.state].numpy() for f in frames]).astype(np.float32),
                      action=np.stack([f[keys.action].numpy() for f in frames]).astype(np.float32),
                      timestamp=np.asarray([float(f["timestamp"]) for f in frames]))
