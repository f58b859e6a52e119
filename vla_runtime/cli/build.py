"""From the command line's configs to what the evaluation runs: the pieces vla-eval, vla-bench and vla-serve share
(a CLI imports these, never another CLI)."""

from __future__ import annotations

from omegaconf import DictConfig

from vla_runtime.accel.profiles import Profile, load_profile
from vla_runtime.cli.common import as_dict, positive_int
from vla_runtime.execution import ExecConfig, exec_config


def realtime_options(runtime: DictConfig) -> dict | None:
    """None for the synchronous protocol, else what EpisodeWorker needs for latency in the loop."""
    if runtime.mode not in ("sync", "realtime"):
        raise ValueError(f"runtime.mode must be 'sync' or 'realtime', got '{runtime.mode}'")
    if runtime.mode == "sync":
        if runtime.get("chunking", "naive") != "naive":
            raise ValueError(f"runtime.chunking={runtime.chunking} acts on latency in the loop: it needs "
                             "runtime.mode=realtime (the synchronous protocol has no latency)")
        return None
    options = as_dict(runtime)
    latency_model = {"kind": options.pop("latency_model"), "latency_ms": options.pop("latency_ms"),
                     "recorded_path": options.pop("recorded_latencies")}
    reuse_gate = options.pop("reuse_gate")
    options.pop("mode")
    # Checked where they are built: EpisodeWorker, whose first instance runs in this process.
    return {"loop": options, "latency_model": latency_model, "reuse_gate": reuse_gate}


def worker_accel(profile: Profile, cfg: DictConfig, policy_name: str, tasks: list[str],
                 calibration_dir: str | None, execution: ExecConfig | None = None) -> dict | None:
    """What EpisodeWorker needs to apply `profile` on `execution` (None when there is nothing to apply)."""
    execution = None if execution is None or execution.changes_nothing else execution
    if not profile.methods and execution is None:
        return None
    return {"profile": profile, "calibration_dir": calibration_dir, "calibration_tasks": tasks,
            "calibration_per_task": positive_int(cfg, "calibration_per_task"), "policy_name": policy_name,
            "execution": execution}


def accel_options(cfg: DictConfig, policy_name: str, tasks: list[str]) -> dict | None:
    """`accel=` / `accel_options=` / `exec=` as EpisodeWorker takes them (None for `none` on eager)."""
    spec = as_dict(cfg.accel) if not isinstance(cfg.accel, str) else cfg.accel
    execution = exec_config(cfg.exec if isinstance(cfg.exec, str) else as_dict(cfg.exec))
    return worker_accel(load_profile(spec, as_dict(cfg.accel_options)), cfg, policy_name, tasks, cfg.calibration_dir,
                        execution)
