"""Redundancy-guided pruning of language-model layers (EfficientVLA).

Calibration feeds observations through the policy and measures, for every decoder layer l,
r_l = mean over tokens of cos(h_in_l, h_out_l): a layer whose output is nearly its input does little.
h_in_l is what enters layer l's `input_layernorm` and h_out_l what enters the next one's (the final norm
after the last layer), so policies that drive their layers without calling them (SmolVLA) are measured too.
Applying removes the k layers with the highest r_l (optionally greedily: remove one, re-measure, ...); a
policy whose layers must leave in aligned groups (`LanguageModel.prune_group`) loses the groups with the
highest mean r_l. The layers leave the model's layer list (so the KV cache and every loop over layers see
the shorter model) and come back, in place, on `remove()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vla_runtime.accel.method import AccelMethod, Phase, Suggest, register_method
from vla_runtime.hooks import Handle, drop_layers
from vla_runtime.types import Observation, Policy


@dataclass
class LayerPruneConfig:
    num_layers: int = 2
    greedy: bool = False  # re-measure after every removal (k calibration passes instead of one)


def _measure(policy: Policy, observations: list[Observation]) -> list[float]:
    lm = policy.structure.require("language_model", "layer_prune")
    layers = lm.layers
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)
    latest: list = [None] * len(layers)  # what last entered each layer

    def record(index: int):
        def hook(module, args):
            hidden = args[0]
            previous = latest[index - 1] if index > 0 else None
            if previous is not None and previous.shape == hidden.shape:  # the same pass through the layers
                similarity = F.cosine_similarity(previous.float(), hidden.float(), dim=-1)
                sums[index - 1] += float(similarity.sum())
                counts[index - 1] += similarity.numel()
            if index < len(layers):
                latest[index] = hidden
        return hook

    inputs = [layer.input_layernorm for layer in layers] + [lm.norm]
    handles = [module.register_forward_pre_hook(record(i)) for i, module in enumerate(inputs)]
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
    keep = [i for i in range(len(lm.layers)) if i not in set(indices)]
    if lm.remove_layers is not None:
        undo = lm.remove_layers(sorted(indices))
    else:
        undo = drop_layers(lm.layers, lm.config, keep)
    removed = sorted(indices)
    return Handle("layer_prune", [undo], info={"removed": removed, "kept": keep},
                  stats=lambda: {"removed_layers": removed})


def _grouped_order(similarity: list[float], group: int) -> list[int]:
    """Layer indices, whole aligned groups of `group` at a time, the group of highest mean similarity first."""
    starts = range(0, len(similarity) - group + 1, group)
    ranked = sorted(starts, key=lambda start: -sum(similarity[start:start + group]) / group)
    return [start + offset for start in ranked for offset in range(group)]


def apply(policy: Policy, config: LayerPruneConfig, calibration: dict) -> Handle:
    if calibration.get("method") != "layer_prune":
        raise ValueError(f"Not a layer_prune calibration artifact: method {calibration.get('method')!r}")
    lm = policy.structure.require("language_model", "layer_prune")
    layers, group = lm.layers, lm.prune_group
    if len(calibration["similarity"]) != len(layers):
        raise ValueError(f"Calibration covers {len(calibration['similarity'])} layers, the model has {len(layers)}")
    if not 0 <= config.num_layers < len(layers):
        raise ValueError(f"num_layers must be in [0, {len(layers) - 1}], got {config.num_layers}")
    if config.num_layers % group:
        raise ValueError(f"This policy's layers leave in aligned groups of {group} (its attention pattern repeats "
                         f"every {group} layers): num_layers must be a multiple of {group}, got {config.num_layers}")
    if group > 1 and calibration.get("greedy"):
        raise ValueError("layer_prune greedy calibration removes single layers; this policy removes groups of "
                         f"{group}: calibrate with greedy=false")
    order = calibration["order"] if group == 1 else _grouped_order(calibration["similarity"], group)
    return _remove_layers(policy, list(order[: config.num_layers]))


def _search(suggest: Suggest, structure) -> dict:
    """Up to a third of the layers, in the policy's groups."""
    lm = structure.language_model
    group = lm.prune_group
    most = max(group, len(lm.layers) // 3 // group * group)
    return {"num_layers": suggest.suggest_int("num_layers", group, most, step=group)}


METHOD = register_method(AccelMethod(
    "layer_prune", LayerPruneConfig, apply, requires=("language_model",), phase=Phase.LAYERS, calibrate=calibrate,
    needs_calibration=lambda config: config.num_layers > 0, search=_search,
))
