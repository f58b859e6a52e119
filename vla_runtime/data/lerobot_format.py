"""Episodes as a LeRobotDataset v3 (written with the `lerobot` library), so LeRobot's trainer and tools read
what our suites record: `vla-collect format=lerobot`, `vla-eval save_episodes=true format=lerobot` and the
converter `vla-convert` all end here. Reading goes the other way in `sources.py` (`vla-replay`).

Features, as LeRobot's own simulation datasets name them: `observation.images.<camera>` (uint8 RGB, video
or image), `observation.state`, `action`; the episode's instruction is its task. Our task name and seed,
which LeRobot has no column for, are kept in `meta/vla_runtime.json`, one entry per episode index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vla_runtime.data.episodes import Episode

IMAGE_KEY = "observation.images."
EPISODES_META = "meta/vla_runtime.json"


# lerobot 0.6 needs Python >= 3.12 and torch < 2.12, so it lives in an environment of its own.
INSTALL_HINT = ("`bash scripts/setup.sh --lerobot` makes a Python 3.12 environment with it, .venv-lerobot "
                "(README, LeRobot)")


def require_lerobot(why: str, module: str = "lerobot.datasets.lerobot_dataset"):
    """A module of lerobot, or an error saying what needed it and how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{why} needs the lerobot library ({exc}): {INSTALL_HINT}") from exc


def features_of(episode: Episode, use_videos: bool) -> dict:
    """LeRobot feature specs for episodes shaped like `episode`."""
    features = {f"{IMAGE_KEY}{camera}": {"dtype": "video" if use_videos else "image", "shape": frames.shape[1:],
                                          "names": ["height", "width", "channels"]}
                for camera, frames in sorted(episode.images.items())}
    features["observation.state"] = {"dtype": "float32", "shape": (episode.state.shape[1],), "names": None}
    features["action"] = {"dtype": "float32", "shape": (episode.action.shape[1],), "names": None}
    return features


def _write_shard(episodes: Iterable[Episode], root: Path, fps: int, repo_id: str, use_videos: bool,
                 robot_type: str | None, image_writer_threads: int, done) -> None:
    """One LeRobotDataset from `episodes`; `done()` is called after each episode (progress)."""
    LeRobotDataset = require_lerobot("Writing a LeRobotDataset").LeRobotDataset
    dataset, features, extra = None, None, []
    for episode in episodes:
        if dataset is None:
            features = features_of(episode, use_videos)
            dataset = LeRobotDataset.create(repo_id, fps=fps, features=features, root=root, robot_type=robot_type,
                                            use_videos=use_videos, image_writer_threads=image_writer_threads)
        elif features_of(episode, use_videos) != features:
            raise ValueError(f"Episode {episode.name} does not match the dataset's features: "
                             f"{features_of(episode, use_videos)} vs {features}")
        for t in range(episode.length):
            frame = {f"{IMAGE_KEY}{camera}": frames[t] for camera, frames in episode.images.items()}
            frame["observation.state"] = np.asarray(episode.state[t], dtype=np.float32)
            frame["action"] = np.asarray(episode.action[t], dtype=np.float32)
            dataset.add_frame({**frame, "task": episode.instruction})
        dataset.save_episode()
        extra.append({"task": episode.task, "task_id": int(episode.task_id), "seed": int(episode.seed),
                      "success": bool(episode.success)})
        done()
    if dataset is None:
        raise ValueError(f"No episodes to write to {root}")
    dataset.finalize()
    (root / EPISODES_META).write_text(json.dumps({"episodes": extra}, indent=1) + "\n")


# What forked shard writers read (fork shares it; pickling decoded episodes to them would copy gigabytes).
_SHARDS: dict = {}


def _write_forked_shard(index: int) -> None:
    episodes, bounds, options, progress = (_SHARDS[key] for key in ("episodes", "bounds", "options", "progress"))
    start, stop = bounds[index]
    _write_shard((episodes[i] for i in range(start, stop)), **options[index], done=lambda: progress.put(1))


def write_lerobot(episodes: Sequence[Episode], root: str | Path, fps: int, repo_id: str | None = None,
                  use_videos: bool = True, robot_type: str | None = None, workers: int = 1,
                  image_writer_threads: int = 4) -> Path:
    """Writes `episodes` as a new LeRobotDataset at `root` (which must not exist: LeRobot refuses to
    overwrite). Episodes must agree in cameras, image size and dims; the first one sets them. With
    `workers` > 1, forked processes write contiguous shards that LeRobot's `aggregate_datasets` then joins in
    order (a sequence that loads lazily, like `EpisodeStore`, is read by each worker for its own shard)."""
    root = Path(root)
    repo_id = repo_id or f"local/{root.name}"
    workers = max(1, min(workers, len(episodes)))
    # The AV1 encoder (SVT-AV1) prints a 40-line banner per episode at its default level; errors only.
    os.environ.setdefault("SVT_LOG", "1")
    bar = tqdm(total=len(episodes), desc="LeRobotDataset", unit="episode")
    common = dict(fps=fps, use_videos=use_videos, robot_type=robot_type, image_writer_threads=image_writer_threads)
    if workers == 1:
        _write_shard(episodes, root, repo_id=repo_id, done=bar.update, **common)
        bar.close()
        return root
    import multiprocessing
    import shutil

    from lerobot.datasets.aggregate import aggregate_datasets

    context = multiprocessing.get_context("fork")
    shard_roots = [root.with_name(f".{root.name}.shard{k}") for k in range(workers)]
    for shard in shard_roots:
        shutil.rmtree(shard, ignore_errors=True)
    edges = [len(episodes) * k // workers for k in range(workers + 1)]
    _SHARDS.update(episodes=episodes, bounds=list(zip(edges, edges[1:], strict=False)), progress=context.Queue(),
                   options=[{"root": shard, "repo_id": f"{repo_id}_shard{k}", **common}
                            for k, shard in enumerate(shard_roots)])
    try:
        with context.Pool(workers) as pool:
            result = pool.map_async(_write_forked_shard, range(workers))
            while bar.n < len(episodes) and not (result.ready() and _SHARDS["progress"].empty()):
                try:
                    bar.update(_SHARDS["progress"].get(timeout=1))
                except Exception:  # queue.Empty: look again whether a worker failed
                    continue
            result.get()  # raises a worker's error
        bar.close()
        aggregate_datasets([f"{repo_id}_shard{k}" for k in range(workers)], repo_id, roots=shard_roots, aggr_root=root)
        extra = [e for shard in shard_roots for e in json.loads((shard / EPISODES_META).read_text())["episodes"]]
        (root / EPISODES_META).write_text(json.dumps({"episodes": extra}, indent=1) + "\n")
    finally:
        _SHARDS.clear()
        for shard in shard_roots:
            shutil.rmtree(shard, ignore_errors=True)
    return root


FORMATS = ("native", "lerobot")
LEROBOT_SUBDIR = "lerobot"  # where vla-collect / vla-eval put the LeRobotDataset, beside their own episodes


def check_format(format: str) -> str:
    """Before any work is done: a known format, and for `lerobot` the library that writes it."""
    if format not in FORMATS:
        raise ValueError(f"Unknown dataset format '{format}'; choose one of {', '.join(FORMATS)}")
    if format == "lerobot":
        require_lerobot("format=lerobot")
    return format


def convert_store(source: str | Path, root: str | Path, use_videos: bool = True, workers: int = 1) -> Path:
    """A dataset of ours (vla-collect, vla-eval save_episodes) -> a LeRobotDataset at `root`."""
    from vla_runtime.data.episodes import EpisodeStore
    from vla_runtime.sim import make_suite

    store = EpisodeStore(source)
    fps = round(1 / make_suite(store.suite_name).spec.control_dt)
    return write_lerobot(store, root, fps, use_videos=use_videos, robot_type=store.suite_name, workers=workers)
