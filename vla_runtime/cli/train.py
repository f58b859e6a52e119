"""vla-train: train a reference VLA (ref_dit or ref_ar) on a collected dataset; resumable."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from vla_runtime.cli.common import as_dict, hydra_cli, positive_int
from vla_runtime.data.episodes import EpisodeStore
from vla_runtime.data.torch_dataset import ActionChunkDataset
from vla_runtime.policies.ref_vla.training import train as train_model
from vla_runtime.sim import make_suite


def robot_options(sim_settings: dict) -> dict:
    """Model options that follow the robot the demonstrations were recorded on (a config may still set
    them): the suite's action and state dims and control rate, the cameras and image size of the data."""
    spec = make_suite(sim_settings.get("sim", "metaworld")).spec
    return {"control_dt": spec.control_dt, "state_dim": spec.state_dim, "action_dim": spec.action_dim,
            "cameras": list(sim_settings.get("cameras", spec.cameras)),
            "image_size": sim_settings.get("image_size", spec.image_size[0])}


def train(cfg: DictConfig) -> Path:
    torch.set_num_threads(positive_int(cfg, "num_threads"))
    settings = EpisodeStore(cfg.dataset).meta["sim"]
    model_options = {**robot_options(settings), **as_dict(cfg.model)}
    # The instructions of every task of the suite, so a model trained on a subset still tokenizes the others.
    sim = make_suite(settings.get("sim", "metaworld"))
    dataset = ActionChunkDataset(cfg.dataset, chunk_size=model_options.get("chunk_size", 8))
    return train_model(cfg, dataset, [sim.instruction(task) for task in sim.tasks()], model_options)


@hydra_cli("train")
def main(cfg: DictConfig) -> None:
    out = train(cfg)
    print(f"checkpoint: {out} (loss curve: {out / 'loss.png'})")


if __name__ == "__main__":
    main()
