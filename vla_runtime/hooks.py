"""A small hook mechanism in the spirit of diffusers' `hooks/`: a `ModelHook` changes what one module's
forward does; a per-module `HookRegistry` chains the hooks of that module and restores the original
forward, exactly, when the last one is removed. `drop_layers` is the one structural change methods make (a
decoder's layer list shortened in place), with the undo that restores it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from vla_runtime.control.reuse import ReuseGate

_REGISTRY_ATTRIBUTE = "_vla_hook_registry"


class ModelHook:
    """Override what you need. `new_forward` replaces the module's forward (return NotImplemented to
    fall through to the next hook / the original forward). `calls_through`: a `new_forward` that runs the module
    only through `call_next`, never its children one by one (an execution backend then compiles the module
    whole, beneath the hook)."""

    calls_through = False

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        return args, kwargs

    def new_forward(self, module: nn.Module, call_next: Any, *args: Any, **kwargs: Any) -> Any:
        return call_next(*args, **kwargs)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return output

    def reset_state(self, module: nn.Module) -> None:
        """Forget per-inference state (caches); called by `HookRegistry.reset`."""


class HookRegistry:
    """The hooks of one module, applied in registration order (the first registered is outermost)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.hooks: dict[str, ModelHook] = {}
        self._original_forward = module.forward  # the bound method of the class: restored on removal

    @classmethod
    def of(cls, module: nn.Module) -> HookRegistry:
        registry = module.__dict__.get(_REGISTRY_ATTRIBUTE)
        if registry is None:
            registry = cls(module)
            module.__dict__[_REGISTRY_ATTRIBUTE] = registry
        return registry

    @staticmethod
    def find(module: nn.Module) -> HookRegistry | None:
        return module.__dict__.get(_REGISTRY_ATTRIBUTE)

    @property
    def original_forward(self) -> Any:
        return self._original_forward

    def set_original_forward(self, forward: Any) -> None:
        """What the hooks wrap: the class's forward, or a compiled version of it (execution backends)."""
        self._original_forward = forward
        self._rebuild()

    def register(self, name: str, hook: ModelHook, outermost: bool = False) -> None:
        """`outermost`: before the hooks already there (else after them, innermost)."""
        if name in self.hooks:
            raise ValueError(f"A hook named '{name}' is already on {type(self.module).__name__}")
        self.hooks = {name: hook, **self.hooks} if outermost else {**self.hooks, name: hook}
        self._rebuild()

    def remove(self, name: str) -> None:
        self.hooks.pop(name, None)
        if self.hooks:
            self._rebuild()
        else:
            # Dropping the instance attribute brings back the class's forward: bit-identical behaviour.
            self.module.__dict__.pop("forward", None)
            self.module.__dict__.pop(_REGISTRY_ATTRIBUTE, None)

    def reset(self) -> None:
        for hook in self.hooks.values():
            hook.reset_state(self.module)

    def _rebuild(self) -> None:
        forward = self._original_forward
        for hook in reversed(list(self.hooks.values())):
            forward = self._wrap(hook, forward)
        self.module.forward = forward

    def _wrap(self, hook: ModelHook, call_next: Any) -> Any:
        module = self.module

        @functools.wraps(call_next)
        def forward(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = hook.pre_forward(module, *args, **kwargs)
            return hook.post_forward(module, hook.new_forward(module, call_next, *args, **kwargs))

        return forward


class Handle:
    """What `apply` returns: `remove()` undoes every change the method made; `stats()` is what it reports about the
    calls since it was applied (benchmarks print it); `reuse_gate` (action reuse) goes to the control loop, which
    asks it before each policy call. `info`: what the method's own tests look into."""

    def __init__(self, method: str, undo: list[Any], info: dict | None = None,
                 stats: Callable[[], dict] | None = None, reuse_gate: ReuseGate | None = None):
        self.method = method
        self._undo = undo
        self.info = info or {}
        self._stats = stats
        self.reuse_gate = reuse_gate
        self.removed = False

    def stats(self) -> dict:
        return self._stats() if self._stats is not None else {}

    def remove(self) -> None:
        if self.removed:
            return
        for undo in reversed(self._undo):
            undo()
        self.removed = True


def reset_hooks(root: nn.Module) -> None:
    """Per-episode reset of every hook under `root` (a policy calls this from its `reset`)."""
    for module in root.modules():
        registry = HookRegistry.find(module)
        if registry is not None:
            registry.reset()


def add_hook(module: nn.Module, name: str, hook: ModelHook, outermost: bool = False) -> Any:
    """Register `hook` on `module` (innermost, or `outermost`); returns the function that removes it."""
    registry = HookRegistry.of(module)
    registry.register(name, hook, outermost)
    return lambda: HookRegistry.of(module).remove(name) if HookRegistry.find(module) else None


def drop_layers(layers, config, keep: list[int]):
    """Keeps only `keep` (indices) of a decoder's `layers`, in place, and returns the undo: everything holding the
    list sees the shorter model; each kept layer's attention is renumbered (a KV cache is indexed by position in
    the list) and the config's `num_hidden_layers` / `layer_types` follow."""
    original = list(layers)
    original_count = config.num_hidden_layers
    original_types = list(getattr(config, "layer_types", None) or [])
    original_idx = [layer.self_attn.layer_idx for layer in original]
    if not keep:
        raise ValueError("layer_prune would remove every layer of the language model")
    del layers[:]
    layers.extend(original[i] for i in keep)
    for new_index, layer in enumerate(layers):
        layer.self_attn.layer_idx = new_index
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

    return restore
