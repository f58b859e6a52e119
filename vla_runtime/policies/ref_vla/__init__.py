"""Reference VLAs trained here: ref_dit (CogACT-like DiT head) and ref_ar (OpenVLA-like tokens)."""

from vla_runtime.policies.ref_vla.configuration_ref_vla import RefVLAConfig
from vla_runtime.policies.ref_vla.modeling_ref_vla import RefVLA
from vla_runtime.policies.ref_vla.policy import RefVLAPolicy

__all__ = ["RefVLA", "RefVLAConfig", "RefVLAPolicy"]
