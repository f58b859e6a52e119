"""Episode logs on disk and readers that turn them into training batches."""

from vla_runtime.data.episodes import Episode, EpisodeStore
from vla_runtime.data.torch_dataset import ActionChunkDataset, make_dataloader

__all__ = ["ActionChunkDataset", "Episode", "EpisodeStore", "make_dataloader"]
