"""Redundancy-guided pruning of language-model layers (EfficientVLA).

Calibration feeds observations through the policy and measures, for every decoder layer l,
r_l = mean over tokens of cos(h_in_l, h_out_l): a layer whose output is nearly its input does little.
Applying removes the k layers with the highest r_l (optionally greedily: remove one, re-measure, ...).
The layers leave the model's layer list (so the KV cache and every loop over layers see the shorter
model) and come back, in place, on `remove()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vla_runtime.accel.method import AccelMethod, register_method
from vla_runtime.hooks import Handle
from vla_runtime.types import Observation, Policy


@dataclass
class LayerPruneConfig:
    num_layers: int = 2
    greedy: bool = False  # re-measure after every removal (k calibration passes instead of one)


def _measure(policy: Policy, observations: list[Observation]) -> list[float]:
    layers = policy.structure.require("language_model", "layer_prune").layers
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)

    def record(index: int):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            similarity = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            sums[index] += float(similarity.sum())
            counts[index] += similarity.numel()
        return hook

    handles = [layer.register_forward_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for obs in observations:
                policy.reset()
                policy.predict_chunk(obs)
    finally:
        for handle in handles:
            handle.remove()
    return [s / max(1, c) for s, c in zip(sums, counts, strict=True)]


def calibrate(policy: Policy, observations: list[Observation], config: LayerPruneConfig | None = None) -> dict:
    """-> {"method", "similarity" (per original layer), "order" (original indices, most redundant first)}."""
    config = config or LayerPruneConfig()
    if not observations:
        raise ValueError("layer_prune calibration needs at least one observation")
    similarity = _measure(policy, observations)
    if not config.greedy:
        order = sorted(range(len(similarity)), key=lambda i: -similarity[i])
        return {"method": "layer_prune", "similarity": similarity, "order": order, "greedy": False}
    order: list[int] = []
    remaining = list(range(len(similarity)))
    for _ in range(min(config.num_layers, len(remaining) - 1)):
        handle = _remove_layers(policy, order)
        try:
            current = _measure(policy, observations)  # indexed by the layers still present
        finally:
            handle.remove()
        survivors = [i for i in remaining if i not in order]
        order.append(survivors[max(range(len(current)), key=lambda j: current[j])])
    return {"method": "layer_prune", "similarity": similarity, "order": order, "greedy": True}


def _remove_layers(policy: Policy, indices: list[int]) -> Handle:
    lm = policy.structure.require("language_model", "layer_prune")
    layers, config = lm.layers, lm.config
    original = list(layers)
    original_count = config.num_hidden_layers
    original_types = list(getattr(config, "layer_types", None) or [])
    original_idx = [layer.self_attn.layer_idx for layer in original]
    keep = [i for i in range(len(original)) if i not in set(indices)]
    if not keep:
        raise ValueError("layer_prune would remove every layer of the language model")

    def shrink() -> None:
        del layers[:]  # in place: everything holding this ModuleList sees the shorter model
        layers.extend(original[i] for i in keep)
        for new_index, layer in enumerate(layers):
            layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the list
        config.num_hidden_layers = len(keep)
        if original_types:
            config.layer_types = [original_types[i] for i in keep]

    def restore() -> None:
        del layers[:]
        layers.extend(original)
        for layer, index in zip(original, original_idx, strict=True):
            layer.self_attn.layer_idx = index
        config.num_hidden_layers = original_count
        if original_types:
            config.layer_types = original_types

    shrink()
    return Handle("layer_prune", [restore], info={"removed": sorted(indices), "kept": keep})


def apply(policy: Policy, config: LayerPruneConfig, calibration: dict) -> Handle:
    if calibration.get("method") != "layer_prune":
        raise ValueError(f"Not a layer_prune calibration artifact: method {calibration.get('method')!r}")
    layers = policy.structure.require("language_model", "layer_prune").layers
    if len(calibration["similarity"]) != len(layers):
        raise ValueError(f"Calibration covers {len(calibration['similarity'])} layers, the model has {len(layers)}")
    if not 0 <= config.num_layers < len(layers):
        raise ValueError(f"num_layers must be in [0, {len(layers) - 1}], got {config.num_layers}")
    return _remove_layers(policy, list(calibration["order"][: config.num_layers]))


METHOD = register_method(AccelMethod(
    "layer_prune", LayerPruneConfig, apply, requires=("language_model",), order=10, calibrate=calibrate,
    needs_calibration=lambda config: config.num_layers > 0,
    stats=lambda info: {"removed_layers": info["removed"]}))
