"""The GPU table in one call: latency of our policies on every execution backend and profile, on a lent GPU.

A lent GPU (an H200 here) comes for 15 minutes in all, with Python 3.12 and torch 2.11, no simulator and no
internet, and takes at most 64 MiB per call. So everything it needs is prepared here and the measurement runs as
one command there:

    # here, once (in .venv, which has the simulators): the inputs, expert frames of Meta-World (1 camera) and
    # LIBERO (2 cameras) with the robots' descriptions, committed as benchmarks/gpu/inputs.{npz,json}
    python scripts/device_bench.py pack
    # here: what each device call carries, its size, and its command (a dry run; `park` / `unpark` move what
    # must stay behind out of the working tree and back)
    python scripts/device_bench.py plan
    # there (the command `plan` prints: the wheels and the project installed into /tmp/site first)
    python3 scripts/device_bench.py --device cuda --out $OUT --budget-s 420
    # the rehearsal, here and in the tests: tiny sizes, 2 rounds, the same code otherwise
    python scripts/device_bench.py --device cpu --tiny --out DIR

Per row (a policy, a profile, an execution backend): p50 / p95 / p99 of `predict_chunk` (CUDA events on a GPU,
each call synchronised by its actions coming back), speedup against the eager float32 `none` row of the same
policy and against LeRobot's own `predict_action_chunk` on the same weights, peak GPU memory, warm-up apart
(compile / capture time), max |action difference| against eager float32 `none` on the same observations and
noise, frames compiled during the timed calls (recompilations) and allocations per call. Rows are measured one
after the other (switching dtype between interleaved rounds would cast a 3 B model back and forth); the baseline
runs first and again last, and the drift between the two is reported. Everything is written to --out after every
row (results.json, table.md, latency.png), so a call cut short still returns what it measured; a row that fails
records its error and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
INPUTS = REPO / "benchmarks" / "gpu" / "inputs"  # .npz (frames) + .json (robots, instructions, provenance)
DEVICE_LIMIT_BYTES = 64 * 2**20
WHEELS = REPO / ".whl"
# What lerobot 0.6.1 needs that the device image lacks (its import of lerobot.policies.factory pulls the
# datasets stack, av among it; SmolVLM's processor num2words; its pi0 fails on the image's transformers 5.17:
# `create_causal_mask() got an unexpected keyword argument 'cache_position'`), versions as .venv-lerobot has
# them. zstandard and lz4 are optional there and left out for room. docopt has no wheel: built here.
DEVICE_WHEELS = ("av==15.1.0", "backports-zstd==1.8.0", "datasets==4.8.5", "diffusers==0.39.0", "dill==0.4.1",
                 "draccus==0.11.6", "farama-notifications==0.0.6", "gymnasium==1.4.0", "lerobot==0.6.1",
                 "mergedeep==1.3.4", "multiprocess==0.70.19", "num2words==0.5.14", "pytz==2026.6",
                 "transformers==5.5.4")
SOURCE_ONLY_WHEELS = ("docopt==0.6.2",)
PARKED = REPO / ".parked"  # what must not travel, moved aside while a device call runs (git-excluded)


@dataclass(frozen=True)
class Subject:
    """One policy as the table measures it.

    Attributes:
        label: its rows' name in the table.
        policy: the registered policy name.
        robot: which packed robot it is built for and fed from (`metaworld`: 1 camera, `libero`: 2 cameras).
        options: policy options at full size (`device` is added); `tiny`: for the rehearsal (None: left out of
            it, with the reason in `tiny_note`).
        near_lossless / fastest: its best near-lossless profile and its fastest one (docs/acceleration.md,
            docs/policies.md: measured on the CPU).
        tiny_fastest: the fastest profile at the tiny size, where the full size's does not fit (None: the same).
        lerobot: a LeRobot policy (its peer row is LeRobot's own `predict_action_chunk`).
        share: its share of the time budget (what it leaves unused goes to the next subject).
    """

    label: str
    policy: str
    robot: str
    options: dict
    tiny: dict | None
    near_lossless: str
    fastest: str
    tiny_fastest: str | None = None
    lerobot: bool = False
    share: float = 0.2
    tiny_note: str = ""


SUBJECTS = (
    Subject("pi0 (1 camera)", "pi0_random", "metaworld", {"size": "full"}, {"size": "tiny"}, "bac",
            "pi0_efficientvla", "smolvla_efficientvla", lerobot=True, share=0.3),
    Subject("SmolVLA", "smolvla_random", "metaworld", {"size": "full"}, {"size": "tiny"}, "bac", "smolvla_fast",
            "smolvla_efficientvla", lerobot=True, share=0.2),
    Subject("ref_dit", "ref_dit", "metaworld", {}, {}, "bac", "full", share=0.15),
    Subject("ref_dit_large", "ref_dit_large", "metaworld", {}, None, "bac", "efficientvla_deep", share=0.15,
            tiny_note="no tiny size (ref_dit stands for the family in the rehearsal)"),
    Subject("pi0 (2 cameras)", "pi0_random", "libero", {"size": "full"}, {"size": "tiny"}, "bac",
            "pi0_efficientvla", "smolvla_efficientvla", lerobot=True, share=0.2),
)
# Backends in the order rows are measured: the table's columns first, max-autotune if time is left.
BACKENDS = {"eager-fp32": {}, "eager-bf16": {"dtype": "bf16"},
            "cuda_graphs-bf16": {"backend": "cuda_graphs", "dtype": "bf16"},
            "compile-bf16": {"backend": "compile", "dtype": "bf16"},
            "max-autotune-bf16": {"backend": "compile", "mode": "max-autotune", "dtype": "bf16"}}


BASELINE = ("none", "eager-fp32")
LAST_RUN = "benchmarks/gpu/2026-12-04"  # what the next device call resumes


def row_plan(subject: Subject, tiny: bool = False) -> list[tuple[str, str]]:
    """(profile, backend) in the order they are measured: what the table needs most first, the baseline again
    last (its drift over the run). The rehearsal compiles one row per policy (inductor takes minutes on 2 cores;
    the other compiled rows differ from it only in the profile, which the eager rows exercise)."""
    none, near = "none", subject.near_lossless
    fast = subject.tiny_fastest or subject.fastest if tiny else subject.fastest
    rows = [(none, "eager-fp32"), (none, "eager-bf16"), (none, "cuda_graphs-bf16"), (near, "cuda_graphs-bf16"),
            (fast, "cuda_graphs-bf16"), (near, "eager-bf16"), (fast, "eager-bf16"), (near, "eager-fp32"),
            (fast, "eager-fp32"), (none, "compile-bf16"), (near, "compile-bf16"), (fast, "compile-bf16"),
            (near, "max-autotune-bf16"), (none, "eager-fp32")]
    if tiny:
        rows = [row for row in rows if BACKENDS[row[1]].get("backend") != "compile" or row == (none, "compile-bf16")]
    return rows


# ---------------------------------------------------------------------------------------------- inputs (here)


def pack(tasks_per_robot: int = 2) -> None:
    """Expert frames of the real suites (measurement: one sequence of 4 frames, 4 steps apart, per task;
    calibration: 2 frames per task, other training seeds), their robots and instructions."""
    from vla_runtime.evaluation.observations import MEASUREMENT_SEEDS, expert_observations, expert_sequences
    from vla_runtime.sim.suite import configured_suite

    arrays, robots = {}, {}
    for robot in ("metaworld", "libero"):
        suite, default_tasks = configured_suite(robot)
        tasks = list(default_tasks)[:tasks_per_robot]
        sets = {"measure": expert_sequences(suite, tasks, 1, seeds_from=MEASUREMENT_SEEDS, frames=4),
                "calibrate": [[obs] for obs in expert_observations(suite, tasks, 2)]}
        described = {}
        for kind, sequences in sets.items():
            described[kind] = []
            for s, sequence in enumerate(sequences):
                frames = []
                for f, obs in enumerate(sequence):
                    key = f"{robot}/{kind}/{s}/{f}"
                    for camera, image in obs.images.items():
                        arrays[f"{key}/{camera}"] = image
                    arrays[f"{key}/state"] = obs.state
                    frames.append({"key": key, "instruction": obs.instruction, "timestamp": obs.timestamp})
                described[kind].append(frames)
        robots[robot] = {"spec": asdict(suite.spec), "instructions": {t: suite.instruction(t) for t in suite.tasks()},
                         "tasks": tasks, **described}
    INPUTS.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(INPUTS.with_suffix(".npz"), **arrays)
    INPUTS.with_suffix(".json").write_text(json.dumps(
        {"command": "python scripts/device_bench.py pack", "robots": robots}, indent=1) + "\n")
    print(f"{len(arrays)} arrays -> {INPUTS.with_suffix('.npz')} "
          f"({INPUTS.with_suffix('.npz').stat().st_size / 1e6:.1f} MB)")


class PackedRobot:
    """A packed robot as the policy factories take a suite: its spec, tasks and instructions (no simulator)."""

    def __init__(self, name: str, described: dict, arrays):
        from vla_runtime.types import Observation, RobotSpec

        spec = described["spec"]
        self.name = name
        self.spec = RobotSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
        self._instructions = described["instructions"]

        def observation(frame: dict) -> Observation:
            images = {camera: arrays[f"{frame['key']}/{camera}"] for camera in self.spec.cameras}
            return Observation(images, arrays[f"{frame['key']}/state"], frame["instruction"], frame["timestamp"])

        self.sequences = [[observation(f) for f in seq] for seq in described["measure"]]
        self.calibration = [observation(seq[0]) for seq in described["calibrate"]]

    def tasks(self) -> tuple[str, ...]:
        return tuple(self._instructions)

    def instruction(self, task: str) -> str:
        return self._instructions[task]


def load_robots() -> dict[str, PackedRobot]:
    missing = [p for p in (INPUTS.with_suffix(".npz"), INPUTS.with_suffix(".json")) if not p.exists()]
    if missing:
        raise SystemExit(f"error: no packed inputs ({', '.join(map(str, missing))}): run "
                         "`python scripts/device_bench.py pack` in .venv first")
    described = json.loads(INPUTS.with_suffix(".json").read_text())["robots"]
    with np.load(INPUTS.with_suffix(".npz")) as npz:
        arrays = {key: npz[key] for key in npz.files}
    return {name: PackedRobot(name, robot, arrays) for name, robot in described.items()}


# ------------------------------------------------------------------------------------ what travels (here)


def download_wheels() -> None:
    """The wheels of DEVICE_WHEELS for the device's Python 3.12 into .whl/ (git-excluded), once."""
    WHEELS.mkdir(exist_ok=True)
    platforms = [arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                 "manylinux1_x86_64") for arg in ("--platform", tag)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS),
                    *DEVICE_WHEELS], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(WHEELS), *SOURCE_ONLY_WHEELS],
                   check=True)


def tracked_files() -> list[Path]:
    """Tracked files and the untracked ones git does not ignore: what a device call carries."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout
    return [REPO / name for name in listing.decode().split("\0") if name]


def must_stay(path: Path, keep_weights: tuple[str, ...]) -> bool:
    """What the device call must not carry: the benchmark records (but the inputs) and every checkpoint's
    weights but `keep_weights`'."""
    relative = path.relative_to(REPO)
    if relative.parts[0] == "benchmarks":
        return relative.parts[:2] != ("benchmarks", "gpu")
    return (relative.parts[0] == "checkpoints" and path.suffix == ".safetensors"
            and relative.parts[1] not in keep_weights)


def device_calls() -> list[dict]:
    """The device calls of one table: the LeRobot policies with the wheels (54 MiB: no room for trained weights
    beside them), then ref_dit with its weights and no wheels."""
    install = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation "
               "--target /tmp/site {wheels}. >/tmp/install.log 2>&1 || {{ tail -20 /tmp/install.log; exit 1; }}; "
               "export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1; ")
    run = f"python3 scripts/device_bench.py --device cuda --out $OUT --resume {LAST_RUN} --budget-s {{budget}} " \
          "--only {only}"
    lerobot = [s.label for s in SUBJECTS if s.lerobot or s.policy == "ref_dit_large"]
    return [{"carry": [".whl"], "keep_weights": (), "subjects": lerobot,
             "command": install.format(wheels=".whl/*.whl ") + run.format(budget=500, only=",".join(
                 f"'{label}'" for label in lerobot))},
            {"carry": [], "keep_weights": ("ref_dit",), "subjects": ["ref_dit"],
             "command": install.format(wheels="") + run.format(budget=90, only="ref_dit")}]


def plan() -> None:
    """Dry run: per device call, what travels (tracked files but those that stay, the carried folders), its
    size against the 64 MiB limit, and the command."""
    files = tracked_files()
    for index, call in enumerate(device_calls(), 1):
        travels = [p for p in files if p.exists() and not must_stay(p, call["keep_weights"])]
        carried = [p for folder in call["carry"] for p in sorted((REPO / folder).rglob("*")) if p.is_file()]
        size = sum(p.stat().st_size for p in travels + carried)
        by_top: dict[str, int] = {}
        for p in travels + carried:
            top = p.relative_to(REPO).parts[0]
            by_top[top] = by_top.get(top, 0) + p.stat().st_size
        verdict = "fits" if size <= DEVICE_LIMIT_BYTES else "TOO LARGE"
        print(f"call {index}: {', '.join(call['subjects'])}: {size / 2**20:.1f} MiB of 64 ({verdict})")
        for top, nbytes in sorted(by_top.items(), key=lambda item: -item[1]):
            print(f"    {top:<16} {nbytes / 2**20:7.2f} MiB")
        if not carried and call["carry"]:
            print(f"    (no {', '.join(call['carry'])}: `python scripts/device_bench.py wheels` downloads it)")
        print(f"  park: python scripts/device_bench.py park {' '.join(call['keep_weights'])}")
        print(f"  carry: {call['carry']}")
        print(f"  command ({len(call['command'])} of 2000 characters):\n    {call['command']}")
    print("then: python scripts/device_bench.py unpark")


def park(keep_weights: tuple[str, ...]) -> None:
    """Moves what must stay behind into .parked/ (git-excluded; `unpark` puts it back)."""
    exclude = REPO / ".git" / "info" / "exclude"
    exclude.parent.mkdir(exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    missing = [line for line in ("/.parked/", "/.whl/") if line not in lines]
    if missing:
        exclude.write_text("\n".join([*lines, *missing]) + "\n")
    unpark()
    moved = 0
    for path in tracked_files():
        if path.exists() and must_stay(path, keep_weights):
            target = PARKED / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
            moved += 1
    print(f"parked {moved} files in {PARKED}")


def unpark() -> None:
    if not PARKED.exists():
        return
    for path in sorted(p for p in PARKED.rglob("*") if p.is_file()):
        target = REPO / path.relative_to(PARKED)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
    shutil.rmtree(PARKED)
    print("unparked")


# ------------------------------------------------------------------------------------- measurement (there)


def import_plugins() -> None:
    """The policy families and methods, imported directly: registered whether or not entry points are there."""
    import importlib

    for module in ("vla_runtime.policies.ref_vla.policy", "vla_runtime.policies.lerobot.policy",
                   "vla_runtime.accel.vision_resolution",
                   "vla_runtime.accel.layer_prune", "vla_runtime.accel.token_select",
                   "vla_runtime.accel.visual_kv_reuse", "vla_runtime.accel.head_cache",
                   "vla_runtime.accel.parallel_decode", "vla_runtime.accel.action_reuse"):
        importlib.import_module(module)


class Clock:
    """Per-call latency: CUDA events on a GPU (the call ends when its actions are on the host), else wall time."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def time_ms(self, call) -> tuple[float, object]:
        if self.cuda:
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            result = call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end), result
        started = time.perf_counter()
        result = call()
        return 1000 * (time.perf_counter() - started), result


@dataclass
class Row:
    subject: str
    profile: str
    backend: str
    status: str = "pending"  # ok | failed | skipped
    note: str = ""
    latency_ms: list[float] = field(default_factory=list)
    warm_up_s: float | None = None
    frames_compiled_warm_up: int | None = None
    recompiled_frames: int | None = None
    eager_fallbacks: int | None = None
    allocations_per_call: float | None = None
    peak_memory_mb: float | None = None
    parked_mb: float = 0.0
    max_abs_action_diff: float | None = None
    actions: object = None  # np.ndarray, not written
    earlier: dict | None = None  # the row as an earlier run measured it (--resume), kept instead of measured

    def summary(self) -> dict:
        if self.earlier is not None:
            return dict(self.earlier)
        out = {k: v for k, v in asdict(self).items() if k not in ("latency_ms", "actions", "earlier")}
        if self.latency_ms:
            p50, p95, p99 = (float(np.percentile(self.latency_ms, q)) for q in (50, 95, 99))
            out.update(samples=len(self.latency_ms), p50_ms=p50, p95_ms=p95, p99_ms=p99)
        return out


class Bench:
    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"error: --device cuda, but torch {torch.__version__} sees no CUDA device")
        self.clock = Clock(self.device)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        self.subjects: dict[str, dict] = {}
        self.started = time.monotonic()
        self.log = (self.out / "log.txt").open("a")
        # --resume: the rows an earlier run measured (status ok), by (subject, profile, backend)
        earlier = json.loads((Path(args.resume) / "results.json").read_text())["rows"] if args.resume else []
        self.earlier = {(r["subject"], r["profile"], r["backend"]): r for r in earlier if r["status"] == "ok"}

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def environment(self) -> dict:
        torch = self.torch
        gpu = torch.cuda.get_device_name() if self.device.type == "cuda" else None
        return {"device": gpu or f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
                "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"), "tiny": self.args.tiny, "budget_s": self.args.budget_s,
                "command": "python3 scripts/device_bench.py " + " ".join(sys.argv[1:])}

    # One row ------------------------------------------------------------------------------------------------

    def rounds(self, pass_s: float, deadline: float) -> int:
        """Timed passes over the measurement frames: 2 in the rehearsal, else about --row-seconds' worth (2 to
        25), and no more than the deadline leaves room for (at least 1)."""
        pass_s = max(1e-3, pass_s)
        rounds = 2 if self.args.tiny else int(np.clip(self.args.row_seconds / pass_s, 2, 25))
        return min(rounds, max(1, int((deadline - time.monotonic()) / pass_s)))

    def measure_row(self, accelerator, robot: PackedRobot, row: Row, baseline: Row | None, deadline: float) -> None:
        from vla_runtime.accel.profiles import load_profile
        from vla_runtime.execution import CompileStats, exec_config

        torch, policy = self.torch, accelerator.policy
        cuda = self.device.type == "cuda"

        def one_pass() -> tuple[list[float], list[np.ndarray]]:
            times, actions = [], []
            for sequence in robot.sequences:
                policy.reset()
                for obs in sequence:
                    ms, chunk = self.clock.time_ms(lambda obs=obs: policy.predict_chunk(obs))
                    times.append(ms)
                    actions.append(chunk.actions)
            return times, actions

        accelerator.execution = exec_config(BACKENDS[row.backend])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            handle = accelerator.apply(load_profile(row.profile))
            frames, started = CompileStats.frames(), time.perf_counter()
            one_pass()  # the warm-up: compiles / captures every shape it meets
            row.warm_up_s = time.perf_counter() - started
            row.frames_compiled_warm_up = CompileStats.frames() - frames
            # The actions, on a warm row, compared with eager float32 none on the same observations and noise.
            times, actions = one_pass()
            row.actions = np.stack(actions)
            if baseline is not None and baseline.actions is not None:
                row.max_abs_action_diff = float(np.abs(row.actions - baseline.actions).max())
            rounds = self.rounds(sum(times) / 1000, deadline)
            frames, fallbacks = CompileStats.frames(), CompileStats.fallbacks()
            allocations = torch.cuda.memory_stats().get("allocation.all.allocated", 0) if cuda else 0
            for _ in range(rounds):
                times, _ = one_pass()
                row.latency_ms += times
            if cuda:
                row.allocations_per_call = (torch.cuda.memory_stats().get("allocation.all.allocated", 0)
                                            - allocations) / len(row.latency_ms)
                row.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
            row.recompiled_frames = CompileStats.frames() - frames
            row.eager_fallbacks = CompileStats.fallbacks() - fallbacks
            row.parked_mb = (handle.execution.info["parked_bytes"] / 2**20) if handle.execution else 0.0
            row.status = "ok"
        finally:
            accelerator.remove()
            accelerator.execution = None

    def lerobot_row(self, policy, robot: PackedRobot, row: Row, deadline: float) -> None:
        """LeRobot's own path on the same weights, eager, as LeRobot ships it: its preprocessor, its
        `predict_action_chunk` (drawing its own noise), its postprocessor."""
        torch = self.torch
        cuda = self.device.type == "cuda"

        @torch.inference_mode()
        def call(obs):
            batch = policy.preprocessor(policy.batch(obs))
            return policy.postprocessor(policy.policy.predict_action_chunk(batch)).cpu()

        observations = [obs for sequence in robot.sequences for obs in sequence]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for obs in observations:
            call(obs)
        row.warm_up_s = time.perf_counter() - started
        for _ in range(self.rounds(row.warm_up_s, deadline)):
            policy.policy.reset()
            for obs in observations:
                ms, _ = self.clock.time_ms(lambda obs=obs: call(obs))
                row.latency_ms.append(ms)
        if cuda:
            row.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
        row.note = "LeRobot draws its own noise: no action difference"
        row.status = "ok"

    # One subject --------------------------------------------------------------------------------------------

    def build(self, subject: Subject, robot: PackedRobot):
        from vla_runtime.policies import make_policy
        from vla_runtime.policies.registry import POLICIES

        options = {**(subject.tiny if self.args.tiny else subject.options), "device": self.args.device}
        needs_suite = POLICIES.get(subject.policy).needs_suite

        def build():
            return make_policy(subject.policy, suite=robot if needs_suite else None, **options)

        if self.device.type != "cuda":
            return build()
        try:  # random weights initialised on the GPU: a 3 B model takes minutes to initialise on a CPU
            with self.torch.device(self.device):
                return build()
        except Exception:  # noqa: BLE001 - then as a user builds it: on the CPU, moved
            self.say(f"{subject.label}: built on the CPU (on the GPU: {traceback.format_exc(limit=3)})")
            return build()

    def run_subject(self, subject: Subject, robot: PackedRobot, deadline: float) -> None:
        from vla_runtime.accel.profiles import Accelerator

        torch = self.torch
        plan = [("lerobot", "lerobot-eager")] if subject.lerobot else []
        plan += row_plan(subject, self.args.tiny)
        rows = [Row(subject.label, profile, backend) for profile, backend in plan]
        rows[-1].note = "baseline again, last: the drift of the run"
        self.rows += rows
        info = self.subjects.setdefault(subject.label, {"policy": subject.policy, "robot": robot.name})
        if self.args.tiny and subject.tiny is None:
            for row in rows:
                row.status, row.note = "skipped", subject.tiny_note
            return
        started = time.perf_counter()
        try:
            policy = self.build(subject, robot)
        except Exception as exc:  # noqa: BLE001 - the table says why and goes on with the next subject
            for row in rows:
                row.status, row.note = "failed", f"build: {type(exc).__name__}: {exc}"
            self.say(f"{subject.label}: build failed\n{traceback.format_exc()}")
            return
        info["build_s"] = time.perf_counter() - started
        weights = policy.structure.weights
        info["parameters"] = sum(p.numel() for p in weights.parameters()) if weights is not None else None
        info.update(chunk_size=policy.spec.chunk_size, cameras=list(policy.spec.cameras),
                    steps=policy.structure.denoising_head.steps if policy.structure.denoising_head else None)
        self.say(f"{subject.label}: built in {info['build_s']:.1f} s ({info['parameters'] or 0:,} parameters)")
        accelerator = Accelerator(policy, lambda: robot.calibration, self.out / "calibration" / subject.label,
                                  subject.label)
        baseline = None
        for row in rows:
            key = (row.subject, row.profile, row.backend)
            if key in self.earlier and row.profile != "lerobot" and (row.profile, row.backend) != BASELINE:
                # Measured by the run resumed; the baselines are measured again: they anchor this run's ratios.
                row.earlier = {**self.earlier[key], "note": f"from {self.args.resume}"}
                continue
            if time.monotonic() > deadline:
                row.status, row.note = "skipped", "time budget spent"
                continue
            self.say(f"{subject.label}: {row.profile} on {row.backend}")
            try:
                if row.profile == "lerobot":
                    self.lerobot_row(policy, robot, row, deadline)
                else:
                    self.measure_row(accelerator, robot, row, baseline, deadline)
                    if baseline is None and (row.profile, row.backend) == BASELINE:
                        baseline = row
                        info["action_std"] = float(row.actions.std())  # the scale of the action differences
            except Exception as exc:  # noqa: BLE001 - recorded in the row; the next row runs
                row.status, row.note = "failed", f"{type(exc).__name__}: {str(exc)[:300]}"
                self.say(f"  failed: {traceback.format_exc()}")
            if row.status == "ok":
                summary = row.summary()
                self.say(f"  p50 {summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms, warm-up "
                         f"{row.warm_up_s:.1f} s, max |da| {row.max_abs_action_diff}")
            self.write()
        del policy, accelerator
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self) -> None:
        import torch

        robots = load_robots()
        subjects = [s for s in SUBJECTS if not self.args.only or s.label in self.args.only]
        unknown = set(self.args.only or ()) - {s.label for s in SUBJECTS}
        if unknown:
            raise SystemExit(f"error: unknown subject(s) {sorted(unknown)}; "
                             f"choose from {', '.join(repr(s.label) for s in SUBJECTS)}")
        self.say(f"{self.environment()['device']}, torch {torch.__version__}")
        budget_end = self.started + self.args.budget_s
        total_share = sum(s.share for s in subjects)
        for index, subject in enumerate(subjects):
            # Its share of what is left, over the shares still to come: time a subject leaves goes on.
            left = budget_end - time.monotonic()
            share = subject.share / sum(s.share for s in subjects[index:]) if total_share else 1.0
            deadline = time.monotonic() + max(0.0, left * share)
            self.run_subject(subject, robots[subject.robot], deadline)
        self.write()
        self.say(f"done in {time.monotonic() - self.started:.0f} s: {self.out}")

    # Output -------------------------------------------------------------------------------------------------

    def table(self) -> dict:
        rows = [row.summary() for row in self.rows]
        for subject in {row["subject"] for row in rows}:
            mine = [row for row in rows if row["subject"] == subject and row["status"] == "ok"]
            baselines = [r for r in mine if (r["profile"], r["backend"]) == BASELINE]  # first, and again last
            base = baselines[0] if baselines else None
            peer = next((r for r in mine if r["profile"] == "lerobot"), None)
            if len(baselines) == 2:
                self.subjects[subject]["baseline_drift"] = baselines[1]["p50_ms"] / baselines[0]["p50_ms"] - 1
            for row in mine:
                row["speedup"] = base["p50_ms"] / row["p50_ms"] if base else None
                row["speedup_vs_lerobot"] = peer["p50_ms"] / row["p50_ms"] if peer else None
        return {"environment": self.environment(), "subjects": self.subjects, "rows": rows}

    def write(self) -> None:
        table = self.table()
        (self.out / "results.json").write_text(json.dumps(table, indent=1) + "\n")
        (self.out / "table.md").write_text(markdown(table))
        plot(table, self.out / "latency.png")


def markdown(table: dict) -> str:
    env = table["environment"]
    lines = [f"## Latency on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}, {env['date']})", "",
             "| policy | profile | backend | p50 ms | p95 ms | p99 ms | speedup | vs LeRobot | peak GPU MB | "
             "warm-up s | max abs action diff | recompiled | allocations / call | samples | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in table["rows"]:
        peak = None if row["peak_memory_mb"] is None else row["peak_memory_mb"] - row["parked_mb"]
        if row["status"] != "ok":
            lines.append(f"| {row['subject']} | `{row['profile']}` | {row['backend']} | | | | | | | | | | | | "
                         f"{row['status']}: {row['note']} |")
            continue
        lines.append(" | ".join([
            f"| {row['subject']}", f"`{row['profile']}`", row["backend"], number(row["p50_ms"], ".2f"),
            number(row["p95_ms"], ".2f"), number(row["p99_ms"], ".2f"),
            f"**{row['speedup']:.2f}x**" if row.get("speedup") else "-", number(row.get("speedup_vs_lerobot"), ".2f"),
            number(peak, ".0f"), number(row["warm_up_s"], ".1f"), number(row["max_abs_action_diff"], ".2e"),
            number(row["recompiled_frames"], "d"), number(row["allocations_per_call"], ".0f"), str(row["samples"]),
            row["note"]]) + " |")
    lines += ["", "Speedup: against eager float32 `none` of the same policy (p50); vs LeRobot: against LeRobot's own "
              "`predict_action_chunk`, eager, as it ships. Peak GPU MB leaves out the parked float32 weights of a "
              "bf16 row (kept on the device so the profile can be removed exactly). Warm-up: the first pass over "
              "the measurement frames (compile / capture). Recompiled: frames compiled during the timed calls. "
              "Rows measured one after another; the baseline again at the end of each policy:"]
    for label, info in table["subjects"].items():
        drift = info.get("baseline_drift")
        lines.append(f"- {label}: `{info['policy']}` on the packed {info['robot']} robot, "
                     f"{info.get('parameters') or 0:,} parameters, built in {info.get('build_s', 0):.0f} s"
                     + (f", actions' std {info['action_std']:.3f}" if "action_std" in info else "")
                     + (f", baseline drift {100 * drift:+.1f} %" if drift is not None else ""))
    lines += ["", f"Command: `{env['command']}`", ""]
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in table["rows"] if row["status"] == "ok"]
    subjects = list(dict.fromkeys(row["subject"] for row in rows))
    if not subjects:
        return
    fig, axes = plt.subplots(len(subjects), 1, figsize=(9, 2.2 + 0.28 * len(rows)), squeeze=False)
    for ax, subject in zip(axes[:, 0], subjects, strict=True):
        mine = [row for row in rows if row["subject"] == subject]
        labels = [f"{row['profile']} @ {row['backend']}" for row in mine]
        ax.barh(labels, [row["p50_ms"] for row in mine],
                xerr=[[0] * len(mine), [row["p99_ms"] - row["p50_ms"] for row in mine]], color="tab:blue")
        ax.invert_yaxis()
        ax.set_title(subject, fontsize=10)
        ax.set_xlabel("ms per inference (p50, bar to p99)")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(table["environment"]["device"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    commands = {"pack": lambda _: pack(), "plan": lambda _: plan(), "wheels": lambda _: download_wheels(),
                "park": lambda keep: park(tuple(keep)), "unpark": lambda _: unpark()}
    if len(sys.argv) > 1 and sys.argv[1] in commands:
        commands[sys.argv[1]](sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda | cpu (the rehearsal)")
    parser.add_argument("--tiny", action="store_true", help="tiny policy sizes, 2 rounds: the rehearsal")
    parser.add_argument("--out", required=True, help="where results.json, table.md, latency.png, log.txt go")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole table (default 420)")
    parser.add_argument("--row-seconds", type=float, default=1.5, help="timed seconds per row, roughly")
    parser.add_argument("--only", type=lambda text: [part.strip().strip("'") for part in text.split(",")],
                        help="subjects to measure, comma-separated labels (default: all)")
    parser.add_argument("--resume", help="a folder of an earlier run (results.json): its measured rows are kept, "
                                         "the others measured (the baselines always)")
    args = parser.parse_args()
    if args.device not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import_plugins()
    if args.device == "cpu":
        import torch

        torch.set_num_threads(min(2, torch.get_num_threads()))
    Bench(args).run()


if __name__ == "__main__":
    main()
