"""A scripted LIBERO expert: pick-and-place from privileged object boxes, through the task's OSC controller.

It reads the goal predicates and the boxes of their arguments from `Observation.privileged_state` (see
`LiberoEnv.goal_boxes`), so it needs no per-task code: for every `on` / `in` predicate it grasps the object
(across its narrow side when that fits in the hand, by the rim when it does not: bowls), carries it above the
target and lets go. Predicates it cannot script (opening drawers, turning knobs) leave it holding still; the
per-task table in the README says which tasks those are.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.spatial.transform import Rotation

from vla_runtime.sim.libero.suite import ACTION_DIM, BOX_SIZE, CONTROL_DT, PREDICATE_SIZE, PREDICATES, STATE_DIM
from vla_runtime.sim.scripted import ScriptedExpert
from vla_runtime.types import PolicySpec

OPEN, CLOSE = -1.0, 1.0
MAX_GRASP_WIDTH = 0.07  # m: the Panda hand opens to 8 cm; wider objects are grasped by the rim
POSITION_GAIN = 10.0  # action units per metre (the controller moves at most 5 cm per unit per step)
ROTATION_GAIN = 3.0  # action units per radian (0.5 rad per unit)
PICK_AND_PLACE = (PREDICATES.index("on") + 1, PREDICATES.index("in") + 1)
# The hand pointing down, fingers closing along world y: robosuite's Panda at its home pose.
HAND_DOWN = np.diag([1.0, -1.0, -1.0])


class Box:
    """An oriented box from the privileged state: world center, half extents in its frame, rotation."""

    def __init__(self, values: np.ndarray):
        self.center, self.half = values[:3], values[3:6]
        w, x, y, z = values[6:10]
        self.rotation = Rotation.from_quat([x, y, z, w]).as_matrix()
        self.vertical_half = float(np.abs(self.rotation[2]) @ self.half)  # half height of its world-aligned box

    @property
    def top(self) -> float:
        return float(self.center[2] + self.vertical_half)

    @property
    def bottom(self) -> float:
        return float(self.center[2] - self.vertical_half)

    def horizontal_axes(self) -> list[tuple[float, np.ndarray]]:
        """(full width, unit xy direction) of its two most horizontal axes, narrowest first."""
        vertical = int(np.argmax(np.abs(self.rotation[2])))
        axes = []
        for i in range(3):
            if i != vertical:
                direction = self.rotation[:2, i]
                axes.append((2 * float(self.half[i]), direction / (np.linalg.norm(direction) + 1e-9)))
        return sorted(axes, key=lambda axis: axis[0])


class LiberoExpert(ScriptedExpert):
    """Scripted pick-and-place for LIBERO's `on` / `in` goals; a data source and an upper bound, not a robot
    policy (it reads simulator state)."""

    spec = PolicySpec(action_dim=ACTION_DIM, state_dim=STATE_DIM, control_dt=CONTROL_DT, privileged=True)
    name = "LIBERO"

    # ---- what the script reads -------------------------------------------------------------------
    def _box(self, predicate: int, argument: int) -> Box:
        start = predicate * PREDICATE_SIZE + 1 + argument * BOX_SIZE
        return Box(self._obs.privileged_state[start:start + BOX_SIZE])

    @property
    def _hand(self) -> np.ndarray:
        return self._obs.state[:3].astype(np.float64)

    # ---- the script ------------------------------------------------------------------------------
    def _run(self) -> Iterator[np.ndarray]:
        predicates = self._obs.privileged_state.reshape(-1, PREDICATE_SIZE)[:, 0].astype(int)
        for index, code in enumerate(predicates):
            if code in PICK_AND_PLACE:
                yield from self._pick_and_place(index)
        while True:
            yield self._action(self._hand, None, OPEN)

    def _pick_and_place(self, index: int) -> Iterator[np.ndarray]:
        for _attempt in range(3):
            obj = self._box(index, 0)
            grasp, yaw = self._grasp(obj)
            yield from self._move(grasp + [0, 0, 0.10], yaw, OPEN, tolerance=0.02, limit=60)
            yield from self._move(grasp, yaw, OPEN, tolerance=0.008, limit=40)
            yield from self._hold(grasp, yaw, CLOSE, steps=10)
            hang = self._hand[2] - obj.bottom  # from the hand down to the object's bottom
            target = self._box(index, 1)
            carry = max(target.top + hang + 0.08, self._hand[2] + 0.12)
            yield from self._move(np.array([*self._hand[:2], carry]), yaw, CLOSE, tolerance=0.03, limit=40)
            if self._box(index, 0).bottom > obj.bottom + 0.03:  # lifted it
                break
            yield from self._hold(self._hand, yaw, OPEN, steps=5)
        held = self._box(index, 0)
        offset = self._hand[:2] - held.center[:2]  # where the hand is on the object (the rim of a bowl)
        release = target.top + hang + 0.02
        above = np.array([*(target.center[:2] + offset), carry])
        yield from self._move(above, yaw, CLOSE, tolerance=0.015, limit=80)
        yield from self._move(np.array([*above[:2], release]), yaw, CLOSE, tolerance=0.01, limit=40)
        yield from self._hold(self._hand, yaw, OPEN, steps=8)
        yield from self._move(self._hand + [0, 0, 0.10], yaw, OPEN, tolerance=0.03, limit=20)

    def _grasp(self, obj: Box) -> tuple[np.ndarray, float]:
        """Where the hand closes and its yaw: across the narrow side at the center, or across the rim."""
        (width, narrow), (wide_width, _) = obj.horizontal_axes()
        height = 2 * obj.vertical_half
        if width <= MAX_GRASP_WIDTH:
            point = np.array([*obj.center[:2], max(obj.top - min(0.03, height / 2), obj.bottom + 0.012)])
            return point, _yaw_closing_along(narrow)
        toward_hand = self._hand[:2] - obj.center[:2]
        toward_hand /= np.linalg.norm(toward_hand) + 1e-9
        radius = wide_width / 2
        point = np.array([*(obj.center[:2] + toward_hand * (radius - 0.012)), obj.top - 0.02])
        return point, _yaw_closing_along(toward_hand)

    def _move(self, target: np.ndarray, yaw: float, grip: float, tolerance: float, limit: int) -> Iterator[np.ndarray]:
        for _ in range(limit):
            if np.linalg.norm(target - self._hand) < tolerance:
                return
            yield self._action(target, yaw, grip)

    def _hold(self, target: np.ndarray, yaw: float, grip: float, steps: int) -> Iterator[np.ndarray]:
        target = np.array(target)
        for _ in range(steps):
            yield self._action(target, yaw, grip)

    def _action(self, target: np.ndarray, yaw: float | None, grip: float) -> np.ndarray:
        action = np.zeros(ACTION_DIM)
        action[:3] = np.clip((target - self._hand) * POSITION_GAIN, -1.0, 1.0)
        if yaw is not None:
            current = Rotation.from_rotvec(self._obs.state[3:6].astype(np.float64))
            desired = Rotation.from_euler("z", yaw) * Rotation.from_matrix(HAND_DOWN)
            action[3:6] = np.clip((desired * current.inv()).as_rotvec() * ROTATION_GAIN, -1.0, 1.0)
        action[6] = grip
        return action


def _yaw_closing_along(direction: np.ndarray) -> float:
    """The hand yaw (about world z, in [-pi/2, pi/2]) whose fingers close along the xy `direction`."""
    yaw = float(np.arctan2(direction[1], direction[0])) + np.pi / 2
    return (yaw + np.pi / 2) % np.pi - np.pi / 2
