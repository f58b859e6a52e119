"""Checkpoints of the reference VLAs: safetensors + json only (nothing is ever unpickled).

A checkpoint directory holds config.json, model.safetensors, stats.json (normalisation) and
tokenizer.json; a training run's directory adds optimizer.safetensors + train_state.json to resume.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from vla_runtime.policies.ref_vla.configuration_ref_vla import RefVLAConfig
from vla_runtime.policies.ref_vla.modeling_ref_vla import RefVLA
from vla_runtime.policies.ref_vla.processing_ref_vla import Normalizer
from vla_runtime.transformers_compat import match_vit_layout

MODEL_FILES = ("config.json", "model.safetensors", "stats.json", "tokenizer.json")


class CheckpointError(ValueError):
    pass


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def save_model(directory: Path, model: RefVLA, normalizer: Normalizer, tokenizer: Tokenizer) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json(directory / "config.json")
    # Tied or shared tensors would be refused by safetensors; contiguous copies of every entry.
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    normalizer.save(directory / "stats.json")
    tokenizer.save(str(directory / "tokenizer.json"))


# What a fine-tuning run may change in a saved model's config (`load_model(..., changes=)`): the chunk,
# training-time RTC (a head that takes a given prefix: its flag embedding starts at zero, the head unchanged), and
# the crop of the camera frame its images show (the same network on a new view).
FINE_TUNE_FIELDS = ("chunk_size", "actions_per_chunk", "rtc_max_delay", "image_crop")


def _resample_positions(position: torch.Tensor, length: int) -> torch.Tensor:
    """A DiT's learned position embedding [1, H, D] resampled (linearly, along time) to `length` steps."""
    return torch.nn.functional.interpolate(position.transpose(1, 2), size=length, mode="linear",
                                           align_corners=True).transpose(1, 2).contiguous()


def load_model(directory: str | Path, changes: dict | None = None) -> tuple[RefVLA, Normalizer, Tokenizer]:
    """`changes`: new values of FINE_TUNE_FIELDS, to fine-tune a saved model for another chunk length (the DiT's
    position embedding is resampled to it; nothing else depends on the chunk) or for training-time RTC."""
    directory = Path(directory)
    missing = [name for name in MODEL_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"Checkpoint {directory} is missing {', '.join(missing)}")
    config = RefVLAConfig.from_json(directory / "config.json")
    if changes:
        unknown = sorted(set(changes) - set(FINE_TUNE_FIELDS))
        if unknown:
            raise CheckpointError(f"Cannot change {', '.join(unknown)} of the saved model {directory}: only "
                                  f"{', '.join(FINE_TUNE_FIELDS)} can differ from its config.json")
        config = dataclasses.replace(config, **changes)
    model = RefVLA(config)
    expected = model.state_dict()
    weights = match_vit_layout(_load_tensors(directory / "model.safetensors"), expected)
    if "dit.position" in weights and weights["dit.position"].shape[1] != config.chunk_size:
        weights["dit.position"] = _resample_positions(weights["dit.position"], config.chunk_size)
    if changes and changes.get("rtc_max_delay") and "dit.given" not in weights:
        weights["dit.given"] = expected["dit.given"]  # zeros: the head as it was until it learns the flag
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [f"{k}: {tuple(weights[k].shape)} in file, {tuple(v.shape)} in model"
                 for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{directory / 'model.safetensors'} does not match config.json: {shown}")
    model.load_state_dict(weights)
    normalizer = Normalizer.load(directory / "stats.json")
    try:
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{directory / 'tokenizer.json'} is not a tokenizer file: {exc}") from exc
    return model, normalizer, tokenizer


def save_train_state(directory: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Optimizer tensors flattened into safetensors; step counters and hyper-parameters into json."""
    tensors, scalars = {}, {}
    for index, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{index}.{key}"] = value.cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = float(value)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    groups = optimizer.state_dict()["param_groups"]
    (directory / "train_state.json").write_text(json.dumps(
        {**state, "optimizer_scalars": scalars, "param_groups": groups}, indent=2) + "\n")


def load_train_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict:
    state = json.loads((directory / "train_state.json").read_text())
    tensors = _load_tensors(directory / "optimizer.safetensors")
    per_param: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = value
    for name, value in state.pop("optimizer_scalars").items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = torch.tensor(value)
    optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state
