"""vla-train: train a reference VLA (ref_dit or ref_ar) on a collected dataset; resumable."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vla_runtime.cli import CONFIG_PATH
from vla_runtime.cli.common import as_dict, friendly_errors, positive_int
from vla_runtime.data.torch_dataset import ActionChunkDataset
from vla_runtime.policies.ref_vla.checkpoint import load_model, load_train_state, save_model, save_train_state
from vla_runtime.policies.ref_vla.configuration_ref_vla import RefVLAConfig
from vla_runtime.policies.ref_vla.modeling_ref_vla import RefVLA
from vla_runtime.policies.ref_vla.processing_ref_vla import (
    Normalizer,
    images_to_tensor,
    random_shift,
    tokenize,
    train_instruction_tokenizer,
)
from vla_runtime.sim.metaworld_suite import INSTRUCTIONS


def learning_rate(step: int, cfg: DictConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


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


def train(cfg: DictConfig) -> Path:
    torch.set_num_threads(positive_int(cfg, "num_threads"))
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    model_options = as_dict(cfg.model)
    dataset = ActionChunkDataset(cfg.dataset, chunk_size=model_options.get("chunk_size", 8))
    resume = (out / "train_state.json").exists()
    if resume:
        model, normalizer, tokenizer = load_model(out)
    elif cfg.init_from:
        # Fine-tune a saved model with a fresh optimizer (e.g. a shipped checkpoint, which has no train state).
        model, normalizer, tokenizer = load_model(cfg.init_from)
    else:
        tokenizer = train_instruction_tokenizer(list(INSTRUCTIONS.values()))
        config = RefVLAConfig(**model_options, text_vocab_size=tokenizer.get_vocab_size())
        model, normalizer = RefVLA(config), Normalizer(dataset.stats())
    config = model.config
    camera = config.camera
    first = dataset.episodes[0].images.get(camera)
    if first is None or first.shape[1:] != (config.image_size, config.image_size, 3):
        raise ValueError(f"{cfg.dataset}: the model needs {config.image_size}x{config.image_size} images "
                         f"from camera '{camera}', the dataset has "
                         f"{ {c: f.shape[1:] for c, f in dataset.episodes[0].images.items()} }")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = load_train_state(out, optimizer)["step"] if resume else 0
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    instruction_tokens = {text: tokenize(tokenizer, [text], config.max_text_tokens) for text in INSTRUCTIONS.values()}

    def save() -> None:
        save_model(out, model, normalizer, tokenizer)
        save_train_state(out, optimizer, {"step": step, "dataset": str(cfg.dataset)})
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        plot_losses(log_path, out / "loss.png", f"{config.head} head, {millions:.1f} M parameters")

    generator = torch.Generator().manual_seed(cfg.seed + step)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        generator=generator)
    started = time.monotonic()
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {config.head}", unit="step")
    model.train()
    running = None
    while step < cfg.max_steps and time.monotonic() - started < 60 * cfg.max_minutes:
        for batch in loader:
            text_ids, text_mask = (torch.cat(parts) for parts in zip(
                *(instruction_tokens[text] for text in batch["instruction"]), strict=True))
            images = random_shift(batch["images"][camera], cfg.shift_pad, generator)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            loss = model.loss(images_to_tensor(images), text_ids, text_mask, normalizer.state(batch["state"]),
                              normalizer.action(batch["actions"]), batch["action_is_pad"],
                              cfg.diffusion_repeats)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update()
            bar.set_postfix(loss=f"{running:.4f}")
            if step % cfg.log_every_steps == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss.item(), "lr": learning_rate(step, cfg),
                                        "elapsed_s": time.monotonic() - started}) + "\n")
            if step % cfg.save_every_steps == 0:
                save()
            if step >= cfg.max_steps or time.monotonic() - started >= 60 * cfg.max_minutes:
                break
    bar.close()
    save()
    return out


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    out = train(cfg)
    print(f"checkpoint: {out} (loss curve: {out / 'loss.png'})")


if __name__ == "__main__":
    main()
