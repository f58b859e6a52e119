"""Simulator suites behind one interface (`suite.py`; Meta-World is the built-in one), the episode
runner and success statistics."""

from vla_runtime.sim.rendering import configure_headless_gl

# Before any suite imports MuJoCo's GL backends.
configure_headless_gl()

from vla_runtime.sim.suite import Env, SeedRange, Suite, make_suite, register_suite, suite_names  # noqa: E402

__all__ = ["Env", "SeedRange", "Suite", "make_suite", "register_suite", "suite_names"]
