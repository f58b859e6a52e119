"""What changed inside transformers 5.x that the runtime meets: lerobot 0.6 pins transformers < 5.6, the
rest of the runtime was built on 5.2x, and one environment must hold both.

transformers renamed the decoder's KV-cache argument and output field from `past_key_values` to `cache`:
code that passes or reads a language model's cache goes through `CACHE_ARG` / `output_cache`."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from typing import Any

from transformers import LlamaModel

CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The cache a decoder forward returned."""
    return getattr(output, CACHE_ARG)


# ...and renamed ViT's layer modules; a checkpoint saved under one layout loads under the other.
_VIT_LAYOUTS = [  # (transformers >= 5.2x, earlier), "{i}": the layer index
    ("layers.{i}.attention.q_proj.", "encoder.layer.{i}.attention.attention.query."),
    ("layers.{i}.attention.k_proj.", "encoder.layer.{i}.attention.attention.key."),
    ("layers.{i}.attention.v_proj.", "encoder.layer.{i}.attention.attention.value."),
    ("layers.{i}.attention.o_proj.", "encoder.layer.{i}.attention.output.dense."),
    ("layers.{i}.mlp.fc1.", "encoder.layer.{i}.intermediate.dense."),
    ("layers.{i}.mlp.fc2.", "encoder.layer.{i}.output.dense."),
    ("layers.{i}.layernorm_before.", "encoder.layer.{i}.layernorm_before."),
    ("layers.{i}.layernorm_after.", "encoder.layer.{i}.layernorm_after."),
]


def _rename(key: str, source: str, target: str) -> str:
    pattern = re.escape(source).replace(re.escape("{i}"), r"(\d+)")
    return re.sub(r"(?<=vit\.)" + pattern, lambda m: target.replace("{i}", m.group(1)), key)


def match_vit_layout(weights: dict[str, Any], expected: Iterable[str]) -> dict[str, Any]:
    """`weights` with the ViT keys renamed to the layout of `expected` (this transformers' model)."""
    expected = set(expected)
    if all(key in expected for key in weights):
        return weights
    old_layout = any(".vit.encoder.layer." in key for key in expected)
    renamed = {}
    for key, value in weights.items():
        for new, old in _VIT_LAYOUTS:
            key = _rename(key, new, old) if old_layout else _rename(key, old, new)
        renamed[key] = value
    return renamed
