"""SIMPLER-Bridge (WidowX, ManiSkill3's port): the suite registered as `simpler_bridge`
(configs/sim/simpler_bridge.yaml). Needs the `simpler` extra to build, not to import."""

from vla_runtime.sim.simpler.suite import LABEL, SimplerBridgeSuite, SimplerConfig, SimplerEnv, resolve_task

__all__ = ["LABEL", "SimplerBridgeSuite", "SimplerConfig", "SimplerEnv", "resolve_task"]
