"""Execution backends: how a policy's hot paths run, after the acceleration methods changed what they compute.

- `eager`: as written.
- `compile`: `torch.compile` (inductor) of the policy's hot paths (`PolicyStructure.hot_paths`: by default its
  vision encoder, language model and one denoising step), built from the hooked model, beneath each hot path's
  own hooks (they stay Python around the compiled forward). The hooks inside a hot path are traced: their
  state becomes guards and graph inputs (a head cache compiles one graph per denoising step). Where a hot
  path's own hook replaces its forward (token selection's loop over the LM's layers, VLA-Cache's partial
  pass), its children are compiled too, and the hook's data-dependent control flow stays Python
  (`compiled_units` names what was compiled).
- `cuda_graphs`: the same units compiled with `mode="reduce-overhead"`: inductor captures them as CUDA graphs
  with static input buffers. A CUDA device only.
`dtype` (bf16 / fp16) swaps the policy's weights for half-precision copies and runs its `predict_chunk` under
`torch.autocast` to that dtype, so the policy's own float32 glue (inputs, noise, the Euler loop) meets them where
the matmuls and convolutions are; the float32 originals stay parked beside them, and `remove()` swaps them back
exactly. Any device (a CPU runs bf16 too, slowly: the rehearsal of the GPU table uses it); a GPU is where it pays.

Compilation is lazy: the first calls with each input shape compile. `Accelerator.warm_up` makes those calls on
the calibration frames, before episodes (vla-eval) or the control loop (the node, every profile of its
ladder); vla-bench times the warm-up apart from latency. Later calls reuse the graphs while the guards hold:
`CompileStats` counts the frames compiled, and a steady profile compiles nothing after its warm-up (tested).
Applying a profile removes the backend first and re-applies it over the new hooks; torch keeps each compiled
code's graphs, so a profile that was warmed up before compiles nothing when the governor comes back to it.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from vla_runtime.hooks import Handle, HookRegistry, ModelHook
from vla_runtime.plugins import did_you_mean
from vla_runtime.types import Policy, PolicyStructure

BACKENDS = ("eager", "compile", "cuda_graphs")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class ExecConfig:
    backend: str = "eager"
    mode: str | None = None  # torch.compile mode; None: "default" (compile), "reduce-overhead" (cuda_graphs)
    dtype: str | None = None  # None: the weights' own; bf16 | fp16 (CUDA only)
    dynamic: bool | None = False  # torch.compile's `dynamic`: static shapes per profile by default
    # Inductor's weight freezing (constant-folded, pre-packed weights); with `mode` set, the mode's own options
    # instead (torch takes one or the other). Off by default: on SmolVLA it bought nothing measurable (1.90x vs
    # 1.93x at 2 threads, 1.70x vs 1.78x at 1; benchmarks/accel/smolvla_mt10_compile_*threads).
    freezing: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown execution backend '{self.backend}'{did_you_mean(self.backend, BACKENDS)}; "
                             f"choose one of {', '.join(BACKENDS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"Unknown dtype '{self.dtype}'{did_you_mean(self.dtype, DTYPES)}; "
                             f"choose one of {', '.join(DTYPES)} (or none)")

    @property
    def changes_nothing(self) -> bool:
        """Plain eager in the weights' own dtype: nothing to apply."""
        return self.backend == "eager" and not self.dtype

    @property
    def compile_mode(self) -> str:
        return self.mode or ("reduce-overhead" if self.backend == "cuda_graphs" else "default")

    @property
    def label(self) -> str:
        if self.backend == "eager":
            return "eager" + (f"-{self.dtype}" if self.dtype else "")
        tuning = f"-{self.mode}" if self.mode else ("-frozen" if self.freezing else "")
        return self.backend + tuning + (f"-{self.dtype}" if self.dtype else "") + ("-dynamic" if self.dynamic else "")


def exec_config(spec: str | dict | ExecConfig | None) -> ExecConfig:
    """`exec=compile` or `exec={backend: compile, mode: max-autotune}` as the CLIs take it."""
    if spec is None or isinstance(spec, ExecConfig):
        return spec or ExecConfig()
    return ExecConfig(backend=spec) if isinstance(spec, str) else ExecConfig(**spec)


class CompileStats:
    """What torch.compile did, process-wide (dynamo's own counters)."""

    @staticmethod
    def frames() -> int:
        """Frames compiled."""
        from torch._dynamo.utils import counters

        return int(counters["frames"]["ok"])

    @staticmethod
    def fallbacks() -> int:
        """Calls that hit the recompile limit and ran eager instead: a compiled unit that keeps recompiling
        (a guard on something that changes every call) ends there, silently but for this count."""
        from torch._dynamo.utils import counters

        return int(sum(count for reason, count in counters["unimplemented"].items() if "recompile limit" in reason))


def weights_device(structure: PolicyStructure) -> torch.device:
    """Where a policy's weights are (the CPU for a policy that declares none)."""
    weights = structure.weights
    parameter = next(weights.parameters(), None) if weights is not None else None
    return parameter.device if parameter is not None else torch.device("cpu")


def hot_paths(policy: Policy) -> list[nn.Module]:
    structure = policy.structure
    if structure.hot_paths:
        return list(structure.hot_paths)
    lm, head = structure.language_model, structure.denoising_head
    candidates = [structure.vision_encoder, lm.module if lm else None, head.step if head else None]
    return [module for module in candidates if module is not None]


def _replaces_forward(module: nn.Module) -> bool:
    """Whether one of `module`'s hooks replaces its forward (and may call its children itself)."""
    registry = HookRegistry.find(module)
    return registry is not None and any(type(hook).new_forward is not ModelHook.new_forward and not hook.calls_through
                                        for hook in registry.hooks.values())


def compile_units(module: nn.Module, name: str = "") -> list[tuple[str, nn.Module]]:
    """What to compile for a hot path, as (name, module): the module itself, beneath its own hooks (the hooks
    inside it are traced: their state, such as a head cache's step, becomes guards and graph inputs), and where
    one of its own hooks replaces its forward (token selection's loop over the LM's layers), its children too,
    recursively: the hook may call them instead of the compiled forward."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # containers are not called: their elements are
        return [unit for child_name, child in module.named_children()
                for unit in compile_units(child, f"{name}.{child_name}" if name else child_name)]
    units = [(name, module)]
    if _replaces_forward(module):
        for child_name, child in module.named_children():
            units += compile_units(child, f"{name}.{child_name}" if name else child_name)
    return units


@functools.lru_cache(maxsize=256)
def _code_copy(code: types.CodeType, config: ExecConfig) -> types.CodeType:
    """One copy of `code` per backend config, the most recent 256 kept (an evicted one is copied, and compiled,
    again when used again)."""
    return code.replace()


def _own_code(forward, config: ExecConfig):
    """`forward` (a module's class forward, bound) on a copy of its code, one copy per backend config. torch
    keeps compiled graphs per code object and matches them by guards alone, so graphs that other inductor
    options built (freezing on or off) would otherwise be reused silently."""
    func = forward.__func__
    code = _code_copy(func.__code__, config)
    copy = types.FunctionType(code, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy.__get__(forward.__self__)


def _compile_in_place(module: nn.Module, compile_fn: Callable, config: ExecConfig) -> Callable[[], None]:
    """Compiles `module`'s forward beneath its hooks (hooks stay Python around it); returns the undo."""
    registry = HookRegistry.find(module)
    if registry is None:
        module.forward = compile_fn(_own_code(type(module).forward.__get__(module), config))

        def undo() -> None:
            module.__dict__.pop("forward", None)
    else:
        original = registry.original_forward
        registry.set_original_forward(compile_fn(_own_code(original, config)))

        def undo() -> None:
            registry.set_original_forward(original)

    return undo


def _wrap_predict_chunk(policy: Policy, around: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Replaces the policy's `predict_chunk` with `around(predict_chunk)`; returns the undo."""
    before = vars(policy).get("predict_chunk")
    policy.predict_chunk = around(policy.predict_chunk)

    def undo() -> None:
        if before is None:
            vars(policy).pop("predict_chunk", None)
        else:
            policy.predict_chunk = before

    return undo


def _new_graph_iteration(predict_chunk: Callable) -> Callable:
    """CUDA graphs: each inference starts a new iteration, whose replays may reuse the last one's memory."""

    def wrapped(obs):
        torch.compiler.cudagraph_mark_step_begin()
        return predict_chunk(obs)

    return wrapped


def _half_precision(policy: Policy, dtype: torch.dtype, device: torch.device, who: str,
                    info: dict) -> list[Callable[[], None]]:
    """Swaps the policy's floating weights for `dtype` copies and wraps its `predict_chunk` in autocast; returns
    the undos. The originals stay where they are, parked (`info["parked_bytes"]`): removal swaps them back,
    exactly and without a copy."""
    weights = policy.structure.require("weights", who)
    parked = []
    for tensor in [*weights.parameters(), *weights.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != dtype:
            parked.append((tensor, tensor.data))
            tensor.data = tensor.data.to(dtype)
    info["parked_bytes"] = sum(original.numel() * original.element_size() for _, original in parked)

    def autocast(predict_chunk: Callable) -> Callable:
        def wrapped(obs):
            with torch.autocast(device.type, dtype=dtype):
                return predict_chunk(obs)

        return wrapped

    def restore_weights() -> None:
        for tensor, original in parked:
            tensor.data = original

    return [restore_weights, _wrap_predict_chunk(policy, autocast)]


def apply_execution(policy: Policy, config: ExecConfig) -> Handle:
    """Runs `policy` on `config`'s backend until the handle is removed (remove it before changing hooks)."""
    device = weights_device(policy.structure)
    if config.backend == "cuda_graphs" and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs the policy on a CUDA device; it is on {device} "
                         "(exec=compile runs the same graphs without capture on any device)")
    info: dict[str, Any] = {"config": config, "compiled_units": [], "parked_bytes": 0}
    handle = Handle("execution", undo := [], info=info)
    try:
        if config.dtype:
            undo += _half_precision(policy, DTYPES[config.dtype], device, f"dtype={config.dtype}", info)
        if config.backend != "eager":
            # A head cache's schedule specialises one graph per denoising step, and every same-class layer shares
            # its code's cache: torch's default of 8 graphs per code would fall back to eager after the 8th. Put
            # back on removal.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
            undo.append(lambda: setattr(torch._dynamo.config, "recompile_limit", limit))
            options = {"mode": config.compile_mode} if config.mode or config.backend == "cuda_graphs" else \
                {"options": {"freezing": config.freezing}}

            def compile_fn(forward):
                compiled = torch.compile(forward, dynamic=config.dynamic, **options)
                if config.backend != "cuda_graphs":
                    return compiled

                def replay(*args, **kwargs):  # a graph's outputs live in its pool until its next replay: copied out
                    return tree_map_only(torch.Tensor, torch.Tensor.clone, compiled(*args, **kwargs))

                return replay

            if config.backend == "cuda_graphs":
                undo.append(_wrap_predict_chunk(policy, _new_graph_iteration))
            for path in hot_paths(policy):
                for name, unit in compile_units(path):
                    undo.append(_compile_in_place(unit, compile_fn, config))
                    info["compiled_units"].append(f"{type(path).__name__}{'.' + name if name else ''}")
    except BaseException:  # nothing stays half applied
        handle.remove()
        raise
    return handle
