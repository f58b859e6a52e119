"""The reference VLAs' training loop. Imports no simulator, no zarr and no hydra, so that it also runs
on a GPU machine from episodes held in memory (scripts/device_train.py); `vla-train` is its CLI."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm.auto import tqdm

from vla_runtime.data.torch_dataset import ActionChunkDataset
from vla_runtime.policies.ref_vla.checkpoint import (
    FINE_TUNE_FIELDS,
    load_model,
    load_train_state,
    save_model,
    save_train_state,
)
from vla_runtime.policies.ref_vla.configuration_ref_vla import RefVLAConfig
from vla_runtime.policies.ref_vla.modeling_ref_vla import RefVLA
from vla_runtime.policies.ref_vla.processing_ref_vla import (
    Normalizer,
    color_jitter,
    images_to_tensor,
    random_shift,
    tokenize,
    train_instruction_tokenizer,
)
from vla_runtime.types import image_crop


@dataclass(frozen=True)
class TrainConfig:
    """How a reference VLA is trained: configs/train.yaml holds the defaults (vla-train, scripts/device_train.py).

    Attributes:
        dataset: the episode dataset (what logs and the train state name).
        output_dir: where the checkpoint, train state, log and loss plot go; a run there is resumed.
        init_from: a checkpoint to start from (weights, stats, tokenizer; a fresh optimizer), or None.
        batch_size: chunks per step.
        lr, min_lr: the peak learning rate and the end of its cosine decay.
        weight_decay: AdamW's.
        warmup_steps: linear warm-up of the learning rate.
        max_steps, max_minutes: the budgets; the schedule follows whichever is nearer its end.
        save_every_steps, log_every_steps: checkpoint and log intervals.
        diffusion_repeats: noise draws per language-model pass (DiT head only).
        shift_pad: random-shift augmentation, pixels.
        color_jitter: brightness / contrast / saturation augmentation, each scaled by a factor in
            [1 - color_jitter, 1 + color_jitter] per image; 0: off.
        max_idle_frames: of each episode's idle tail (the robot holding still until a fixed episode length runs
            out) only the first this many frames are trained on; None: all (see `ActionChunkDataset`).
        early_frames, early_frame_weight: each episode's first `early_frames` frames are drawn `early_frame_weight`
            times as often as the others (sampling with replacement); 1: uniform, each sample once per epoch.
        seed: of the model's initialisation and the data order.
        num_threads: CPU threads for torch.
        device: auto (cuda when torch sees one), cpu, cuda, cuda:N.
        num_workers: DataLoader worker processes.
    """

    dataset: str
    output_dir: str
    init_from: str | None
    batch_size: int
    lr: float
    min_lr: float
    weight_decay: float
    warmup_steps: int
    max_steps: int
    max_minutes: float
    save_every_steps: int
    log_every_steps: int
    diffusion_repeats: int
    shift_pad: int
    color_jitter: float
    max_idle_frames: int | None
    early_frames: int
    early_frame_weight: float
    seed: int
    num_threads: int
    device: str
    num_workers: int

    def __post_init__(self) -> None:
        if not 0 <= self.color_jitter < 1:
            raise ValueError(f"color_jitter must be in [0, 1) (factors in [1 - x, 1 + x]), got {self.color_jitter}")
        if self.max_idle_frames is not None and self.max_idle_frames < 0:
            raise ValueError(f"max_idle_frames must be >= 0 or null (all), got {self.max_idle_frames}")
        if self.early_frames < 0 or self.early_frame_weight <= 0:
            raise ValueError(f"early_frames must be >= 0 and early_frame_weight > 0, got {self.early_frames} and "
                             f"{self.early_frame_weight}")
        if self.shift_pad < 0:
            raise ValueError(f"shift_pad must be >= 0 pixels, got {self.shift_pad}")

    @classmethod
    def from_settings(cls, settings: dict) -> TrainConfig:
        """From a flat dict of settings; an unknown or missing one is an error naming the known ones."""
        known = [f.name for f in fields(cls)]
        unknown, missing = sorted(set(settings) - set(known)), [name for name in known if name not in settings]
        if unknown or missing:
            raise ValueError(f"training settings: unknown {unknown}, missing {missing}; known: {', '.join(known)}")
        return cls(**settings)


def learning_rate(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine to `min_lr` as `progress` goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def plot_losses(log_path: Path, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} asked for, but torch {torch.__version__} sees no CUDA device")
    return torch.device(name)


def train(cfg: TrainConfig, dataset: ActionChunkDataset, instructions: Iterable[str], model_options: dict) -> Path:
    """Train (or resume, when `cfg.output_dir` holds a train state) a reference VLA.

    The learning-rate schedule runs on whichever budget is nearer its end, `max_steps` or
    `max_minutes` (summed over resumed runs), so a run cut by the clock still ends on a low rate.
    """
    torch.manual_seed(cfg.seed)
    device = resolve_device(str(cfg.device))
    out = Path(cfg.output_dir)
    resume = (out / "train_state.json").exists()
    instructions = sorted(set(instructions))
    if resume:
        model, normalizer, tokenizer = load_model(out)
    elif cfg.init_from:
        # Fine-tune a saved model with a fresh optimizer (e.g. a shipped checkpoint, which has no train state),
        # for another chunk length when the model options ask for one.
        saved = RefVLAConfig.from_json(Path(cfg.init_from) / "config.json")
        changes = {name: model_options[name] for name in FINE_TUNE_FIELDS
                   if name in model_options and model_options[name] != getattr(saved, name)}
        model, normalizer, tokenizer = load_model(cfg.init_from, changes)
    else:
        tokenizer = train_instruction_tokenizer(instructions)
        config = RefVLAConfig(**model_options, text_vocab_size=tokenizer.get_vocab_size())
        model, normalizer = RefVLA(config), Normalizer(dataset.stats())
    config = model.config
    if config.image_crop != image_crop(model_options.get("image_crop")):
        raise ValueError(f"{cfg.dataset}: its images show crop {model_options.get('image_crop')} of the camera frame, "
                         f"the model resumed from {out} reads crop {config.image_crop}")
    first = dataset.episodes[0].images
    for camera in config.cameras:
        if camera not in first or first[camera].shape[1:] != (config.image_size, config.image_size, 3):
            raise ValueError(f"{cfg.dataset}: the model needs {config.image_size}x{config.image_size} images "
                             f"from camera '{camera}', the dataset has "
                             f"{ {c: f.shape[1:] for c, f in first.items()} }")
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = load_train_state(out, optimizer) if resume else {}
    step, elapsed_before = state.get("step", 0), state.get("elapsed_s", 0.0)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    if resume and log_path.exists():  # a run stopped between saves logged steps the resume will train again
        kept = [line for line in log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        log_path.write_text("".join(f"{line}\n" for line in kept))
    instruction_tokens = {text: tokenize(tokenizer, [text], config.max_text_tokens) for text in instructions}
    started = time.monotonic()

    def elapsed_s() -> float:
        return elapsed_before + time.monotonic() - started

    def progress() -> float:
        return max(step / cfg.max_steps, elapsed_s() / (60 * cfg.max_minutes))

    def save() -> None:
        save_model(out, model, normalizer, tokenizer)
        save_train_state(out, optimizer, {"step": step, "elapsed_s": elapsed_s(), "dataset": str(cfg.dataset),
                                          "device": str(device)})
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        plot_losses(log_path, out / "loss.png", f"{config.head} head, {millions:.1f} M parameters")

    generator = torch.Generator().manual_seed(cfg.seed + step)
    sampler = None if cfg.early_frame_weight == 1 else WeightedRandomSampler(
        dataset.early_frame_weights(cfg.early_frames, cfg.early_frame_weight), len(dataset), generator=generator)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        generator=generator, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                        pin_memory=device.type == "cuda")
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {config.head} on {device}", unit="step")
    model.train()
    running = None
    while progress() < 1:
        for batch in loader:
            text_ids, text_mask = (torch.cat(parts).to(device) for parts in zip(
                *(instruction_tokens[text] for text in batch["instruction"]), strict=True))
            images = torch.stack([color_jitter(random_shift(batch["images"][camera], cfg.shift_pad, generator),
                                               cfg.color_jitter, generator) for camera in config.cameras], dim=1)
            lr = learning_rate(progress(), step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = model.loss(images_to_tensor(images.to(device, non_blocking=True)), text_ids, text_mask,
                              normalizer.state(batch["state"]).to(device),
                              normalizer.action(batch["actions"]).to(device),
                              batch["action_is_pad"].to(device), cfg.diffusion_repeats)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update()
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.1e}")
            if step % cfg.log_every_steps == 0:
                bar.total = round(step / progress())  # the steps the nearer budget allows, at this pace
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss.item(), "lr": lr,
                                        "elapsed_s": elapsed_s()}) + "\n")
            if step % cfg.save_every_steps == 0:
                save()
            if progress() >= 1:
                break
    bar.close()
    save()
    return out
