"""Policies by name: `make_policy(name, suite=..., **options)` builds one from the registry."""

from vla_runtime.policies.registry import make_policy, policy_names, register_policy
from vla_runtime.types import Policy, PolicySpec, PolicyStructure

__all__ = ["Policy", "PolicySpec", "PolicyStructure", "make_policy", "policy_names", "register_policy"]
