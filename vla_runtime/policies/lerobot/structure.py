"""What acceleration methods may touch in a LeRobot policy (`PolicyStructure`), per policy type."""

from __future__ import annotations

from pathlib import Path

from vla_runtime.types import PolicyStructure


def structure_of(wrapper, checkpoint_dir: Path | None) -> PolicyStructure:
    return PolicyStructure(weights=wrapper.policy, checkpoint_dir=checkpoint_dir)
