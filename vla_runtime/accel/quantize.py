"""Weight quantization of a policy's linear layers, post-training and calibration-free (dynamic or weight-only
schemes: nothing to calibrate, so no artifact).

Each `nn.Linear` under the chosen parts is swapped, in its parent, for a quantized copy; `remove()` puts the
float originals back (they are kept, untouched: exact). A linear that the policy's structure names itself (a
hook point) keeps its float weights, so methods applied later still find the module they hook.

Schemes:
- `dynamic_int8`: torch's own dynamically quantized linear (int8 weights per output channel, activations
  quantized per call; the fbgemm / x86 kernels). CPU only. torch marks these modules deprecated in favour of
  torchao, but torchao's int8 tensor subclasses run eagerly on a CPU at a fraction of the float speed (ref_dit,
  2 threads: 45 ms weight-only and 113 ms dynamic against 36 ms float; torch's 27 ms), so this is the CPU scheme.
- `int8_weight_only`, `int8_dynamic` (int8 activations too), `fp8` (float8 weights and activations, CUDA with
  compute capability >= 8.9): torchao's `quantize_` configs, meant for a GPU and `exec=compile`.
`torch.utils.flop_counter` counts a dynamic int8 linear's multiply-adds like a float linear's (2 per
multiply-add), registered here: the FLOPs column of a quantized profile counts operations, not their width.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from vla_runtime.accel.method import AccelMethod, Phase, Suggest, register_method
from vla_runtime.execution import weights_device
from vla_runtime.hooks import Handle
from vla_runtime.plugins import did_you_mean
from vla_runtime.types import Policy, PolicyStructure

SCHEMES = ("dynamic_int8", "int8_weight_only", "int8_dynamic", "fp8")
PARTS = {"language_model": "language_model", "head": "denoising_head", "vision": "vision_encoder"}  # -> hook point


@dataclass
class QuantizeConfig:
    """
    Attributes:
        scheme: one of SCHEMES (see the module's docstring).
        parts: which parts' linear layers: `language_model`, `head` (the action head's denoising step, or its
            blocks where that step module also runs the prefix), `vision` (the vision encoder).
    """

    scheme: str = "dynamic_int8"
    parts: tuple[str, ...] = ("language_model", "head")

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"Unknown quantize scheme '{self.scheme}'{did_you_mean(self.scheme, SCHEMES)}; "
                             f"choose one of {', '.join(SCHEMES)}")
        self.parts = tuple(self.parts)
        unknown = [part for part in self.parts if part not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"quantize parts must be a non-empty list of {', '.join(PARTS)}, got {list(self.parts)}")


def _roots(structure: PolicyStructure, part: str) -> list[nn.Module]:
    point = structure.require(PARTS[part], f"quantize parts=[{part}]")
    if part == "language_model":
        return [point.module if point.module is not None else point.layers]
    if part == "head":
        if point.is_prefix is None:
            return [point.step]
        return [module for block in point.blocks for module in (*block.branches.values(), block.modulation)
                if module is not None]
    return [point]


def _named_modules(value) -> list[nn.Module]:
    """Every module a structure (or a field of it) names."""
    if isinstance(value, nn.Module):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [m for item in dataclasses.fields(value) for m in _named_modules(getattr(value, item.name))]
    if isinstance(value, (list, tuple)):
        return [m for item in value for m in _named_modules(item)]
    if isinstance(value, dict):
        return [m for item in value.values() for m in _named_modules(item)]
    return []


def _targets(structure: PolicyStructure, parts: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every plain `nn.Linear` under the parts, each once."""
    protected = {id(module) for module in _named_modules(structure)}
    seen: set[int] = set()
    targets = []
    for part in parts:
        for root in _roots(structure, part):
            for parent in root.modules():
                for name, child in parent.named_children():
                    # Exactly nn.Linear: a subclass (MultiheadAttention's out_proj) may be read by weight.
                    if type(child) is nn.Linear and id(child) not in protected and id(child) not in seen:
                        seen.add(id(child))
                        targets.append((parent, name, child))
    return targets


class _Int8Linear(nn.Module):
    """torch's dynamic int8 linear where a float one was. Its `weight` is an empty tensor of the float weight's
    dtype and device, for the code that reads only those (SmolVLA's and pi0's layers cast their activations to
    `q_proj.weight.dtype`); torch's module has a `weight()` method there."""

    def __init__(self, quantized: nn.Module, linear: nn.Linear):
        super().__init__()
        self.quantized = quantized
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.empty(0, dtype=linear.weight.dtype, device=linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x)


def _quantizer(scheme: str):
    if scheme == "dynamic_int8":
        def dynamic(linear: nn.Linear) -> nn.Module:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's deprecation notice, read in the docstring
                wrapper = torch.ao.quantization.quantize_dynamic(
                    nn.Sequential(linear), {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                    dtype=torch.qint8, inplace=False)
            return _Int8Linear(wrapper[0], linear)
        return dynamic
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as exc:
        raise ValueError(f"quantize scheme={scheme} needs torchao (pip install torchao): {exc}") from exc
    config = {"int8_weight_only": Int8WeightOnlyConfig, "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
              "fp8": Float8DynamicActivationFloat8WeightConfig}[scheme]()

    def torchao(linear: nn.Linear) -> nn.Module:
        wrapper = nn.Sequential(copy.deepcopy(linear))
        quantize_(wrapper, config)
        return wrapper[0]
    return torchao


@register_flop_formula(torch.ops.quantized.linear_dynamic)
def _int8_linear_flops(input_shape, packed, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(input_shape) * out_shape[-1]


def _unsupported(structure: PolicyStructure, config: QuantizeConfig) -> str | None:
    missing = [part for part in config.parts if structure.missing([PARTS[part]])]
    if missing:
        return f"it has no {', '.join(missing)} to quantize (it declares: {', '.join(structure.available())})"
    device = weights_device(structure)
    if config.scheme == "dynamic_int8" and device.type != "cpu":
        return f"scheme dynamic_int8 runs on a CPU and the policy is on {device} (use int8_weight_only or fp8)"
    if config.scheme == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        return "scheme fp8 needs a CUDA device of compute capability 8.9 or newer"
    return None


def apply(policy: Policy, config: QuantizeConfig, calibration: dict | None = None) -> Handle:
    why = _unsupported(policy.structure, config)
    if why:
        raise ValueError(f"quantize cannot run on this policy: {why}")
    quantized = _quantizer(config.scheme)
    targets = _targets(policy.structure, config.parts)
    swapped = []
    try:
        for parent, name, linear in targets:
            setattr(parent, name, quantized(linear))
            swapped.append((parent, name, linear))
    except BaseException:
        for parent, name, linear in swapped:
            setattr(parent, name, linear)
        raise
    undo = [lambda parent=parent, name=name, linear=linear: setattr(parent, name, linear)
            for parent, name, linear in swapped]
    float_weights = sum(linear.weight.numel() for _, _, linear in swapped)
    return Handle("quantize", undo, info={"layers": [f"{type(p).__name__}.{n}" for p, n, _ in swapped]},
                  stats=lambda: {"quantized_layers": len(swapped), "quantized_weights": float_weights})


def _search(suggest: Suggest, structure: PolicyStructure) -> dict:
    """torch's dynamic int8 (the CPU scheme) on the language model, the head, or both."""
    parts = suggest.suggest_categorical("parts", ["language_model", "head", "language_model+head"])
    return {"scheme": "dynamic_int8", "parts": parts.split("+")}


METHOD = register_method(AccelMethod(
    "quantize", QuantizeConfig, apply, requires=(), phase=Phase.WEIGHTS, unsupported=_unsupported, search=_search))
