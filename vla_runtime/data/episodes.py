"""Episode datasets on disk: one zarr group per episode, written atomically.

Layout of a dataset directory:
    dataset.json                  format version + the simulator settings the images were made with
    episodes/<task>__seed<N>.zarr one complete episode: arrays images/<camera>, state, action, timestamp;
                                  attrs task, task_id, instruction, seed, success, length (a '/' in
                                  the task name is '--' in the file name)
    rejected.txt                  "<task> <seed>" per line: expert rollouts that failed (not kept)

An episode is written under episodes/.tmp-* and renamed into place only when complete (a rename is
atomic on POSIX), so a killed writer leaves at most a temporary directory, which readers skip and the
next writer deletes.

zarr is imported where it is used: `Episode` alone (training from in-memory episodes, e.g. on a GPU
machine without zarr) needs only numpy.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "vla_runtime.episodes"
FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"
IMAGE_CHUNK_FRAMES = 16


@dataclass
class Episode:
    task: str
    task_id: int
    instruction: str
    seed: int
    success: bool
    images: dict[str, np.ndarray]  # camera -> uint8 [T, H, W, 3]
    state: np.ndarray  # float32 [T, S]
    action: np.ndarray  # float32 [T, A]
    timestamp: np.ndarray  # float64 [T], seconds since the episode started

    def __post_init__(self) -> None:
        length = len(self.action)
        lengths = {"state": len(self.state), "timestamp": len(self.timestamp)}
        lengths.update({f"images/{cam}": len(frames) for cam, frames in self.images.items()})
        wrong = {name: n for name, n in lengths.items() if n != length}
        if wrong:
            raise ValueError(f"Episode arrays disagree in length with action ({length}): {wrong}")

    @property
    def length(self) -> int:
        return len(self.action)

    @property
    def name(self) -> str:
        return episode_name(self.task, self.seed)


def episode_name(task: str, seed: int) -> str:
    # A task name may hold a "/" (LIBERO's <set>/<task>); the file name must not. The task itself is an attr.
    return f"{task.replace('/', '--')}__seed{seed}"


class EpisodeStore:
    """Read and write the episodes of one dataset directory."""

    def __init__(self, root: str | Path, sim_settings: dict[str, Any] | None = None, create: bool = False):
        """`create`: make the directory if needed; `sim_settings` must then match an existing one."""
        self.root = Path(root)
        self.episodes_dir = self.root / "episodes"
        meta_path = self.root / "dataset.json"
        if not meta_path.exists():
            if not create:
                raise FileNotFoundError(f"{self.root} is not an episode dataset (no dataset.json)")
            self.episodes_dir.mkdir(parents=True, exist_ok=True)
            meta = {"format": FORMAT, "version": FORMAT_VERSION, "sim": sim_settings or {}}
            tmp = meta_path.with_name(".dataset.json.tmp")
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
            tmp.replace(meta_path)
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_path} is not valid JSON: {exc}") from exc
        if self.meta.get("format") != FORMAT or self.meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: expected format {FORMAT} version {FORMAT_VERSION}, found "
                             f"{self.meta.get('format')} version {self.meta.get('version')}")
        if create and sim_settings is not None and self.meta["sim"] != sim_settings:
            raise ValueError(f"{self.root} was collected with different simulator settings; "
                             f"existing {self.meta['sim']}, requested {sim_settings}. "
                             f"Use another output_dir or the same settings.")

    @property
    def suite_name(self) -> str:
        """The suite the episodes were recorded in (`sim.sim` in dataset.json)."""
        if "sim" not in self.meta["sim"]:
            raise ValueError(f"{self.root} does not say which suite its episodes come from (sim.sim in its "
                             "dataset.json); record datasets with vla-collect")
        return self.meta["sim"]["sim"]

    # --- writing -------------------------------------------------------------------------------
    def remove_partial_episodes(self) -> list[str]:
        """Delete what killed writers left behind; returns the names removed."""
        removed = []
        for path in self.episodes_dir.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        return removed

    def write(self, episode: Episode) -> Path:
        final = self.episodes_dir / f"{episode.name}.zarr"
        if final.exists():
            raise FileExistsError(f"Episode {final} already exists")
        tmp = self.episodes_dir / f"{_TMP_PREFIX}{episode.name}-{os.getpid()}.zarr"
        shutil.rmtree(tmp, ignore_errors=True)
        import zarr

        group = zarr.open_group(store=str(tmp), mode="w")
        for camera, frames in episode.images.items():
            frames = np.asarray(frames, dtype=np.uint8)
            group.create_array(f"images/{camera}", data=frames,
                               chunks=(IMAGE_CHUNK_FRAMES, *frames.shape[1:]))
        group.create_array("state", data=np.asarray(episode.state, dtype=np.float32))
        group.create_array("action", data=np.asarray(episode.action, dtype=np.float32))
        group.create_array("timestamp", data=np.asarray(episode.timestamp, dtype=np.float64))
        group.attrs.update({
            "task": episode.task, "task_id": int(episode.task_id), "instruction": episode.instruction,
            "seed": int(episode.seed), "success": bool(episode.success), "length": episode.length,
            "cameras": sorted(episode.images),
        })
        os.rename(tmp, final)
        return final

    def add_rejected(self, task: str, seed: int) -> None:
        with open(self.root / "rejected.txt", "a") as f:
            f.write(f"{task} {seed}\n")

    def rejected(self) -> set[tuple[str, int]]:
        path = self.root / "rejected.txt"
        if not path.exists():
            return set()
        seeds = set()
        for line in path.read_text().splitlines():
            parts = line.split()
            # A writer killed mid-line leaves a fragment; that seed is simply tried again.
            if len(parts) == 2 and parts[1].isdigit():
                seeds.add((parts[0], int(parts[1])))
        return seeds

    # --- reading -------------------------------------------------------------------------------
    def episode_paths(self) -> list[Path]:
        return sorted(p for p in self.episodes_dir.glob("*.zarr") if not p.name.startswith(_TMP_PREFIX))

    def index(self) -> list[dict[str, Any]]:
        """Attributes of every complete episode (no arrays loaded)."""
        import zarr

        return [dict(zarr.open_group(store=str(p), mode="r").attrs) for p in self.episode_paths()]

    def read(self, path: str | Path) -> Episode:
        import zarr

        try:
            group = zarr.open_group(store=str(path), mode="r")
            attrs = dict(group.attrs)
            return Episode(
                task=attrs["task"], task_id=attrs["task_id"], instruction=attrs["instruction"],
                seed=attrs["seed"], success=attrs["success"],
                images={cam: group[f"images/{cam}"][:] for cam in attrs["cameras"]},
                state=group["state"][:], action=group["action"][:], timestamp=group["timestamp"][:],
            )
        except (KeyError, FileNotFoundError, ValueError) as exc:
            raise ValueError(f"Episode {path} is damaged or incomplete: {exc}") from exc

    def __len__(self) -> int:
        return len(self.episode_paths())

    def __getitem__(self, index: int) -> Episode:
        return self.read(self.episode_paths()[index])

    def __iter__(self):
        for path in self.episode_paths():
            yield self.read(path)
