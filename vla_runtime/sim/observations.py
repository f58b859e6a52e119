"""Fixed sets of observations along scripted-expert trajectories: what acceleration methods calibrate
on and what benchmarks measure action deviation on. Drawn from training seeds (never eval seeds)."""

from __future__ import annotations

from tqdm.auto import tqdm

from vla_runtime.sim.metaworld_suite import MetaWorldConfig, MetaWorldEnv
from vla_runtime.types import Observation

# Offsets into the training seed range: calibration and measurement sets never share a state.
CALIBRATION_SEEDS = 90_000
MEASUREMENT_SEEDS = 95_000


def expert_observations(tasks: list[str], per_task: int, config: MetaWorldConfig | None = None,
                        seed_offset: int = CALIBRATION_SEEDS, steps_apart: int = 12) -> list[Observation]:
    """`per_task` observations per task, the i-th taken after i * `steps_apart` expert steps of its own
    episode (so the set covers reaching, grasping and moving), without privileged state."""
    from vla_runtime.policies import make_policy

    config = config or MetaWorldConfig()
    expert = make_policy("expert")
    observations = []
    for task in tqdm(tasks, desc="expert observations", unit="task", leave=False):
        with MetaWorldEnv(task, config, render=True) as env:
            for index in range(per_task):
                obs = env.reset(config.train_seeds.seed(seed_offset + index), render=False)
                expert.reset()
                for _ in range(index * steps_apart):
                    obs, _, success, truncated, _ = env.step(expert.predict_chunk(obs).actions[0], render=False)
                    if success or truncated:
                        break
                observations.append(env.observe(render=True).without_privileged_state())
    return observations
