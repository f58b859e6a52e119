"""Evaluation: running policies in the simulator suites and measuring them.

- `runner.py`: one episode (synchronous, or with latency in the control loop), the episode worker (policy,
  profile, video, dataset) and `evaluate` over the eval seeds, resumable from a journal;
- `launchers.py`: where episodes run, a registry of `Pool` factories (`local` processes, `ray` actors in
  `ray_pool.py`; a plug-in adds its own under the `vla_runtime.launchers` entry point group);
- `metrics.py`: success rates with their intervals, latency and control-loop statistics, the summary tables;
- `observations.py`: calibration and measurement observations from the suites' scripted experts.

It sits above the suites (`vla_runtime.sim`), the control loop and the acceleration methods, and below the CLIs.
"""
