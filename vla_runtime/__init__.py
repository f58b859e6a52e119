"""vla_runtime: run vision-language-action policies in a real-time control loop, and make them faster."""

from vla_runtime.types import ActionChunk, Observation, Policy, PolicyStructure

__all__ = ["ActionChunk", "Observation", "Policy", "PolicyStructure"]
__version__ = "0.1.0"
