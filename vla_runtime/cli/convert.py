"""vla-convert: a dataset of ours as a LeRobotDataset v3 (`vla_runtime.data.lerobot_format`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from vla_runtime.cli.common import UsageError, hydra_cli, positive_int
from vla_runtime.data.lerobot_format import check_format, convert_store


@hydra_cli("convert")
def main(cfg: DictConfig) -> None:
    if check_format(cfg.format) != "lerobot":
        raise UsageError(f"vla-convert writes format=lerobot (a native dataset is what it reads), got '{cfg.format}'")
    if Path(cfg.output_dir).exists():
        raise UsageError(f"{cfg.output_dir} exists; LeRobot refuses to overwrite a dataset: choose another output_dir")
    root = convert_store(cfg.source, cfg.output_dir, use_videos=bool(cfg.use_videos),
                         workers=positive_int(cfg, "workers"))
    print(f"LeRobotDataset: {root} (read it with LeRobotDataset('local/{root.name}', root='{root}'))")


if __name__ == "__main__":
    main()
