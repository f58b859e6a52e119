"""Simulator suites behind one interface (`suite.py`), one sub-package per simulator. Nothing here imports
what runs policies in them (the episode runner, launchers and statistics are `vla_runtime.evaluation`), and
nothing here sets up a renderer: each simulator does its own (the MuJoCo suites pick a headless GL backend when
imported; SIMPLER renders with Vulkan)."""

from vla_runtime.sim.suite import Env, SeedRange, Suite, make_suite, register_suite, suite_names

__all__ = ["Env", "SeedRange", "Suite", "make_suite", "register_suite", "suite_names"]
