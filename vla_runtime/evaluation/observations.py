"""Fixed sets of observations along a suite's scripted-expert trajectories: what acceleration methods
calibrate on and what benchmarks measure action deviation on. Drawn from training seeds (never eval seeds)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from tqdm.auto import tqdm

from vla_runtime.control.executor import SyncExecutor
from vla_runtime.sim.suite import Suite
from vla_runtime.types import Observation

# Where in the training seed range the sets start (a share of it; Meta-World: seeds 90000 and 95000), far
# from the seeds demonstrations are collected from first: calibration and measurement never share a state.
CALIBRATION_SEEDS = 0.90
MEASUREMENT_SEEDS = 0.95


def expert_sequences(suite: Suite, tasks: list[str], per_task: int, seeds_from: float = CALIBRATION_SEEDS,
                     steps_apart: int = 12, frames: int = 1, frame_stride: int = 4) -> list[list[Observation]]:
    """`per_task` sequences per task of `frames` observations `frame_stride` expert steps apart (4: one
    executed chunk, what a policy sees between two calls). Sequence i starts after i * `steps_apart`
    expert steps of its own episode, so the set covers reaching, grasping and moving. No privileged state."""
    first_seed = int(seeds_from * suite.train_seeds.count)
    expert = SyncExecutor(suite.expert())
    sequences = []
    for task in tqdm(tasks, desc="expert observations", unit="task", leave=False):
        with suite.make_env(task, render=True) as env:
            for index in range(per_task):
                obs = env.reset(suite.train_seeds.seed(first_seed + index), render=False)
                expert.reset()
                sequence, steps, finished = [], 0, False
                for frame in range(frames):
                    target = index * steps_apart + frame * frame_stride
                    while steps < target and not finished:  # a finished episode repeats its last frame
                        obs, _, success, truncated, _ = env.step(expert.act(obs), render=False)
                        steps += 1
                        finished = success or truncated
                    sequence.append(env.observe(render=True).without_privileged_state())
                sequences.append(sequence)
    return sequences


def expert_observations(suite: Suite, tasks: list[str], per_task: int, seeds_from: float = CALIBRATION_SEEDS,
                        steps_apart: int = 12) -> list[Observation]:
    """One observation per sequence of `expert_sequences`: a calibration set."""
    return [sequence[0] for sequence in expert_sequences(suite, tasks, per_task, seeds_from, steps_apart)]


def calibration_source(suite: Suite, tasks: list[str], per_task: int) -> Callable[[], list[Observation]]:
    """A suite's calibration set, built on first use (most runs find their artifacts on disk)."""
    return functools.partial(expert_observations, suite, tasks, per_task)
