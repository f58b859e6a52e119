"""SIMPLER-Bridge (WidowX) through ManiSkill3's port, as a suite: the protocol of SimplerEnv's Bridge
evaluation. Every task has 24 fixed evaluation configurations (object positions x orientations; seed i is
configuration i, one episode each), 5 Hz control, 60 steps, the 3rd-view camera with the real-photo overlay
(visual matching), success as the env reports it at the end of the episode; whether the robot grasped the
object, held it and had it on the target at some step are kept beside it (`measures`).

Tasks use SimplerEnv's names (`widowx_carrot_on_plate`, ...) or ManiSkill's ids. Any seed outside the
evaluation range places the two objects at random (seeded) around the same table area: demonstrations
come from there, never from the evaluation configurations.

The simulator comes from the `simpler` extra (mani-skill + sapien); SAPIEN renders with Vulkan (see
`vulkan.py`). ManiSkill reads its assets from `MS_ASSET_DIR`: the `asset_dir` option points there, at a
folder holding `data/` or at an offline bundle (.tgz) that is unpacked once into the cache.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vla_runtime.plugins import did_you_mean
from vla_runtime.sim.libero.suite import quat_to_axis_angle
from vla_runtime.sim.suite import SeedRange, Suite, register_suite
from vla_runtime.types import Observation, RobotSpec, crop_frame, image_crop

LABEL = "ManiSkill3 port, stand-in table"  # on every printed SIMPLER number: not the original SimplerEnv


@dataclass(frozen=True)
class BridgeTask:
    env_id: str  # ManiSkill3's
    instruction: str  # the env's own (get_language_instruction), known without building it
    objects: tuple[str, ...]  # model folders under custom/models (a collision and a visual mesh each)
    scene: tuple[str, ...] = ("stages/bridge_table_1_v1.glb", "real_inpainting/bridge_real_eval_1.png")

    def missing_assets(self, dataset: Path) -> list[str]:
        """What of this task's assets `dataset` (.../bridge_v2_real2sim_dataset) lacks."""
        missing = [path for path in self.scene if not (dataset / path).is_file()]
        for name in self.objects:
            model = dataset / "custom" / "models" / name
            if not (model / "collision.obj").is_file():
                missing.append(f"custom/models/{name}/collision.obj")
            if not any((model / f"textured.{kind}").is_file() for kind in ("obj", "dae", "glb")):
                missing.append(f"custom/models/{name}/textured.(obj|dae|glb)")
        return missing


# SimplerEnv's task names.
TASKS = {
    "widowx_carrot_on_plate": BridgeTask("PutCarrotOnPlateInScene-v1", "put carrot on plate",
                                         ("bridge_carrot_generated_modified", "bridge_plate_objaverse_larger")),
    "widowx_spoon_on_towel": BridgeTask("PutSpoonOnTableClothInScene-v1", "put the spoon on the towel",
                                        ("bridge_spoon_generated_modified", "table_cloth_generated_shorter")),
    "widowx_stack_cube": BridgeTask("StackGreenCubeOnYellowCubeBakedTexInScene-v1",
                                    "stack the green block on the yellow block",
                                    ("baked_green_cube_3cm", "baked_yellow_cube_3cm")),
    "widowx_put_eggplant_in_basket": BridgeTask("PutEggplantInBasketScene-v1", "put eggplant into yellow basket",
                                                ("eggplant", "sink"), ("stages/bridge_table_1_v2.glb",
                                                                       "real_inpainting/bridge_sink.png")),
}
TASK_SETS = {
    "bridge": ("widowx_carrot_on_plate", "widowx_spoon_on_towel", "widowx_stack_cube"),  # runnable offline
    "bridge_all": tuple(TASKS),  # eggplant needs ManiSkill's own download (its assets are not in the bundle)
}
NUM_CONFIGS = 24  # evaluation configurations per task
CAMERA = "3rd_view_camera"
STATE_DIM = 8  # end-effector xyz and axis-angle in the robot base frame, the two finger positions
ACTION_DIM = 7  # delta xyz (m) and delta rotation (XYZ Euler, rad) in the base frame; gripper (+1 open, -1 close)
CONTROL_DT = 0.2  # 5 Hz
# Action bounds: more than Bridge demonstrations move in one step (the controller takes metres and radians).
ACTION_HIGH = (0.05,) * 3 + (0.5,) * 3 + (1.0,)
# The privileged state (scripted experts only), base frame: source xyz + quat (wxyz), target xyz + quat, and
# the two objects' bounding-box sizes as the env measured them after settling.
PRIVILEGED_DIM = 20
# Random placements (non-evaluation seeds): both objects within this half-width of the evaluation grid's
# center, at least this far apart; the moved object turned from one of the configurations' orientations by up
# to YAW_JITTER about the vertical. (Uniform yaw over the circle, the first dataset's choice, spread 120
# demonstrations over orientations the protocol never shows: the policy trained on them scored 4 %.)
PLACEMENT_HALF_WIDTH = {"widowx_stack_cube": 0.10}
DEFAULT_PLACEMENT_HALF_WIDTH = 0.09
MIN_SEPARATION = {"widowx_stack_cube": 0.06}
DEFAULT_MIN_SEPARATION = 0.12
YAW_JITTER = np.pi / 6

INSTALL_HINT = "install the SIMPLER extra: bash scripts/setup.sh --simpler (mani-skill, sapien and a Vulkan driver)"
ASSET_HINT = ("ManiSkill's Bridge assets: with internet, python -m mani_skill.utils.download_asset bridge_v2_real2sim "
              "-y && python -m mani_skill.utils.download_asset widowx250s -y; offline, set sim.asset_dir to the "
              "bundle (bridge_assets.tgz) or to the folder that contains its data/")


def resolve_task(name: str) -> str:
    if name in TASKS:
        return name
    by_id = {spec.env_id: task for task, spec in TASKS.items()}
    if name in by_id:
        return by_id[name]
    near = did_you_mean(name, [*TASKS, *by_id, *TASK_SETS])
    raise ValueError(f"Unknown SIMPLER-Bridge task '{name}'{near}. Tasks: {', '.join(TASKS)} (or their ManiSkill ids: "
                     f"{', '.join(by_id)}); sets: {', '.join(TASK_SETS)}")


def unpacked_assets(bundle: Path) -> Path:
    """An offline asset bundle (.tgz holding data/) unpacked once into the cache; returns the folder holding data/."""
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()[:16]
    target = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vla_runtime" / "simpler" / digest
    if not (target / "data").is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Unpacked beside the target and renamed into place: an interrupted or concurrent unpack (eval
        # workers) never leaves a half-filled target.
        partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{target.name}."))
        try:
            with tarfile.open(bundle) as archive:
                archive.extractall(partial, filter="data")  # refuses links and paths that leave the folder
            if not (partial / "data").is_dir():
                raise ValueError(f"{bundle} holds no data/ folder; it is not a ManiSkill asset bundle")
            partial.rename(target)
        except OSError:
            if not (target / "data").is_dir():  # another process did not win the race: a real error
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target


def asset_root(asset_dir: str | None) -> Path:
    """The folder ManiSkill reads as MS_ASSET_DIR, from the option, the environment, or ManiSkill's default."""
    if asset_dir:
        path = Path(asset_dir).expanduser()
        if path.is_file():
            return unpacked_assets(path)
        if not (path / "data").is_dir():
            raise FileNotFoundError(f"sim.asset_dir={asset_dir} holds no data/ folder; {ASSET_HINT}")
        return path
    return Path(os.environ.get("MS_ASSET_DIR", Path.home() / ".maniskill")).expanduser()


@functools.cache
def _maniskill(root: str):
    """gymnasium with ManiSkill's envs registered, reading assets from `root` (fixed at mani_skill's import)."""
    from vla_runtime.sim.simpler.vulkan import configure_vulkan

    configure_vulkan()
    os.environ["MS_ASSET_DIR"] = root
    try:
        import gymnasium
        import mani_skill
        import mani_skill.envs  # noqa: F401  (registers the envs)
    except ImportError as error:
        raise ImportError(f"ManiSkill is not installed ({error}); {INSTALL_HINT}") from error
    # Its warnings on every env (no CUDA for rendering, actors without initial poses) say nothing to act on.
    from mani_skill.utils.logging_utils import logger  # named "mani_skill " (sic)

    logger.setLevel(logging.ERROR)
    if Path(mani_skill.ASSET_DIR).resolve() != (Path(root) / "data").resolve():
        raise RuntimeError(f"ManiSkill was imported earlier reading assets from {mani_skill.ASSET_DIR}, not "
                           f"{root}/data; one process reads one asset folder")
    return gymnasium


@dataclass
class SimplerConfig:
    cameras: tuple[str, ...] = (CAMERA,)
    image_size: int = 160  # the 640x480 camera image (or its image_crop) resized to a square, area interpolation
    # The part of the 640x480 frame the images show, [left, top, right, bottom] fractions (None: the whole frame, as
    # SimplerEnv's policies read it); a policy trained on a crop declares it and must be run with the same one.
    # The default, with 160 px, is the workspace the shipped policy reads (benchmarks/eval/simpler_dev_crop160).
    image_crop: tuple[float, float, float, float] | None = (0.08, 0.0, 0.96, 0.88)
    max_steps: int = 60  # ManiSkill3's episode length for these tasks
    asset_dir: str | None = None  # folder holding data/, or an offline bundle .tgz; null: MS_ASSET_DIR / ~/.maniskill
    train_seeds: SeedRange = field(default_factory=lambda: SeedRange(1_000, 1_000_000))
    eval_seeds: SeedRange = field(default_factory=lambda: SeedRange(0, NUM_CONFIGS))

    def __post_init__(self) -> None:
        self.cameras = tuple(self.cameras)
        self.image_crop = image_crop(self.image_crop)
        if self.cameras != (CAMERA,):
            raise ValueError(f"SIMPLER-Bridge has one camera, '{CAMERA}'; got cameras={list(self.cameras)}")
        self.train_seeds, self.eval_seeds = SeedRange.coerce(self.train_seeds), SeedRange.coerce(self.eval_seeds)
        if self.train_seeds.overlaps(SeedRange(0, NUM_CONFIGS)):
            raise ValueError(f"Train seeds {self.train_seeds} include seeds 0-{NUM_CONFIGS - 1}, the evaluation "
                             "configurations; demonstrations must come from random placements")


class SimplerEnv:
    """One SIMPLER-Bridge task. `reset(seed)`: seeds 0-23 are the evaluation configurations, others random
    placements. ManiSkill renders the camera on every step whatever `render` says (it is part of its
    observation); `render` only decides whether the observation carries the image."""

    def __init__(self, task: str, config: SimplerConfig | None = None, render: bool = True,
                 max_steps: int | None = None):
        self.task = resolve_task(task)
        self.config = config or SimplerConfig()
        spec = TASKS[self.task]
        root = asset_root(self.config.asset_dir)
        missing = spec.missing_assets(root / "data" / "tasks" / "bridge_v2_real2sim_dataset")
        if not (root / "data/robots/widowx").is_dir():
            missing.append("robots/widowx")
        if missing:
            raise FileNotFoundError(f"SIMPLER task {self.task} needs assets missing under {root}/data: "
                                    f"{', '.join(missing)}. {ASSET_HINT}")
        gymnasium = _maniskill(str(root))
        self.max_steps = max_steps or self.config.max_steps
        self.dt = CONTROL_DT
        self.render_enabled = render
        # ManiSkill's own time limit is lifted: the episode length is ours (max_steps).
        self._env = gymnasium.make(spec.env_id, obs_mode="rgb+segmentation", num_envs=1, sim_backend="cpu",
                                   max_episode_steps=10**9)
        self._scene = self._env.unwrapped
        self.instruction = self._scene.get_language_instruction()[0]
        # The evaluation grid, kept to restore after a random placement replaced it.
        self._grid = (self._scene.xyz_configs.clone(), self._scene.quat_configs.clone())
        self._obs: dict = {}
        self._info: dict = {}
        self._steps = 0
        self.measures: dict[str, bool] = {}  # the env's partial measures, at any step so far

    @property
    def steps(self) -> int:
        return self._steps

    def render(self, camera: str) -> np.ndarray:
        if camera != CAMERA:
            raise ValueError(f"Camera '{camera}' is not configured; configured: {self.config.cameras}")
        import cv2

        image = crop_frame(self._obs["sensor_data"][CAMERA]["rgb"][0].numpy(), self.config.image_crop)
        size = self.config.image_size
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)

    def observe(self, render: bool | None = None) -> Observation:
        render = self.render_enabled if render is None else render
        agent = self._scene.agent
        to_base = agent.robot.pose.inv()
        hand = agent.controller.controllers["arm"].ee_pose_at_base.raw_pose[0].numpy()
        fingers = agent.robot.get_qpos()[0, -2:].numpy()
        rotation = quat_to_axis_angle(hand[[4, 5, 6, 3]])  # ManiSkill's wxyz -> xyzw
        state = np.concatenate([hand[:3], rotation, fingers]).astype(np.float32)
        poses = [(to_base * self._scene.objs[name].pose).raw_pose[0].numpy() for name in self._scene.obj_names[:2]]
        boxes = [self._scene.episode_model_bbox_sizes[name].numpy() for name in self._scene.obj_names[:2]]
        return Observation(images={CAMERA: self.render(CAMERA)} if render else {}, state=state,
                           instruction=self.instruction, timestamp=self._steps * self.dt,
                           privileged_state=np.concatenate([*poses, *boxes]).astype(np.float32))

    def reset(self, seed: int, render: bool | None = None) -> Observation:
        seed = int(seed)
        scene = self._scene
        if 0 <= seed < NUM_CONFIGS:
            scene.xyz_configs, scene.quat_configs = self._grid
            episode = seed
        else:
            scene.xyz_configs, scene.quat_configs = self._random_placement(np.random.default_rng(seed))
            episode = 0
        self._obs, self._info = self._env.reset(seed=seed % 2**31, options={"episode_id": episode})
        self._steps = 0
        self.measures = {}
        return self.observe(render)

    def _random_placement(self, rng: np.random.Generator):
        import torch
        from transforms3d.euler import euler2quat
        from transforms3d.quaternions import qmult

        xyz, quat = self._grid
        center = xyz[:, :, :2].mean(dim=(0, 1)).numpy()
        half = PLACEMENT_HALF_WIDTH.get(self.task, DEFAULT_PLACEMENT_HALF_WIDTH)
        separation = MIN_SEPARATION.get(self.task, DEFAULT_MIN_SEPARATION)
        while True:
            source, target = center + rng.uniform(-half, half, size=(2, 2))
            if np.linalg.norm(source - target) >= separation:
                break
        heights = xyz[0, :, 2].numpy()  # each object's spawn height (the env lets it settle)
        placed = np.array([[*source, heights[0]], [*target, heights[1]]])
        orientation = quat[rng.integers(len(quat)), 0].numpy()  # one of the configurations' (wxyz)
        turned = qmult(euler2quat(0, 0, rng.uniform(-YAW_JITTER, YAW_JITTER)), orientation)
        return (torch.tensor(placed[None], dtype=torch.float32),
                torch.tensor(np.stack([turned, quat[0, 1].numpy()])[None], dtype=torch.float32))

    def step(self, action: np.ndarray, render: bool | None = None) -> tuple[Observation, float, bool, bool, dict]:
        """-> (observation, reward, success, truncated, info). Success is the env's verdict at the last step
        (SimplerEnv's protocol: an object placed and knocked off again is a failure), so episodes run to the end."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"SIMPLER-Bridge actions have {ACTION_DIM} dimensions, got shape {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"Non-finite action {action} sent to SIMPLER task {self.task}")
        high = np.array(ACTION_HIGH)
        self._obs, reward, _, _, self._info = self._env.step(np.clip(action, -high, high).astype(np.float32))
        self._steps += 1
        for key in ("is_src_obj_grasped", "consecutive_grasp", "src_on_target"):
            self.measures[key] = self.measures.get(key, False) or bool(self._info[key][0])
        truncated = self._steps >= self.max_steps
        success = truncated and bool(self._info["success"][0])
        return self.observe(render), float(reward), success, truncated, self._info

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> SimplerEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@register_suite("simpler_bridge")
class SimplerBridgeSuite(Suite):
    """Options: the fields of `SimplerConfig` (configs/sim/simpler_bridge.yaml)."""

    name = "simpler_bridge"
    label = LABEL
    task_sets = TASK_SETS

    def __init__(self, **options):
        self.config = self.options_to_config(SimplerConfig, "SIMPLER-Bridge", options)
        self.train_seeds, self.eval_seeds = self.config.train_seeds, self.config.eval_seeds
        size = self.config.image_size
        self.spec = RobotSpec(action_dim=ACTION_DIM, state_dim=STATE_DIM, cameras=self.config.cameras,
                              image_size=(size, size), image_crop=self.config.image_crop, control_dt=CONTROL_DT,
                              action_low=tuple(-v for v in ACTION_HIGH),
                              action_high=ACTION_HIGH, hold_dims=(6,),
                              state_names=("eef_x", "eef_y", "eef_z", "eef_rx", "eef_ry", "eef_rz",
                                           "finger_left", "finger_right"))

    def tasks(self) -> tuple[str, ...]:
        return tuple(TASKS)

    def resolve_task(self, name: str) -> str:
        return resolve_task(name)

    def instruction(self, task: str) -> str:
        return TASKS[resolve_task(task)].instruction

    def make_env(self, task: str, render: bool = True, max_steps: int | None = None) -> SimplerEnv:
        return SimplerEnv(task, self.config, render=render, max_steps=max_steps)

    def expert(self):
        from vla_runtime.sim.simpler.expert import SimplerExpert

        return SimplerExpert()

    def settings(self) -> dict:
        config = self.config
        crop = {"image_crop": list(config.image_crop)} if config.image_crop else {}  # none: as collected before it
        return {"sim": "simpler_bridge", "label": LABEL, "cameras": list(config.cameras),
                "image_size": config.image_size, **crop,
                "image_resize": "640x480 cropped -> square, area interpolation" if crop
                                else "640x480 -> square, area interpolation, no crop",
                "max_steps": config.max_steps,
                "initial_states": f"seeds 0-{NUM_CONFIGS - 1}: the evaluation configurations; other seeds: "
                                  f"seeded random placements (positions; orientations within "
                                  f"{np.degrees(YAW_JITTER):.0f} degrees of the configurations')"}

    def __repr__(self) -> str:
        return f"SimplerBridgeSuite({asdict(self.config)})"

