"""Training samples from an episode dataset: one frame's observation + the next H actions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vla_runtime.data.episodes import Episode, EpisodeStore


class ActionChunkDataset(Dataset):
    """Every frame of every episode (or all but a long idle tail), loaded into memory once.

    A sample: `images` {camera: uint8 [3, H, W]}, `state` float32 [S], `actions` float32 [chunk, A]
    (past the episode end the last action repeats and `action_is_pad` is True), `instruction`,
    `task_id`.
    """

    def __init__(self, source: str | Path | list[Episode], chunk_size: int, tasks: list[str] | None = None,
                 max_idle_frames: int | None = None):
        """`source`: a dataset directory (see `EpisodeStore`) or episodes already in memory. `max_idle_frames`:
        of an episode's idle tail (its last frames, whose actions all stay within 1 % of the episode's range of its
        final one: the robot holding still until a fixed episode length runs out) only the first this many frames
        are samples; None: all."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        episodes = source if isinstance(source, list) else EpisodeStore(source)
        self.chunk_size = chunk_size
        self.episodes: list[Episode] = [e for e in episodes if tasks is None or e.task in tasks]
        if not self.episodes:
            where = "the episodes given" if isinstance(source, list) else source
            raise ValueError(f"No episodes in {where}" + (f" for tasks {tasks}" if tasks else ""))
        self._frames = [(e, t) for e, episode in enumerate(self.episodes)
                        for t in range(self._frames_kept(episode, max_idle_frames))]

    @staticmethod
    def _frames_kept(episode: Episode, max_idle_frames: int | None) -> int:
        if max_idle_frames is None:
            return episode.length
        # Idle: every dimension within 1 % of the episode's own range of its final action (an expert's settling
        # controller leaves ~1e-5 residues where it holds still).
        tolerance = 0.01 * (episode.action.max(0) - episode.action.min(0))
        moving = np.flatnonzero(np.any(np.abs(episode.action - episode.action[-1]) > tolerance, axis=1))
        idle_from = moving[-1] + 1 if len(moving) else 0
        return min(episode.length, idle_from + max_idle_frames)

    def __len__(self) -> int:
        return len(self._frames)

    def early_frame_weights(self, early_frames: int, weight: float) -> torch.Tensor:
        """A sampling weight per sample: `weight` for an episode's first `early_frames` frames, 1 for the rest.

        Where an episode's first frames are the only ones whose actions need the image (later ones can continue the
        motion the state already shows: behaviour cloning's copycat shortcut), drawing them more often teaches the
        policy to look."""
        return torch.tensor([weight if t < early_frames else 1.0 for _, t in self._frames], dtype=torch.double)

    def __getitem__(self, index: int) -> dict:
        episode_index, t = self._frames[index]
        episode = self.episodes[episode_index]
        steps = np.arange(t, t + self.chunk_size)
        is_pad = steps >= episode.length
        steps = np.minimum(steps, episode.length - 1)
        return {
            "images": {cam: torch.from_numpy(frames[t]).permute(2, 0, 1)
                       for cam, frames in episode.images.items()},
            "state": torch.from_numpy(episode.state[t]),
            "actions": torch.from_numpy(episode.action[steps]),
            "action_is_pad": torch.from_numpy(is_pad),
            "instruction": episode.instruction,
            "task_id": episode.task_id,
        }

    def stats(self) -> dict[str, dict[str, list[float]]]:
        """Per-dimension mean / std / min / max of state and action, for normalisation."""
        out = {}
        for key in ("state", "action"):
            values = np.concatenate([getattr(e, key) for e in self.episodes])
            out[key] = {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
                        "min": values.min(0).tolist(), "max": values.max(0).tolist()}
        return out


def make_dataloader(root: str | Path, batch_size: int, chunk_size: int, shuffle: bool = True,
                    tasks: list[str] | None = None, num_workers: int = 0) -> DataLoader:
    dataset = ActionChunkDataset(root, chunk_size, tasks)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)
