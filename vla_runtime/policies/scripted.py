"""Non-learned policies: Meta-World's own scripted experts, and uniform random actions."""

from __future__ import annotations

import warnings

import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from vla_runtime.policies.registry import register_policy
from vla_runtime.sim.metaworld_suite import ACTION_DIM, CONTROL_DT, task_for_instruction
from vla_runtime.types import ActionChunk, Observation, PolicyStructure

# The experts' gains deliberately exceed the action range (the env clips); the warning on every
# step says nothing new.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)


class MetaWorldExpert:
    """Meta-World's scripted expert for whichever task the instruction names.

    It reads the simulator's privileged state (object and goal poses), so it is a data source and an
    upper bound, not a robot policy.
    """

    camera_names: tuple[str, ...] = ()
    privileged = True

    def __init__(self) -> None:
        self.structure = PolicyStructure()
        self._experts: dict[str, object] = {}

    def reset(self) -> None:
        pass

    def predict_chunk(self, obs: Observation) -> ActionChunk:
        if obs.privileged_state is None:
            raise ValueError("The scripted expert needs Observation.privileged_state (simulator state)")
        task = task_for_instruction(obs.instruction)
        if task not in self._experts:
            self._experts[task] = ENV_POLICY_MAP[task]()
        action = self._experts[task].get_action(obs.privileged_state)
        return ActionChunk(np.clip(action, -1.0, 1.0)[None], t0=obs.timestamp, dt=CONTROL_DT)


class RandomPolicy:
    """Uniform random actions in [-1, 1]; a floor for success rates."""

    camera_names: tuple[str, ...] = ()
    privileged = False

    def __init__(self, chunk_size: int = 1, seed: int = 0) -> None:
        self.structure = PolicyStructure()
        self.chunk_size = int(chunk_size)
        self._rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def predict_chunk(self, obs: Observation) -> ActionChunk:
        actions = self._rng.uniform(-1.0, 1.0, size=(self.chunk_size, ACTION_DIM))
        return ActionChunk(actions, t0=obs.timestamp, dt=CONTROL_DT)


register_policy("expert")(MetaWorldExpert)
register_policy("random")(RandomPolicy)
