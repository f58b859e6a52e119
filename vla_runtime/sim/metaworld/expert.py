"""Meta-World's own scripted experts as a policy (they read simulator state)."""

from __future__ import annotations

import warnings

import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from vla_runtime.sim.metaworld.suite import ACTION_DIM, CONTROL_DT, INSTRUCTIONS, STATE_DIM
from vla_runtime.types import ActionChunk, Observation, PolicySpec, PolicyStructure

# The experts' gains deliberately exceed the action range (the env clips); the warning on every
# step says nothing new.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)


class MetaWorldExpert:
    """Meta-World's scripted expert for whichever task the instruction names.

    It reads the simulator's privileged state (object and goal poses), so it is a data source and an
    upper bound, not a robot policy.
    """

    spec = PolicySpec(action_dim=ACTION_DIM, state_dim=STATE_DIM, control_dt=CONTROL_DT, privileged=True)

    def __init__(self) -> None:
        self.structure = PolicyStructure()
        self._experts: dict[str, object] = {}
        self._task_of = {instruction: task for task, instruction in INSTRUCTIONS.items()}

    def reset(self) -> None:
        pass

    def predict_chunk(self, obs: Observation) -> ActionChunk:
        if obs.privileged_state is None:
            raise ValueError("The scripted expert needs Observation.privileged_state (simulator state)")
        task = self._task_of.get(obs.instruction)
        if task is None:
            raise ValueError(f"No Meta-World task has the instruction '{obs.instruction}'")
        if task not in self._experts:
            self._experts[task] = ENV_POLICY_MAP[task]()
        action = self._experts[task].get_action(obs.privileged_state)
        return ActionChunk(np.clip(action, -1.0, 1.0)[None], t0=obs.timestamp, dt=CONTROL_DT)
