"""A toy suite and a toy policy family, registered from the test tree only, through the same entry points
a pip plug-in uses (vla_runtime_toy-0.1.dist-info/entry_points.txt, found when this folder is on sys.path).

Suite `toy`: a point robot on a plane reaching a goal; a 16x16 top camera shows the robot (red) and the
goal (green); the expert steers straight at the goal. Policy `toy_vla`: a small torch model with a vision
encoder and a flow-matching-style head of two blocks, declared in a PolicyStructure so that acceleration
methods (head_cache, action_reuse) work on it without knowing its code.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vla_runtime.evaluation.launchers import register_launcher
from vla_runtime.hooks import reset_hooks
from vla_runtime.policies import register_policy
from vla_runtime.sim import SeedRange, Suite, register_suite
from vla_runtime.types import (
    ActionChunk,
    DenoisingHead,
    HeadBlock,
    Observation,
    PolicySpec,
    PolicyStructure,
    RobotSpec,
)

GOALS = {"reach-left": (-0.6, 0.0), "reach-right": (0.6, 0.0)}
DT = 0.1


class ToyEnv:
    def __init__(self, task: str, image_size: int, max_steps: int, render: bool):
        self.task, self.instruction = task, f"reach the goal on the {task.split('-')[1]}"
        self.image_size, self.max_steps, self.dt, self.render_enabled = image_size, max_steps, DT, render
        self._steps, self.position, self.goal = 0, np.zeros(2), np.zeros(2)

    @property
    def measures(self) -> dict[str, bool]:
        """Success is its only measure."""
        return {}

    @property
    def steps(self) -> int:
        return self._steps

    def render(self, camera: str = "top") -> np.ndarray:
        if camera != "top":
            raise ValueError(f"Camera '{camera}' is not configured; configured: ('top',)")
        image = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        for point, channel in ((self.goal, 1), (self.position, 0)):
            row, col = ((np.clip(point, -1, 1) + 1) / 2 * (self.image_size - 1)).round().astype(int)
            image[row, col, channel] = 255
        return image

    def observe(self, render: bool | None = None) -> Observation:
        render = self.render_enabled if render is None else render
        return Observation(images={"top": self.render()} if render else {}, state=self.position.astype(np.float32),
                           instruction=self.instruction, timestamp=self._steps * DT,
                           privileged_state=np.concatenate([self.position, self.goal]))

    def reset(self, seed: int, render: bool | None = None) -> Observation:
        rng = np.random.default_rng(seed)
        self.position = rng.uniform(-0.2, 0.2, 2)
        self.goal = np.asarray(GOALS[self.task]) + rng.uniform(-0.2, 0.2, 2)
        self._steps = 0
        return self.observe(render)

    def step(self, action, render: bool | None = None):
        action = np.asarray(action, dtype=np.float64).reshape(2)
        self.position = np.clip(self.position + 0.1 * np.clip(action, -1, 1), -1, 1)
        self._steps += 1
        success = bool(np.linalg.norm(self.position - self.goal) < 0.1)
        return self.observe(render), float(success), success, self._steps >= self.max_steps, {}

    def close(self) -> None:
        pass

    def __enter__(self) -> ToyEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ToyExpert:
    spec = PolicySpec(action_dim=2, state_dim=2, control_dt=DT, privileged=True)
    structure = PolicyStructure()

    def reset(self) -> None:
        pass

    def predict_chunk(self, obs: Observation) -> ActionChunk:
        position, goal = obs.privileged_state[:2], obs.privileged_state[2:]
        return ActionChunk(np.clip(5 * (goal - position), -1, 1)[None], t0=obs.timestamp, dt=DT)


@register_suite("toy")
class ToySuite(Suite):
    name = "toy"
    task_sets = {"all": tuple(GOALS)}
    train_seeds, eval_seeds = SeedRange(0, 1000), SeedRange(5000, 1000)

    def __init__(self, cameras=("top",), image_size: int = 16, max_steps: int = 30):
        self.image_size, self.max_steps = image_size, max_steps
        self.spec = RobotSpec(action_dim=2, state_dim=2, cameras=tuple(cameras), image_size=(image_size, image_size),
                              control_dt=DT, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))

    def tasks(self) -> tuple[str, ...]:
        return tuple(GOALS)

    def resolve_task(self, name: str) -> str:
        if name not in GOALS:
            raise ValueError(f"Unknown toy task '{name}'. Valid task names: {', '.join(GOALS)}")
        return name

    def instruction(self, task: str) -> str:
        return ToyEnv(task, 1, 1, False).instruction

    def make_env(self, task: str, render: bool = True, max_steps: int | None = None) -> ToyEnv:
        return ToyEnv(self.resolve_task(task), self.image_size, max_steps or self.max_steps, render)

    def expert(self) -> ToyExpert:
        return ToyExpert()

    def settings(self) -> dict:
        return {"sim": "toy", "image_size": self.image_size}


class ToyStep(nn.Module):
    """One denoising step: the velocity of a noisy chunk given the image feature ("cognition")."""

    def __init__(self, dim: int, horizon: int):
        super().__init__()
        self.action_in, self.time_in, self.action_out = nn.Linear(2, dim), nn.Linear(1, dim), nn.Linear(dim, 2)
        self.attn = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                  for _ in range(2)])
        self.modulation = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])

    def condition(self, t: torch.Tensor, cognition: torch.Tensor) -> torch.Tensor:
        return cognition + self.time_in(t[:, None].float())

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, cognition: torch.Tensor) -> torch.Tensor:
        condition = self.condition(t, cognition)
        h = self.action_in(noisy)
        for attn, mlp, modulation in zip(self.attn, self.mlp, self.modulation, strict=True):
            h = h + attn(h) * modulation(condition)[:, None]
            h = h + mlp(h)
        return self.action_out(h)


class ToyVLA:
    def __init__(self, seed: int = 0, steps: int = 4, horizon: int = 4):
        torch.manual_seed(seed)
        dim = 32
        self.encoder = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4), nn.Flatten(2))  # 16x16 -> 16 tokens
        self.step = ToyStep(dim, horizon)
        self.steps, self.horizon = steps, horizon
        self.spec = PolicySpec(action_dim=2, state_dim=2, cameras=("top",), image_size=(16, 16), chunk_size=horizon,
                               control_dt=DT, actions_per_chunk=2)
        self.weights = nn.ModuleDict({"encoder": self.encoder, "step": self.step})
        self.structure = PolicyStructure(
            vision_encoder=self.encoder, preprocess_images=self.images,
            denoising_head=DenoisingHead(step=self.step, steps=steps, condition=self.step.condition, blocks=[
                HeadBlock({"attn": attn, "mlp": mlp}, modulation)
                for attn, mlp, modulation in zip(self.step.attn, self.step.mlp, self.step.modulation, strict=True)]),
            weights=self.weights)

    def images(self, obs: Observation) -> torch.Tensor:
        return torch.from_numpy(obs.images["top"]).permute(2, 0, 1)[None].float() / 255

    def reset(self) -> None:
        reset_hooks(self.weights)

    @torch.inference_mode()
    def predict_chunk(self, obs: Observation) -> ActionChunk:
        cognition = self.encoder(self.images(obs)).mean(-1) + torch.from_numpy(obs.state).repeat(16)[None]
        x = torch.zeros(1, self.horizon, 2)
        for step in range(self.steps):
            x = x + self.step(x, torch.full((1,), step / self.steps), cognition) / self.steps
        return ActionChunk(torch.tanh(x)[0].numpy(), t0=obs.timestamp, dt=DT)


@register_policy("toy_vla")
def toy_vla(seed: int = 0) -> ToyVLA:
    return ToyVLA(seed)


class ReversedSerialPool:
    """A toy launcher: one worker in this process, the jobs run last first (results may come in any order)."""

    def __init__(self, worker_cls: type, args: tuple):
        self.worker = worker_cls(*args)

    def imap_unordered(self, jobs):
        yield from (self.worker.run(job) for job in reversed(jobs))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.worker.close()


@register_launcher("toy_serial")
def toy_serial(worker_cls: type, args: tuple, workers: int, address: str | None = None) -> ReversedSerialPool:
    return ReversedSerialPool(worker_cls, args)
