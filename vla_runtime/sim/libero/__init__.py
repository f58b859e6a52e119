"""LIBERO (robosuite on MuJoCo): the suite registered as `libero` (configs/sim/libero.yaml). Needs the
`libero` extra to build, not to import."""

from vla_runtime.sim.rendering import configure_headless_gl

# Before MuJoCo's GL backends are imported (MuJoCo reads MUJOCO_GL once).
configure_headless_gl()

from vla_runtime.sim.libero.suite import LiberoConfig, LiberoEnv, LiberoSuite, catalog, resolve_task  # noqa: E402

__all__ = ["LiberoConfig", "LiberoEnv", "LiberoSuite", "catalog", "resolve_task"]
