"""Roll policies out in the simulator: one episode, or many through a launcher (`launchers.py`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vla_runtime.accel.profiles import Accelerator
from vla_runtime.control.executor import SyncExecutor, policy_view
from vla_runtime.control.inference import LatencyModel, SimulatedInferenceWorker
from vla_runtime.control.loop import ControlLoop, RuntimeConfig, SimulatedClock
from vla_runtime.control.reuse import NeverReuse, ReuseGate, make_reuse_gate
from vla_runtime.control.rtc import DelayEstimator, chunked
from vla_runtime.data.episodes import Episode, EpisodeStore
from vla_runtime.evaluation.launchers import LAUNCHERS
from vla_runtime.evaluation.observations import calibration_source
from vla_runtime.evaluation.specs import AccelSpec, RealtimeSpec
from vla_runtime.sim.suite import Env, Suite
from vla_runtime.types import Observation, Policy


@dataclass
class Trajectory:
    """Everything a policy saw and did in one episode, frame t paired with action t."""

    images: dict[str, list[np.ndarray]] = field(default_factory=dict)
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)

    def append(self, obs: Observation, action: np.ndarray) -> None:
        for camera, image in obs.images.items():
            self.images.setdefault(camera, []).append(image)
        self.states.append(obs.state)
        self.actions.append(np.asarray(action, dtype=np.float32))
        self.timestamps.append(obs.timestamp)

    def to_episode(self, task: str, task_id: int, instruction: str, seed: int, success: bool) -> Episode:
        return Episode(task=task, task_id=task_id, instruction=instruction, seed=seed, success=success,
                       images={camera: np.stack(frames) for camera, frames in self.images.items()},
                       state=np.stack(self.states), action=np.stack(self.actions),
                       timestamp=np.asarray(self.timestamps))


@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    length: int
    inference_latency_s: list[float]
    trajectory: Trajectory | None = None
    video_path: str | None = None
    error: str | None = None  # what raised, when the episode ended in an exception
    loop: dict | None = None  # control-loop metrics (realtime mode)
    measures: dict[str, bool] = field(default_factory=dict)  # the suite's partial measures (SIMPLER's grasp)

    @property
    def policy_calls(self) -> int:
        return len(self.inference_latency_s)

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self) if f.name != "trajectory"})

    @classmethod
    def from_json(cls, line: str) -> EpisodeResult:
        return cls(**json.loads(line))


def read_journal(path: Path) -> dict[tuple[str, int], EpisodeResult]:
    """The episodes a run already finished, by (task, seed). A last line cut short by a kill is ignored (that
    episode runs again); anything else unreadable is an error naming the file and line."""
    done: dict[tuple[str, int], EpisodeResult] = {}
    if not path.exists():
        return done
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            result = EpisodeResult.from_json(line)
        except (json.JSONDecodeError, TypeError) as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not an episode result ({exc})") from exc
        done[(result.task, result.seed)] = result
    return done


def run_episode(
    env: Env,
    policy: Policy,
    seed: int,
    actions_per_chunk: int | None = None,
    keep_trajectory: bool = False,
) -> EpisodeResult:
    """Synchronous protocol: the world waits while the policy thinks. Executes the first
    `actions_per_chunk` actions of each chunk (all of them when None), then asks again."""
    # Render only the frames somebody looks at: the policy's, at each query, or every frame for a trajectory.
    render_each_step = keep_trajectory and env.render_enabled
    render_for_policy = bool(policy.spec.cameras) and env.render_enabled
    obs = env.reset(seed, render=render_each_step or render_for_policy)
    executor = SyncExecutor(policy, actions_per_chunk)
    executor.reset()
    trajectory = Trajectory() if keep_trajectory else None
    while True:
        action = executor.act(obs)
        if trajectory is not None:
            trajectory.append(obs, action)
        render = render_each_step or (render_for_policy and executor.needs_observation)
        obs, _, success, truncated, _ = env.step(action, render=render)
        if success or truncated:
            break
    return EpisodeResult(env.task, seed, success, env.steps, executor.latency_s, trajectory,
                         measures=dict(env.measures))


class SimRobot:
    """A simulator env seen as a robot by the control loop: one env step per control tick."""

    def __init__(self, env: Env, policy: Policy):
        self.env = env
        self.policy = policy
        self.success = False
        self.done = False

    def observation_age_s(self) -> float:
        return 0.0  # the simulator always has the state of this very tick

    def observe(self) -> Observation:
        return policy_view(self.policy, self.env.observe(render=bool(self.policy.spec.cameras)))

    def send(self, command: np.ndarray) -> None:
        _, _, success, truncated, _ = self.env.step(command, render=False)
        self.success = success
        self.done = success or truncated


def run_episode_realtime(env: Env, policy: Policy, seed: int, runtime: RuntimeConfig,
                         latency_model: LatencyModel, reuse_gate: ReuseGate | None = None,
                         delays: DelayEstimator | None = None) -> EpisodeResult:
    """Latency in the loop: the simulator advances one step per control tick, in simulated time, and
    keeps executing queued actions while a chunk is being computed (`latency_model` says how long).
    `delays`: the real-time chunking delay estimate, shared by the episodes of a process."""
    if not np.isclose(runtime.control_hz * env.dt, 1.0):
        raise ValueError(f"runtime.control_hz={runtime.control_hz} but the simulator steps at {1 / env.dt:g} Hz")
    env.reset(seed, render=False)
    policy.reset()
    latency_model.reset()
    reuse_gate = reuse_gate or NeverReuse()
    reuse_gate.reset()
    robot = SimRobot(env, policy)
    loop = ControlLoop(robot, SimulatedInferenceWorker(policy, latency_model, env.dt, runtime.max_in_flight), runtime,
                       clock=SimulatedClock(), reuse_gate=reuse_gate, delays=delays)
    metrics = loop.run(env.max_steps, done=lambda: robot.done)
    return EpisodeResult(env.task, seed, robot.success, env.steps, metrics.inference_latency_s,
                         loop=metrics.summary(), measures=dict(env.measures))


def write_video(path: Path, frames: list[np.ndarray], fps: int = 20) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(path, fps=fps, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)


@dataclass(frozen=True)
class EvalJob:
    task: str
    episode_index: int
    seed: int


def accelerate(policy: Policy, suite: Suite, accel: AccelSpec):
    """Applies `accel` to `policy`, calibrated on `suite`'s expert observations; a compiled backend is warmed up
    now, so that the first episode's (or request's) latency is the policy's own."""
    calibration = accel.calibration
    source = calibration_source(suite, list(calibration.tasks), calibration.per_task)
    accelerator = Accelerator(policy, source, calibration.directory, accel.policy_name, execution=accel.execution)
    handle = accelerator.apply(accel.profile)
    if handle.execution is not None:
        accelerator.warm_up()
    return handle


class EpisodeWorker:
    """Holds one policy and one env per task; runs jobs. Lives in a worker process (or inline).

    `realtime`: None for the synchronous protocol, else latency in the loop. `accel`: None, or the acceleration
    profile applied to the policy (its reuse gate, if any, replaces the named one). `episodes_dir`: an existing
    episode dataset (EpisodeStore) each episode is written to (sync only). `policy_name`: what errors call the
    policy (a policy that does not fit the suite).
    """

    def __init__(self, policy_factory: Any, suite: Suite, actions_per_chunk: int | None,
                 video_dir: str | None, realtime: RealtimeSpec | None = None, accel: AccelSpec | None = None,
                 episodes_dir: str | None = None, policy_name: str = "this policy"):
        self.policy: Policy = policy_factory()
        self.suite = suite
        suite.check_policy(self.policy, policy_name)
        self.accel = accelerate(self.policy, suite, accel) if accel else None
        # Unless the caller says otherwise, a policy may declare how much of its chunk to execute.
        self.actions_per_chunk = actions_per_chunk or self.policy.spec.actions_per_chunk
        self.video_dir = Path(video_dir) if video_dir else None
        self.episode_store = EpisodeStore(episodes_dir) if episodes_dir else None
        self.realtime = None
        if realtime is not None:
            if video_dir or episodes_dir:
                raise ValueError("video=true and save_episodes=true are only available with runtime.mode=sync")
            # The whole chunk is queued; the policy's (or the caller's) executed horizon sets when to ask again.
            loop = realtime.loop.for_policy(self.policy.spec, actions_per_chunk)
            profile_gate = self.accel.reuse_gate if self.accel else None
            gate = profile_gate or make_reuse_gate(realtime.reuse_gate)
            self.policy = chunked(self.policy, loop.chunking, loop.rtc)
            self.realtime = (loop, realtime.latency.model(), gate,
                             DelayEstimator(1.0 / loop.control_hz, loop.warmup_calls))
        self.envs: dict[str, Env] = {}

    def env(self, task: str) -> Env:
        """The env of `task`; the previous task's is closed first. Jobs come task after task, so a worker still
        builds each env about once, and holds one: ten LIBERO envs (~0.65 GB each) per worker ran a 24 GB
        machine out of memory beside another job."""
        if task not in self.envs:
            self.close()
            render = bool(self.policy.spec.cameras) or self.keeps_frames
            self.envs = {task: self.suite.make_env(task, render=render)}
        return self.envs[task]

    @property
    def keeps_frames(self) -> bool:
        return self.video_dir is not None or self.episode_store is not None

    def run(self, job: EvalJob) -> EpisodeResult:
        keep = self.keeps_frames
        env = self.env(job.task)
        try:
            if self.realtime is None:
                result = run_episode(env, self.policy, job.seed, self.actions_per_chunk, keep)
            else:
                result = run_episode_realtime(env, self.policy, job.seed, *self.realtime)
        except Exception as exc:  # one broken episode must not throw away the others
            error = f"{type(exc).__name__}: {exc}"
            return EpisodeResult(job.task, job.seed, False, env.steps, [], error=error)
        if self.episode_store is not None:
            self.episode_store.write(result.trajectory.to_episode(job.task, self.suite.task_id(job.task),
                                                                  env.instruction, job.seed, result.success))
        if self.video_dir is not None:
            camera = self.suite.spec.cameras[0]
            path = self.video_dir / job.task / f"episode{job.episode_index:03d}_seed{job.seed}.mp4"
            write_video(path, result.trajectory.images[camera])
            result.video_path = str(path)
        result.trajectory = None  # frames stay on disk; do not ship them back between processes
        return result

    def close(self) -> None:
        for env in self.envs.values():
            env.close()


def evaluate(
    policy_factory: Any,
    suite: Suite,
    tasks: list[str],
    episodes_per_task: int,
    workers: int = 1,
    actions_per_chunk: int | None = None,
    video_dir: str | None = None,
    progress: bool = True,
    realtime: RealtimeSpec | None = None,
    accel: AccelSpec | None = None,
    episodes_dir: str | None = None,
    policy_name: str = "this policy",
    launcher: str = "local",
    ray_address: str | None = None,
    journal: str | Path | None = None,
) -> list[EpisodeResult]:
    """Episodes on the eval seeds: episode i of every task starts from eval seed i. `episodes_dir`: an
    episode dataset (already created) that keeps every episode's frames, states and actions.
    `policy_name`: what errors call the policy. `launcher`: a registered launcher (`evaluation/launchers.py`):
    `local` (worker processes) or `ray` (actors, on `ray_address` or a local cluster). `journal`: a file each
    finished episode is appended to; the episodes it already holds are not run again (a resumed sweep).

    `policy_factory` is a picklable zero-argument callable, so each worker builds its own policy.
    """
    make_pool = LAUNCHERS.get(launcher)  # an unknown name: one line naming the registered ones
    seeds = suite.seeds("eval")
    jobs = [EvalJob(task, i, seeds.seed(i)) for task in tasks for i in range(episodes_per_task)]
    journal = Path(journal) if journal else None
    done = read_journal(journal) if journal else {}
    if done:  # rewritten clean: a line cut short by a kill must not run into the next one appended
        journal.write_text("".join(result.to_json() + "\n" for result in done.values()))
    results = [done[key] for key in ((job.task, job.seed) for job in jobs) if key in done]
    todo = [job for job in jobs if (job.task, job.seed) not in done]
    worker_args = (policy_factory, suite, actions_per_chunk, video_dir, realtime, accel, episodes_dir,
                   policy_name)
    with tqdm(total=len(jobs), initial=len(results), desc="episodes", unit="ep", disable=not progress) as bar:
        if todo:
            with make_pool(EpisodeWorker, worker_args, min(workers, len(todo)), ray_address) as pool:
                for result in pool.imap_unordered(todo):
                    results.append(result)
                    if journal is not None:
                        with journal.open("a") as f:
                            f.write(result.to_json() + "\n")
                    bar.update()
    order = {(job.task, job.seed): i for i, job in enumerate(jobs)}
    return sorted(results, key=lambda r: order[(r.task, r.seed)])
