"""From the command line's configs to the typed specs the evaluation runs (`evaluation/specs.py`): the pieces
vla-eval, vla-bench and vla-serve share (a CLI imports these, never another CLI). Everything is checked here, when
the command line is read, so a bad setting fails before any policy is built."""

from __future__ import annotations

from omegaconf import DictConfig

from vla_runtime.accel.profiles import Profile, load_profile
from vla_runtime.cli.common import UsageError, as_dict, positive_int
from vla_runtime.control.loop import RuntimeConfig
from vla_runtime.control.safety import SafetyConfig
from vla_runtime.evaluation.specs import AccelSpec, CalibrationSpec, LatencySpec, RealtimeSpec
from vla_runtime.execution import ExecConfig, exec_config
from vla_runtime.sim.suite import Suite

RUNTIME_MODES = ("sync", "realtime")


def tolerance(cfg: DictConfig) -> float:
    """`tolerance_points` as a share: the loss of success a paired comparison may rule out and still call a profile
    lossless."""
    points = cfg.tolerance_points
    if not isinstance(points, int | float) or isinstance(points, bool) or not 0 <= points <= 100:
        raise UsageError(f"tolerance_points must be a number of success points in [0, 100], got {points!r}")
    return points / 100


def safety_config(options: dict, suite: Suite) -> SafetyConfig:
    """`runtime.safety`, with the suite's action limits and held dimensions where it leaves them null."""
    spec = suite.spec
    defaults = {"hold_dims": list(spec.hold_dims)}
    if spec.action_low:
        defaults.update(action_low=list(spec.action_low), action_high=list(spec.action_high))
    return SafetyConfig(**{**defaults, **{k: v for k, v in options.items() if v is not None}})


def realtime_spec(runtime: DictConfig, suite: Suite) -> RealtimeSpec | None:
    """None for the synchronous protocol, else latency in the loop at the suite's rate (`control_hz` null)."""
    if runtime.mode not in RUNTIME_MODES:
        raise UsageError(f"runtime.mode must be 'sync' or 'realtime', got '{runtime.mode}'")
    options = as_dict(runtime)
    latency = LatencySpec(options.pop("latency_model"), options.pop("latency_ms"), options.pop("recorded_latencies"))
    reuse_gate = options.pop("reuse_gate")
    options.pop("mode")
    # Built in both modes, so a bad loop option is refused whichever protocol runs.
    loop = RuntimeConfig(**{**options, "control_hz": options.get("control_hz") or 1.0 / suite.spec.control_dt,
                            "safety": safety_config(options.get("safety") or {}, suite)})
    if runtime.mode == "sync":
        if loop.chunking not in ("naive", "auto"):
            raise UsageError(f"runtime.chunking={loop.chunking} acts on latency in the loop: it needs "
                             "runtime.mode=realtime (the synchronous protocol has no latency)")
        return None
    return RealtimeSpec(loop, latency, reuse_gate)


def accel_spec(profile: Profile, cfg: DictConfig, policy_name: str, tasks: list[str], calibration_dir: str | None,
               execution: ExecConfig | None = None) -> AccelSpec | None:
    """`profile` on `execution` as a worker applies it (None when there is nothing to apply)."""
    execution = None if execution is None or execution.changes_nothing else execution
    if not profile.methods and execution is None:
        return None
    calibration = CalibrationSpec(calibration_dir, tuple(tasks), positive_int(cfg, "calibration_per_task"))
    return AccelSpec(profile, calibration, execution, policy_name)


def accel_options(cfg: DictConfig, policy_name: str, tasks: list[str]) -> AccelSpec | None:
    """`accel=` / `accel_options=` / `exec=` (None for `none` on eager)."""
    spec = as_dict(cfg.accel) if not isinstance(cfg.accel, str) else cfg.accel
    execution = exec_config(cfg.exec if isinstance(cfg.exec, str) else as_dict(cfg.exec))
    return accel_spec(load_profile(spec, as_dict(cfg.accel_options)), cfg, policy_name, tasks, cfg.calibration_dir,
                      execution)
