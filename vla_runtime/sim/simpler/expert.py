"""A scripted SIMPLER-Bridge expert: pick the source object and put it on the target, from privileged poses.

Everything is in the robot's base frame (as the state and the controller): the hand points down with its
x axis and closes along its y axis, so a grasp is a yaw about the vertical that closes the fingers across the
object's narrow side. The WidowX controller adds each action to its target pose, so the position command is
a fraction of the remaining error: the target then walks the hand onto the goal without overshooting it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.spatial.transform import Rotation

from vla_runtime.sim.scripted import ScriptedExpert
from vla_runtime.sim.simpler.suite import ACTION_DIM, ACTION_HIGH, CONTROL_DT, STATE_DIM
from vla_runtime.types import PolicySpec

OPEN, CLOSE = 1.0, -1.0
POSITION_GAIN = 0.8  # share of the position error commanded per step
# The hand pointing down (its x axis along -z), fingers closing along the base y axis: the reset pose.
HAND_DOWN = Rotation.from_matrix(np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]))
APPROACH_HEIGHT = 0.07  # m above the grasp point
CARRY_HEIGHT = 0.10  # m above the target's top while carrying
SYMMETRIC_SIZE_RATIO = 1.15  # horizontal sides within 15 % of the narrowest count as equally narrow


class SimplerExpert(ScriptedExpert):
    """Scripted pick-and-place for the Bridge tasks; a data source and an upper bound, not a robot policy
    (it reads simulator state)."""

    spec = PolicySpec(action_dim=ACTION_DIM, state_dim=STATE_DIM, control_dt=CONTROL_DT, privileged=True)
    name = "SIMPLER"

    # ---- what the script reads -------------------------------------------------------------------
    def _object(self, index: int) -> tuple[np.ndarray, Rotation, np.ndarray]:
        """Position, rotation and bounding-box size of the source (0) or target (1) object."""
        privileged = self._obs.privileged_state.astype(np.float64)
        pose = privileged[7 * index:7 * index + 7]
        w, x, y, z = pose[3:]
        return pose[:3], Rotation.from_quat([x, y, z, w]), privileged[14 + 3 * index:17 + 3 * index]

    @property
    def _hand(self) -> np.ndarray:
        return self._obs.state[:3].astype(np.float64)

    # ---- the script ------------------------------------------------------------------------------
    def _run(self) -> Iterator[np.ndarray]:
        center, rotation, size = self._object(0)
        yaw = _grasp_yaw(rotation, size)
        grasp = center.copy()
        yield from self._move(grasp + [0, 0, APPROACH_HEIGHT], yaw, OPEN, tolerance=0.015, limit=12)
        yield from self._move(grasp, yaw, OPEN, tolerance=0.008, limit=8)
        yield from self._hold(yaw, CLOSE, steps=3)
        target, _, target_size = self._object(1)
        carry = target[2] + target_size[2] / 2 + CARRY_HEIGHT
        yield from self._move(np.array([*self._hand[:2], carry]), yaw, CLOSE, tolerance=0.02, limit=6)
        held, _, _ = self._object(0)
        offset = self._hand[:2] - held[:2]  # where the hand holds the object
        above = np.array([*(target[:2] + offset), carry])
        yield from self._move(above, yaw, CLOSE, tolerance=0.015, limit=12)
        release = target[2] + target_size[2] / 2 + (self._hand[2] - held[2]) + 0.02
        yield from self._move(np.array([*above[:2], release]), yaw, CLOSE, tolerance=0.01, limit=6)
        yield from self._hold(yaw, OPEN, steps=3)
        while True:
            yield self._action(np.array([*above[:2], carry]), yaw, OPEN)

    def _move(self, goal: np.ndarray, yaw: float, grip: float, tolerance: float, limit: int) -> Iterator[np.ndarray]:
        for _ in range(limit):
            if np.linalg.norm(goal - self._hand) < tolerance:
                return
            yield self._action(goal, yaw, grip)

    def _hold(self, yaw: float, grip: float, steps: int) -> Iterator[np.ndarray]:
        goal = self._hand.copy()
        for _ in range(steps):
            yield self._action(goal, yaw, grip)

    def _action(self, goal: np.ndarray, yaw: float, grip: float) -> np.ndarray:
        high = np.array(ACTION_HIGH)
        action = np.zeros(ACTION_DIM)
        action[:3] = (goal - self._hand) * POSITION_GAIN
        current = Rotation.from_rotvec(self._obs.state[3:6].astype(np.float64))
        desired = Rotation.from_euler("z", yaw) * HAND_DOWN
        action[3:6] = (desired * current.inv()).as_euler("XYZ")
        action[6] = grip
        return np.clip(action, -high, high)


def _grasp_yaw(rotation: Rotation, size: np.ndarray) -> float:
    """The hand yaw (in [-pi/2, pi/2]) whose fingers close across the object's narrowest horizontal side.

    Where both horizontal sides are about as narrow (the cubes), either grasp works and the one nearest the
    reset yaw (0) is taken: choosing by a 1 mm size difference made the demonstrations' yaw jump by 90 degrees
    between look-alike scenes, which a policy cannot learn from the image."""
    axes = rotation.as_matrix()
    vertical = int(np.argmax(np.abs(axes[2])))
    horizontal = [i for i in range(3) if i != vertical]
    narrowest = min(size[i] for i in horizontal)
    candidates = [_closing_yaw(axes[:2, i]) for i in horizontal if size[i] <= SYMMETRIC_SIZE_RATIO * narrowest]
    return min(candidates, key=abs)


def _closing_yaw(direction: np.ndarray) -> float:
    """The hand yaw in [-pi/2, pi/2] whose fingers (the hand's y axis) close along a horizontal direction."""
    yaw = float(np.arctan2(direction[1], direction[0])) - np.pi / 2
    return (yaw + np.pi / 2) % np.pi - np.pi / 2
