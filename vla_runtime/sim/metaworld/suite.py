"""Meta-World v3 as a suite: its 50 tasks as environments that return `Observation`s.

What a policy sees: RGB images from fixed cameras, the end-effector position + gripper opening, and
a natural-language instruction. Object and goal poses stay in `privileged_state`, which the runner
hands only to scripted experts.
"""

from __future__ import annotations

import atexit
from dataclasses import asdict, dataclass, field

import mujoco
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3

from vla_runtime.plugins import did_you_mean
from vla_runtime.sim.suite import SeedRange, Suite, register_suite
from vla_runtime.types import Observation, RobotSpec

MT50 = tuple(ALL_V3_ENVIRONMENTS)
MT10 = tuple(MT10_V3)
TASK_SETS = {"mt10": MT10, "mt50": MT50}

INSTRUCTIONS = {
    "assembly-v3": "put the ring on the peg",
    "basketball-v3": "dunk the ball into the basket",
    "bin-picking-v3": "move the cube from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button behind the wall from the top",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button behind the wall from the front",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "pull the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "hand-insert-v3": "put the hand into the hole",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "turn the faucet handle to open it",
    "faucet-close-v3": "turn the faucet handle to close it",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate sideways back out of the goal",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "push the bottle with the stick",
    "stick-pull-v3": "pull the bottle with the stick",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "push the puck back to the goal",
    "reach-v3": "reach the goal with the hand",
    "reach-wall-v3": "reach the goal behind the wall",
    "shelf-place-v3": "place the puck on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}

STATE_DIM = 4  # end-effector xyz + gripper opening
ACTION_DIM = 4  # end-effector delta xyz + gripper torque, each in [-1, 1]
CONTROL_DT = 0.0125  # seconds per env step: 5 MuJoCo steps of 2.5 ms (80 Hz control)


def resolve_task(name: str) -> str:
    """Canonical MT50 name for `name` ("drawer-open" or "drawer-open-v3"); unknown -> error listing all."""
    canonical = name if name.endswith("-v3") else f"{name}-v3"
    if canonical not in ALL_V3_ENVIRONMENTS:
        raise ValueError(f"Unknown Meta-World task '{name}'{did_you_mean(canonical, MT50)}. "
                         f"Valid task names: {', '.join(MT50)}")
    return canonical


@dataclass
class MetaWorldConfig:
    cameras: tuple[str, ...] = ("corner4",)
    image_size: int = 128
    # Meta-World's corner cameras are mounted rolled by 180 degrees; rotating the image back gives an
    # upright, unmirrored view.
    rotate_180: tuple[str, ...] = ("corner", "corner2", "corner3", "corner4")
    # The goal sites are 2 cm spheres, 2-4 pixels at this resolution; visual-only, so enlarging them
    # changes nothing physical but lets an image policy see where to go.
    goal_marker_radius: float = 0.04
    max_steps: dict[str, int] = field(default_factory=dict)
    default_max_steps: int = 500
    train_seeds: SeedRange = field(default_factory=lambda: SeedRange(0, 100_000))
    eval_seeds: SeedRange = field(default_factory=lambda: SeedRange(1_000_000, 100_000))

    def __post_init__(self) -> None:
        self.cameras = tuple(self.cameras)
        self.rotate_180 = tuple(self.rotate_180)
        self.train_seeds, self.eval_seeds = SeedRange.coerce(self.train_seeds), SeedRange.coerce(self.eval_seeds)
        if self.train_seeds.overlaps(self.eval_seeds):
            raise ValueError(f"Train seeds {self.train_seeds} and eval seeds {self.eval_seeds} overlap")
        self.max_steps = {resolve_task(task): int(steps) for task, steps in self.max_steps.items()}

    def max_steps_for(self, task: str) -> int:
        return int(self.max_steps.get(task, self.default_max_steps))


class MetaWorldEnv:
    """One Meta-World task. `reset(seed)` gives the same initial state for the same seed."""

    def __init__(self, task: str, config: MetaWorldConfig | None = None, render: bool = True,
                 max_steps: int | None = None):
        self.task = resolve_task(task)
        self.config = config or MetaWorldConfig()
        self.instruction = INSTRUCTIONS[self.task]
        self.max_steps = max_steps or self.config.max_steps_for(self.task)
        self.render_enabled = render

        env = ALL_V3_ENVIRONMENTS[self.task]()
        # Full observability for privileged_state (goal position included); it never reaches a
        # learned policy. The cached observation space was built for the other setting.
        env._partially_observable = False
        env.__dict__.pop("sawyer_observation_space", None)
        env._set_task_called = True
        # Random initial states drawn from env.np_random, which `reset(seed)` seeds.
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        # Meta-World truncates at its own 500 steps and then refuses to step; we count our own.
        env.max_path_length = max(env.max_path_length, self.max_steps + 1)
        self._env = env
        if not np.isclose(env.dt, CONTROL_DT):
            raise RuntimeError(f"Meta-World control period changed: {env.dt} s, expected {CONTROL_DT} s")
        self.dt = CONTROL_DT

        model = env.model
        known_cameras = [model.camera(i).name for i in range(model.ncam)]
        for camera in self.config.cameras:
            if camera not in known_cameras:
                raise ValueError(
                    f"Camera '{camera}' does not exist in Meta-World task {self.task}; "
                    f"available cameras: {', '.join(known_cameras)}"
                )
        goal_site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "goal")
        if goal_site >= 0 and self.config.goal_marker_radius > 0:
            model.site_size[goal_site][0] = self.config.goal_marker_radius
        self._renderer: mujoco.Renderer | None = None
        self._steps = 0
        self._full_state: np.ndarray | None = None

    @property
    def measures(self) -> dict[str, bool]:
        """Success is its only measure."""
        return {}

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def renderer(self) -> mujoco.Renderer:
        if self._renderer is None:
            size = self.config.image_size
            self._renderer = mujoco.Renderer(self._env.model, size, size)
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                         mujoco.mjtRndFlag.mjRND_SKYBOX):
                self._renderer.scene.flags[flag] = False
            # Registered after MuJoCo's own EGL clean-up, so it runs first at exit: the context is
            # freed while the display still exists (envs left open in worker processes).
            atexit.register(self._close_renderer)
        return self._renderer

    def _close_renderer(self) -> None:
        if self._renderer is not None:
            atexit.unregister(self._close_renderer)
            self._renderer.close()
            self._renderer = None

    def render(self, camera: str) -> np.ndarray:
        if camera not in self.config.cameras:
            raise ValueError(f"Camera '{camera}' is not configured; configured: {self.config.cameras}")
        self.renderer.update_scene(self._env.data, camera=camera)
        image = self.renderer.render()
        if camera in self.config.rotate_180:
            image = image[::-1, ::-1]
        return np.ascontiguousarray(image)

    def observe(self, render: bool | None = None) -> Observation:
        """The current observation; images only when `render` (default: the env's setting), since
        rendering costs 20x a physics step."""
        render = self.render_enabled if render is None else render
        images = {cam: self.render(cam) for cam in self.config.cameras} if render else {}
        return Observation(
            images=images,
            state=np.asarray(self._full_state[:STATE_DIM], dtype=np.float32),
            instruction=self.instruction,
            timestamp=self._steps * self.dt,
            privileged_state=np.array(self._full_state, dtype=np.float64),
        )

    def reset(self, seed: int, render: bool | None = None) -> Observation:
        self._env.seed(int(seed))
        self._full_state, _ = self._env.reset()
        self._steps = 0
        return self.observe(render)

    def step(self, action: np.ndarray, render: bool | None = None) -> tuple[Observation, float, bool, bool, dict]:
        """-> (observation, reward, success, truncated, info). Actions are clipped to [-1, 1]."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"Meta-World actions have {ACTION_DIM} dimensions, got shape {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"Non-finite action {action} sent to Meta-World task {self.task}")
        self._full_state, reward, _, _, info = self._env.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        success = bool(info["success"])
        return self.observe(render), float(reward), success, self._steps >= self.max_steps, info

    def close(self) -> None:
        self._close_renderer()
        self._env.close()

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@register_suite("metaworld")
class MetaWorldSuite(Suite):
    """Options: the fields of `MetaWorldConfig` (configs/sim/metaworld.yaml)."""

    name = "metaworld"
    task_sets = TASK_SETS

    def __init__(self, **options):
        self.config = self.options_to_config(MetaWorldConfig, "Meta-World", options)
        self.train_seeds, self.eval_seeds = self.config.train_seeds, self.config.eval_seeds
        size = self.config.image_size
        self.spec = RobotSpec(action_dim=ACTION_DIM, state_dim=STATE_DIM, cameras=self.config.cameras,
                              image_size=(size, size), control_dt=CONTROL_DT, action_low=(-1.0,) * ACTION_DIM,
                              action_high=(1.0,) * ACTION_DIM, hold_dims=(3,),
                              state_names=("hand_x", "hand_y", "hand_z", "gripper"))

    def tasks(self) -> tuple[str, ...]:
        return MT50

    def resolve_task(self, name: str) -> str:
        return resolve_task(name)

    def instruction(self, task: str) -> str:
        return INSTRUCTIONS[resolve_task(task)]

    def make_env(self, task: str, render: bool = True, max_steps: int | None = None) -> MetaWorldEnv:
        return MetaWorldEnv(task, self.config, render=render, max_steps=max_steps)

    def expert(self):
        from vla_runtime.sim.metaworld.expert import MetaWorldExpert

        return MetaWorldExpert()

    def settings(self) -> dict:
        config = self.config
        return {"sim": "metaworld", "cameras": list(config.cameras), "image_size": config.image_size,
                "rotate_180": list(config.rotate_180), "goal_marker_radius": config.goal_marker_radius,
                "max_steps": {**config.max_steps, "default": config.default_max_steps}}

    def __repr__(self) -> str:
        return f"MetaWorldSuite({asdict(self.config)})"
