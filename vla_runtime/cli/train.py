"""vla-train: train a policy family's model on a collected dataset (`trainer=`, registered by the family;
`ref_vla`: ref_dit / ref_ar by `model=`); resumable."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from vla_runtime.cli.common import as_dict, hydra_cli
from vla_runtime.policies.registry import TRAINERS


def train(cfg: DictConfig) -> Path:
    settings = as_dict(cfg)
    trainer, model_options = TRAINERS.get(settings.pop("trainer")), settings.pop("model")
    return trainer(settings, model_options)


@hydra_cli("train")
def main(cfg: DictConfig) -> None:
    out = train(cfg)
    print(f"checkpoint: {out} (loss curve: {out / 'loss.png'})")


if __name__ == "__main__":
    main()
