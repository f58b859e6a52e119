"""The reference VLAs behind the `Policy` protocol, registered as ref_dit, ref_ar, ref_dit_large."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer

from vla_runtime.hooks import reset_hooks
from vla_runtime.policies.ref_vla.checkpoint import load_model
from vla_runtime.policies.ref_vla.configuration_ref_vla import LARGE_RANDOM_WEIGHTS, RefVLAConfig
from vla_runtime.policies.ref_vla.modeling_ref_vla import RefVLA
from vla_runtime.policies.ref_vla.processing_ref_vla import (
    Normalizer,
    images_to_tensor,
    tokenize,
    train_instruction_tokenizer,
)
from vla_runtime.policies.registry import register_policy, register_trainer, shipped_checkpoint
from vla_runtime.types import (
    ActionChunk,
    ARDecoder,
    DenoisingHead,
    HeadBlock,
    LanguageModel,
    Observation,
    PolicySpec,
    PolicyStructure,
    image_crop,
)

if TYPE_CHECKING:
    from vla_runtime.data.episodes import EpisodeStore
    from vla_runtime.sim.suite import Suite

TEXT_CACHE_SIZE = 256


class RefVLAPolicy:
    def __init__(self, model: RefVLA, normalizer: Normalizer, tokenizer: Tokenizer, noise_seed: int = 0,
                 num_threads: int | None = None, checkpoint_dir: Path | None = None, device: str = "cpu"):
        if num_threads:
            torch.set_num_threads(num_threads)
        # The model runs on `device`; normalisation, tokens and the noise generator stay on the CPU (the same
        # noise on every device), their tensors moved in and the actions moved out.
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"policy.device={device}, but torch {torch.__version__} sees no CUDA device")
        self.model = model.to(self.device).eval()
        self.config = config = model.config
        self.normalizer = normalizer
        self.tokenizer = tokenizer
        self.noise_seed = noise_seed
        self.generator = torch.Generator(device="cpu").manual_seed(noise_seed)
        # Instructions repeat: their tokens are cached, the most recent TEXT_CACHE_SIZE of them (a server meets any).
        self._text = functools.lru_cache(maxsize=TEXT_CACHE_SIZE)(self._tokenize)
        self.spec = PolicySpec(action_dim=config.action_dim, state_dim=config.state_dim, cameras=config.cameras,
                               image_size=(config.image_size, config.image_size), image_crop=config.image_crop,
                               chunk_size=config.chunk_size,
                               control_dt=config.control_dt, actions_per_chunk=config.actions_per_chunk,
                               rtc_max_delay=config.rtc_max_delay)
        lm = model.lm
        self.structure = PolicyStructure(
            vision_encoder=model.vision,
            preprocess_images=self.image_tensor,
            language_model=LanguageModel(module=lm, layers=lm.layers, rotary_emb=lm.rotary_emb, norm=lm.norm,
                                         config=lm.config, visual_token_span=lambda: model.visual_token_span),
            denoising_head=DenoisingHead(
                step=model.dit, steps=config.denoising_steps, condition=model.dit.condition,
                blocks=[HeadBlock({"attn": block.attn, "mlp": block.mlp}, block.adaln) for block in model.dit.blocks],
                actions_in=lambda actions: normalizer.action(torch.as_tensor(actions, dtype=torch.float32)),
            ) if config.head == "dit" else None,
            ar_decoder=ARDecoder(loop=model.decode_loop, num_tokens=config.num_action_tokens, forward=model.lm_step,
                                 embed_tokens=model.embed_action_tokens, logits=model.action_logits)
            if config.head == "ar" else None,
            weights=model,
            checkpoint_dir=checkpoint_dir,  # None: random weights
        )

    @classmethod
    def from_checkpoint(cls, directory: str | Path, **options) -> RefVLAPolicy:
        model, normalizer, tokenizer = load_model(directory)
        return cls(model, normalizer, tokenizer, checkpoint_dir=Path(directory), **options)

    def reset(self) -> None:
        # The same noise sequence every episode: evaluations and replays are reproducible.
        self.generator.manual_seed(self.noise_seed)
        reset_hooks(self.model)

    def _tokenize(self, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize(self.tokenizer, [instruction], self.config.max_text_tokens)

    def image_tensor(self, obs: Observation) -> torch.Tensor:
        """The cameras' images as the vision encoder's input, [1, K, 3, H, W] in [-1, 1]."""
        size = self.config.image_size
        for camera in self.config.cameras:
            image = obs.images.get(camera)
            if image is None or image.shape != (size, size, 3) or image.dtype != np.uint8:
                got = None if image is None else (image.shape, image.dtype)
                raise ValueError(f"Expected a uint8 {size}x{size}x3 image from camera '{camera}', got {got}")
        images = np.stack([obs.images[camera] for camera in self.config.cameras])
        return images_to_tensor(torch.from_numpy(images).permute(0, 3, 1, 2)[None])

    @torch.inference_mode()
    def predict_chunk(self, obs: Observation) -> ActionChunk:
        device = self.device
        images = self.image_tensor(obs).to(device)
        state = self.normalizer.state(torch.as_tensor(obs.state, dtype=torch.float32)[None]).to(device)
        text_ids, text_mask = (tensor.to(device) for tensor in self._text(obs.instruction))
        given = self._given(obs)
        actions = self.model.predict(images, text_ids, text_mask, state, self.generator,
                                     None if given is None else self.normalizer.action(torch.from_numpy(given))[None])
        actions = self.normalizer.unnormalize_action(actions.float().cpu())[0].numpy()
        if given is not None:
            actions[: len(given)] = given  # exactly what the robot runs meanwhile (no normalisation round trip)
        return ActionChunk(actions, t0=obs.timestamp, dt=self.config.control_dt)

    def _given(self, obs: Observation) -> np.ndarray | None:
        """Training-time RTC: the prefix's actions that run before this chunk arrives (its `delay`, at most what
        the head was trained to continue), or None (no prefix, or a policy not trained for it)."""
        if obs.prefix is None or not self.config.rtc_max_delay:
            return None
        count = min(obs.prefix.delay, len(obs.prefix.actions), self.config.rtc_max_delay)
        return np.asarray(obs.prefix.actions[:count], dtype=np.float32) if count else None


def _trained(name: str, checkpoint: str | None, options: dict) -> RefVLAPolicy:
    """`checkpoint`: a directory, or the name of one shipped in checkpoints/ (ref_dit_libero_object);
    None: the shipped `name`."""
    if checkpoint and not Path(checkpoint).exists() and shipped_checkpoint(checkpoint).is_dir():
        checkpoint = str(shipped_checkpoint(checkpoint))
    directory = Path(checkpoint) if checkpoint else shipped_checkpoint(name)
    if not checkpoint and not (directory / "model.safetensors").exists():
        raise FileNotFoundError(f"No trained {name} checkpoint ships with this install ({directory}). Train one "
                                f"(vla-train model={name} ...) and pass policy.checkpoint=<its output_dir>.")
    return RefVLAPolicy.from_checkpoint(directory, **options)


@register_policy("ref_dit")
def ref_dit(checkpoint: str | None = None, **options) -> RefVLAPolicy:
    return _trained("ref_dit", checkpoint, options)


@register_policy("ref_ar")
def ref_ar(checkpoint: str | None = None, **options) -> RefVLAPolicy:
    return _trained("ref_ar", checkpoint, options)


@register_trainer("ref_vla")
def train_on_dataset(settings: dict, model_options: dict) -> Path:
    """vla-train's trainer of ref_dit / ref_ar on a vla-collect dataset. The robot's dims, rate, cameras and image
    size follow the suite and settings the dataset was recorded with (`model_options` may still set them); the
    tokenizer knows every instruction of that suite, so a model trained on a subset still reads the others."""
    from vla_runtime.data.episodes import EpisodeStore
    from vla_runtime.data.torch_dataset import ActionChunkDataset
    from vla_runtime.policies.ref_vla.training import TrainConfig, train

    config = TrainConfig.from_settings(settings)
    torch.set_num_threads(config.num_threads)
    suite, robot = recorded_robot(EpisodeStore(config.dataset))
    if image_crop(model_options.get("image_crop", robot["image_crop"])) != robot["image_crop"]:
        raise ValueError(f"model.image_crop={model_options['image_crop']}, but {config.dataset} was rendered with crop "
                         f"{robot['image_crop']}: a model reads the images its data has")
    model_options = {**robot, **model_options}
    dataset = ActionChunkDataset(config.dataset, chunk_size=model_options.get("chunk_size", 8),
                                 max_idle_frames=config.max_idle_frames)
    return train(config, dataset, [suite.instruction(task) for task in suite.tasks()], model_options)


def recorded_robot(store: EpisodeStore) -> tuple[Suite, dict]:
    """The suite an `EpisodeStore`'s episodes were recorded in, and the model options that follow its robot: the
    suite's dims and rate, the cameras and image size of the data."""
    from vla_runtime.sim import make_suite

    recorded = store.meta["sim"]
    suite = make_suite(store.suite_name)
    spec = suite.spec
    return suite, {"control_dt": spec.control_dt, "state_dim": spec.state_dim, "action_dim": spec.action_dim,
                   "cameras": list(recorded.get("cameras", spec.cameras)),
                   "image_size": recorded.get("image_size", spec.image_size[0]),
                   "image_crop": image_crop(recorded.get("image_crop"))}


def identity_stats(config: RefVLAConfig) -> dict:
    return {"state": {"mean": [0.0] * config.state_dim, "std": [1.0] * config.state_dim},
            "action": {"min": [-1.0] * config.action_dim, "max": [1.0] * config.action_dim}}


def random_init_policy(instructions: list[str], seed: int = 0, policy_options: dict | None = None,
                       **config_options) -> RefVLAPolicy:
    """An untrained reference VLA (random weights): for speed measurements only."""
    torch.manual_seed(seed)
    tokenizer = train_instruction_tokenizer(instructions)
    config = RefVLAConfig(text_vocab_size=tokenizer.get_vocab_size(), **config_options)
    return RefVLAPolicy(RefVLA(config), Normalizer(identity_stats(config)), tokenizer, **(policy_options or {}))


@register_policy("ref_dit_large", needs_suite=True)
def ref_dit_large(suite, seed: int = 0, **options) -> RefVLAPolicy:
    """SmolVLA-scale architecture with RANDOM WEIGHTS: for speed benchmarks only, its actions mean nothing.
    Built for the suite's robot (cameras, image size, dims, rate) and instruction vocabulary."""
    spec = suite.spec
    shape = dict(cameras=spec.cameras, image_size=spec.image_size[0], image_crop=spec.image_crop,
                 state_dim=spec.state_dim, action_dim=spec.action_dim, control_dt=spec.control_dt)
    return random_init_policy([suite.instruction(task) for task in suite.tasks()], seed, options, head="dit",
                              **shape, **LARGE_RANDOM_WEIGHTS)
