"""vla-train: train a reference VLA (ref_dit or ref_ar) on a collected dataset; resumable."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from vla_runtime.cli import CONFIG_PATH
from vla_runtime.cli.common import as_dict, friendly_errors, positive_int
from vla_runtime.data.episodes import EpisodeStore
from vla_runtime.data.torch_dataset import ActionChunkDataset
from vla_runtime.policies.ref_vla.training import train as train_model
from vla_runtime.sim import make_suite


def train(cfg: DictConfig) -> Path:
    torch.set_num_threads(positive_int(cfg, "num_threads"))
    model_options = as_dict(cfg.model)
    # The suite the demonstrations come from: its instructions (all tasks, so a model trained on a subset
    # still tokenizes the others) and its control rate.
    sim = make_suite(EpisodeStore(cfg.dataset).meta["sim"].get("sim", "metaworld"))
    model_options.setdefault("control_dt", sim.spec.control_dt)
    dataset = ActionChunkDataset(cfg.dataset, chunk_size=model_options.get("chunk_size", 8))
    return train_model(cfg, dataset, [sim.instruction(task) for task in sim.tasks()], model_options)


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    out = train(cfg)
    print(f"checkpoint: {out} (loss curve: {out / 'loss.png'})")


if __name__ == "__main__":
    main()
