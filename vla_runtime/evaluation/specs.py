"""What an evaluation runs, as typed, frozen specs: built and checked where the command line is read
(`cli/build.py`), taken as they are by the episode workers, in this process or another."""

from __future__ import annotations

from dataclasses import dataclass, field

from vla_runtime.accel.profiles import Profile
from vla_runtime.control.inference import LatencyModel
from vla_runtime.control.loop import RuntimeConfig
from vla_runtime.control.reuse import make_reuse_gate
from vla_runtime.execution import ExecConfig


@dataclass(frozen=True)
class LatencySpec:
    """How long each policy call takes in the loop.

    Attributes:
        kind: `measured` (the call's own wall-clock time), `fixed` (`latency_ms`) or `recorded` (drawn from
            `recorded_path`: a json list of ms, or a results.json with `latency_samples_ms`).
        latency_ms: the latency of `fixed`.
        recorded_path: the file of `recorded`.
    """

    kind: str = "measured"
    latency_ms: float = 0.0
    recorded_path: str | None = None

    def __post_init__(self) -> None:
        self.model()  # an unknown kind, a negative latency or an unreadable file fails here, not in a worker

    def model(self) -> LatencyModel:
        return LatencyModel(self.kind, self.latency_ms, self.recorded_path)


@dataclass(frozen=True)
class RealtimeSpec:
    """Latency in the loop (`runtime.mode=realtime`): one simulator step per control tick.

    Attributes:
        loop: the control loop's settings, with the suite's rate and safety limits already filled in (its
            `request_threshold` None is resolved per policy by the worker: `RuntimeConfig.for_policy`).
        latency: how long each call takes.
        reuse_gate: the registered reuse gate (`control/reuse.py`), unless the profile brings its own.
    """

    loop: RuntimeConfig
    latency: LatencySpec = field(default_factory=LatencySpec)
    reuse_gate: str = "never"

    def __post_init__(self) -> None:
        make_reuse_gate(self.reuse_gate)  # an unknown name: one line naming the registered ones


@dataclass(frozen=True)
class CalibrationSpec:
    """Where a profile's calibration comes from, when its checkpoint ships no artifact for it.

    Attributes:
        directory: where artifacts are read and written (None: `<checkpoint>/calibration` when writable, else a
            temporary one).
        tasks: the suite's tasks whose scripted-expert observations calibrate (training seeds, never eval seeds).
        per_task: observations per task.
    """

    directory: str | None
    tasks: tuple[str, ...]
    per_task: int


@dataclass(frozen=True)
class AccelSpec:
    """An acceleration profile as a worker applies it (`evaluation.runner.accelerate`).

    Attributes:
        profile: the methods and their settings.
        calibration: where their calibration comes from.
        execution: the backend the profile runs on (None: eager).
        policy_name: what errors call the policy.
    """

    profile: Profile
    calibration: CalibrationSpec
    execution: ExecConfig | None = None
    policy_name: str = "this policy"
