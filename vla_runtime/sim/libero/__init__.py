"""LIBERO (robosuite on MuJoCo): the suite registered as `libero` (configs/sim/libero.yaml). Needs the
`libero` extra to build, not to import."""

from vla_runtime.sim.libero.suite import LiberoConfig, LiberoEnv, LiberoSuite, catalog, resolve_task

__all__ = ["LiberoConfig", "LiberoEnv", "LiberoSuite", "catalog", "resolve_task"]
