import pytest

from vla_runtime.sim import Suite, make_suite


@pytest.fixture
def small_sim() -> Suite:
    """The Meta-World suite with default cameras and seeds, smaller images and episodes, so tests stay fast."""
    return make_suite("metaworld", image_size=64, default_max_steps=150)
