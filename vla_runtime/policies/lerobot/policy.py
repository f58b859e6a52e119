"""Any LeRobot policy saved with `save_pretrained` (SmolVLA, pi0 / pi0.5, ACT, diffusion, ...) behind our
`Policy` protocol: `policy=lerobot policy.path=<folder or hub id>`.

The folder holds LeRobot's `config.json` + `model.safetensors` and its processor pipelines
(`policy_preprocessor.json` / `policy_postprocessor.json` with their normalisation stats); we run them as
LeRobot's own evaluation does: observation -> preprocessor -> `predict_action_chunk` -> postprocessor.
Two files of ours may sit beside them: `vla_runtime.json` (the control rate the policy was trained at,
written by our exporters and trainers; without it the policy runs at any rate) and `vlm/` (a SmolVLA's VLM
config and tokenizer, for checkpoints made offline: see `smolvlm.py`).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch

from vla_runtime.data.lerobot_format import IMAGE_KEY, require_lerobot
from vla_runtime.hooks import reset_hooks
from vla_runtime.policies.lerobot.structure import structure_of
from vla_runtime.policies.registry import register_policy, shipped_checkpoint
from vla_runtime.types import ActionChunk, Observation, PolicySpec

RUNTIME_META = "vla_runtime.json"
VLM_FOLDER = "vlm"


def spec_of(config, control_dt: float | None) -> PolicySpec:
    """Our PolicySpec from a LeRobot config: cameras are its `observation.images.<camera>` inputs."""
    cameras, sizes = [], set()
    for key, feature in config.input_features.items():
        if key.startswith(IMAGE_KEY):
            cameras.append(key[len(IMAGE_KEY):])
            sizes.add(tuple(feature.shape[1:]))  # LeRobot features are channel-first: (3, H, W)
    if len(sizes) > 1:
        raise ValueError(f"LeRobot policy inputs have cameras of different sizes {sorted(sizes)}; the runtime "
                         "gives every camera one size")
    state = config.input_features.get("observation.state")
    action = config.output_features.get("action")
    if action is None:
        raise ValueError(f"LeRobot policy has no 'action' output (outputs: {list(config.output_features)})")
    return PolicySpec(action_dim=int(action.shape[0]), state_dim=int(state.shape[0]) if state else 0,
                      cameras=tuple(cameras), image_size=sizes.pop() if sizes else None,
                      # Diffusion predicts a horizon and returns its n_action_steps: that is its chunk.
                      chunk_size=int(getattr(config, "chunk_size", None) or config.n_action_steps),
                      control_dt=control_dt, actions_per_chunk=int(config.n_action_steps))


class LeRobotPolicy:
    def __init__(self, policy, preprocessor, postprocessor, control_dt: float | None = None,
                 noise_seed: int = 0, checkpoint_dir: Path | None = None):
        self.config = policy.config
        self.device = torch.device(self.config.device or "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.config.device}, but torch {torch.__version__} sees no CUDA device")
        self.policy = policy.to(self.device).eval()
        history = getattr(self.config, "n_obs_steps", 1)
        if history != 1:
            # LeRobot's select_action sees every step and stacks the last n; this runtime asks a policy once
            # per chunk with the newest observation, so the history such a policy was trained on is not there.
            raise ValueError(f"This {self.config.type} policy reads the last {history} observations "
                             f"(n_obs_steps={history}); the runtime gives a policy one observation per chunk: "
                             "policies with n_obs_steps=1 only, for now")
        self.preprocessor, self.postprocessor = preprocessor, postprocessor
        self.spec = spec_of(self.config, control_dt)
        self.noise_seed = noise_seed
        # Flow-matching and diffusion policies take their initial noise as an argument: drawn from our own
        # generator. What they sample besides (DDPM's per-step noise; pi0, which takes no noise argument) comes
        # from torch's RNG, seeded per call from a second generator inside a fork of it (predict_chunk). So an
        # evaluation or replay is reproducible (reset = the same sequences) and the global RNG is left alone.
        self._takes_noise = "noise" in inspect.signature(policy.predict_action_chunk).parameters
        self.generator = torch.Generator(device="cpu").manual_seed(noise_seed)
        self.sampling_seeds = torch.Generator(device="cpu").manual_seed(noise_seed + 1)
        self.structure = structure_of(self, checkpoint_dir)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", control_hz: float | None = None,
                        noise_seed: int = 0, num_threads: int | None = None) -> LeRobotPolicy:
        PreTrainedConfig = require_lerobot("policy=lerobot", "lerobot.configs.policies").PreTrainedConfig
        factory = require_lerobot("policy=lerobot", "lerobot.policies.factory")
        if num_threads:
            torch.set_num_threads(num_threads)
        folder = Path(path)
        local = folder.is_dir()
        if local and not (folder / "config.json").exists():
            raise FileNotFoundError(f"policy.path={path}: no config.json there; a LeRobot policy folder is what "
                                    "save_pretrained writes (config.json, model.safetensors, policy_*processor.json)")
        try:
            config = PreTrainedConfig.from_pretrained(str(path))
        except Exception as exc:  # huggingface_hub / draccus errors of many kinds: say what was asked
            where = "a LeRobot policy folder" if local else "a local folder, and the hub could not give it"
            raise ValueError(f"policy.path={path}: not {where} ({type(exc).__name__}: {exc})") from exc
        config.device = device
        processor_overrides = {"device_processor": {"device": device}}
        if local and (folder / VLM_FOLDER / "config.json").exists():
            config.vlm_model_name = str(folder / VLM_FOLDER)
            processor_overrides["tokenizer_processor"] = {"tokenizer_name": config.vlm_model_name}
        policy = factory.get_policy_class(config.type).from_pretrained(str(path), config=config)
        preprocessor, postprocessor = factory.make_pre_post_processors(config, pretrained_path=str(path),
                                                                       preprocessor_overrides=processor_overrides)
        meta = json.loads((folder / RUNTIME_META).read_text()) if local and (folder / RUNTIME_META).exists() else {}
        control_dt = 1 / control_hz if control_hz else meta.get("control_dt")
        return cls(policy, preprocessor, postprocessor, control_dt=control_dt, noise_seed=noise_seed,
                   checkpoint_dir=folder if local else None)

    def reset(self) -> None:
        # The same noise sequences every episode: evaluations and replays are reproducible.
        self.generator.manual_seed(self.noise_seed)
        self.sampling_seeds.manual_seed(self.noise_seed + 1)
        self.policy.reset()
        reset_hooks(self.policy)

    def batch(self, obs: Observation) -> dict:
        """LeRobot's raw observation batch: images float [1, 3, H, W] in [0, 1], state [1, S], the task."""
        batch = {"task": [obs.instruction]}
        for camera in self.spec.cameras:
            image = obs.images.get(camera)
            want = (*self.spec.image_size, 3)
            if image is None or image.shape != want or image.dtype != np.uint8:
                got = None if image is None else (image.shape, image.dtype)
                raise ValueError(f"Expected a uint8 {want} image from camera '{camera}', got {got}")
            batch[f"{IMAGE_KEY}{camera}"] = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        if self.spec.state_dim:
            batch["observation.state"] = torch.as_tensor(obs.state, dtype=torch.float32)[None]
        return batch

    @torch.inference_mode()
    def predict_chunk(self, obs: Observation) -> ActionChunk:
        batch = self.preprocessor(self.batch(obs))
        if self.config.type == "diffusion" and batch.get("observation.state") is not None:
            # Called for a chunk directly, diffusion takes the state as [B, n_obs_steps, S] (its images get that
            # axis inside); n_obs_steps is 1 here.
            batch["observation.state"] = batch["observation.state"][:, None]
        options = {}
        if self._takes_noise:
            # The whole predicted sequence (diffusion: its horizon) over the model's action width (SmolVLA pads
            # to max_action_dim).
            steps = getattr(self.config, "chunk_size", None) or self.config.horizon
            width = getattr(self.config, "max_action_dim", None) or self.config.action_feature.shape[0]
            options["noise"] = torch.randn((1, steps, width), generator=self.generator).to(self.device)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.sampling_seeds))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            actions = self.postprocessor(self.policy.predict_action_chunk(batch, **options))
        actions = actions[0, :, : self.spec.action_dim].float().cpu().numpy()
        # dt 0 for a policy without a rate: the robot's clock alone times its actions (as for every policy).
        return ActionChunk(actions, t0=obs.timestamp, dt=self.spec.control_dt or 0.0)


@register_policy("lerobot")
def lerobot(path: str | None = None, device: str = "cpu", control_hz: float | None = None, noise_seed: int = 0,
            num_threads: int | None = None, checkpoint: str | None = None) -> LeRobotPolicy:
    """`checkpoint`: the same as `path`, under the name the other families and the control node use."""
    path = path or checkpoint
    if not path:
        raise ValueError("policy=lerobot needs policy.path=<a folder saved with save_pretrained, or a hub id>")
    if not Path(path).exists() and shipped_checkpoint(path).is_dir():  # a checkpoint shipped in checkpoints/
        path = str(shipped_checkpoint(path))
    return LeRobotPolicy.from_pretrained(path, device=device, control_hz=control_hz, noise_seed=noise_seed,
                                         num_threads=num_threads)


@register_policy("smolvla_random", needs_suite=True)
def smolvla_random(suite, size: str = "full", seed: int = 0, num_threads: int | None = None,
                   **config) -> LeRobotPolicy:
    """SmolVLA with RANDOM WEIGHTS, built for the suite's robot: for speed benchmarks only, its actions mean
    nothing. `full`: SmolVLM2-500M's shape as SmolVLA runs it (16 VLM layers, 512 px, 64 visual tokens per
    camera), SmolVLA's defaults (chunk 50, 10 flow steps); `config`: other SmolVLAConfig fields (`device=cuda`:
    built on the CPU, run there)."""
    import tempfile

    from vla_runtime.policies.lerobot.smolvlm import random_smolvla

    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    spec = suite.spec
    with tempfile.TemporaryDirectory() as folder:  # read while building: the tokenizer stays in memory
        parts = random_smolvla(Path(folder) / VLM_FOLDER, [suite.instruction(task) for task in suite.tasks()], size,
                               spec.cameras, spec.image_size, spec.state_dim, spec.action_dim, **config)
    return LeRobotPolicy(*parts, control_dt=spec.control_dt)


@register_policy("pi0_random", needs_suite=True)
def pi0_random(suite, kind: str = "pi0", size: str = "full", seed: int = 0, num_threads: int | None = None,
               **config) -> LeRobotPolicy:
    """pi0 (`kind=pi0`) or pi0.5 (`kind=pi05`) with RANDOM WEIGHTS, built for the suite's robot: for speed
    benchmarks and tests only. `full`: lerobot's shape (~3.3 B); `tiny`: seconds to build. `config`: other
    PI0Config / PI05Config fields (`device=cuda`: built on the CPU, run there). Built by patching lerobot
    internals (see paligemma.py)."""
    from vla_runtime.policies.lerobot.paligemma import random_pi

    if kind not in ("pi0", "pi05"):
        raise ValueError(f"Unknown pi0_random kind '{kind}'; choose pi0 or pi05")
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    spec = suite.spec
    parts = random_pi(kind, [suite.instruction(task) for task in suite.tasks()], size, spec.cameras, spec.image_size,
                      spec.state_dim, spec.action_dim, **config)
    return LeRobotPolicy(*parts, control_dt=spec.control_dt)
