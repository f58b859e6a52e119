import pytest

from vla_runtime.sim import MetaWorldConfig


@pytest.fixture
def small_sim() -> MetaWorldConfig:
    """Default cameras and seeds, smaller images and episodes, so tests stay fast."""
    return MetaWorldConfig(image_size=64, default_max_steps=150)
