"""Reference VLAs trained here: ref_dit (CogACT-like DiT head) and ref_ar (OpenVLA-like tokens).

The policy wrapper (`policy.py`, which needs the simulator's instructions) is imported by the policy
registry, not here, so that the model and its training loop import without a simulator."""

from vla_runtime.policies.ref_vla.configuration_ref_vla import RefVLAConfig
from vla_runtime.policies.ref_vla.modeling_ref_vla import RefVLA

__all__ = ["RefVLA", "RefVLAConfig"]
