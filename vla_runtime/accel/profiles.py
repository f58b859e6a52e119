"""Acceleration profiles: named compositions of methods, applied to a policy in one call and removed in one.

A profile is `configs/profiles/<name>.yaml` (shipped as `vla_runtime.configs`):

    description: ...
    skip_incompatible: false   # true (`full`): leave out methods the policy has no hook point for
    methods:
      layer_prune: {num_layers: 2}
      token_select: {layer: 2, keep: 24, strategy: efficientvla}

A spec (`accel=` on the command line) is a profile name, a method name (its defaults), or a list of
those, merged left to right: `accel=[efficientvla,action_reuse]`.

Methods are applied in a fixed order, each calibrated (when it needs data) on the policy as the methods
before it left it; artifacts are json files in `calibration_dir`, named by method and by what was
applied before it, and reused when present.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from vla_runtime.accel import action_reuse, head_cache, layer_prune, parallel_decode, token_select, visual_kv_reuse
from vla_runtime.accel.calibration import load_artifact, save_artifact
from vla_runtime.accel.hooks import Handle
from vla_runtime.types import Observation, Policy


@dataclass(frozen=True)
class Method:
    config: type
    apply: Callable[[Policy, Any, dict | None], Handle]
    hook_points: tuple[str, ...]
    calibrate: Callable[[Policy, list[Observation], Any], dict] | None = None
    needs_calibration: Callable[[Any], bool] = lambda config: False
    # A policy feature that rules the method out, with the reason.
    excluded_by: tuple[str, str] | None = None


# In application order.
METHODS: dict[str, Method] = {
    "layer_prune": Method(layer_prune.LayerPruneConfig, lambda p, c, a: layer_prune.apply(p, c, a), ("lm_layers",),
                          calibrate=lambda p, obs, c: layer_prune.calibrate(p, obs, c),
                          needs_calibration=lambda c: c.num_layers > 0),
    "token_select": Method(token_select.TokenSelectConfig, lambda p, c, a: token_select.apply(p, c),
                           ("lm_layers", "visual_token_span"),
                           excluded_by=("ar_decode_loop", "its decode loop reads a KV cache of the full prefix")),
    "visual_kv_reuse": Method(visual_kv_reuse.VisualKVReuseConfig, lambda p, c, a: visual_kv_reuse.apply(p, c),
                              ("lm_layers", "visual_token_span"),
                              excluded_by=("ar_decode_loop", "its decode loop reads a KV cache of the full prefix")),
    "head_cache": Method(head_cache.HeadCacheConfig, lambda p, c, a: head_cache.apply(p, c, a),
                         ("action_head_blocks", "denoising_loop"),
                         calibrate=lambda p, obs, c: head_cache.calibrate(p, obs),
                         needs_calibration=lambda c: c.mode == "bac"),
    "parallel_decode": Method(parallel_decode.ParallelDecodeConfig, lambda p, c, a: parallel_decode.apply(p, c),
                              ("ar_decode_loop",)),
    "action_reuse": Method(action_reuse.ActionReuseConfig, lambda p, c, a: action_reuse.apply(p, c),
                           ("vision_encoder", "preprocess_images")),
}
# Pairs that cannot go on one policy together (see `compatible_methods` for the reason given).
EXCLUSIVE: list[tuple[str, str]] = [("token_select", "visual_kv_reuse")]


@dataclass
class Profile:
    name: str
    methods: dict[str, dict] = field(default_factory=dict)
    skip_incompatible: bool = False
    description: str = ""


def profile_names() -> list[str]:
    folder = resources.files("vla_runtime.configs") / "profiles"
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def _profile_file(name: str) -> Profile:
    path = resources.files("vla_runtime.configs") / "profiles" / f"{name}.yaml"
    settings = yaml.safe_load(path.read_text()) or {}
    unknown = [m for m in settings.get("methods") or {} if m not in METHODS]
    if unknown:
        raise ValueError(f"Profile '{name}' ({path}) names unknown methods {unknown}; known: {', '.join(METHODS)}")
    return Profile(name, dict(settings.get("methods") or {}), bool(settings.get("skip_incompatible", False)),
                   settings.get("description", ""))


def load_profile(spec: str | list[str] | tuple[str, ...] | Profile, options: dict | None = None) -> Profile:
    """`spec`: profile name, method name, or a list of those. `options`: {method: {field: value}} on top."""
    if isinstance(spec, Profile):
        profile = spec
    else:
        names = [spec] if isinstance(spec, str) else list(spec)
        if not names:
            raise ValueError("An empty accel list: use accel=none for no acceleration")
        profile = Profile("+".join(names))
        for name in names:
            if name in profile_names():
                part = _profile_file(name)
                profile.skip_incompatible |= part.skip_incompatible
                for method, settings in part.methods.items():
                    profile.methods[method] = {**profile.methods.get(method, {}), **(settings or {})}
            elif name in METHODS:
                profile.methods.setdefault(name, {})
            else:
                raise ValueError(f"Unknown accel profile or method '{name}'. Profiles: {', '.join(profile_names())}; "
                                 f"methods: {', '.join(METHODS)}")
    for method, settings in (options or {}).items():
        if method not in profile.methods:
            raise ValueError(f"accel options for '{method}', which profile '{profile.name}' does not use "
                             f"(it uses: {', '.join(profile.methods) or 'nothing'})")
        profile.methods[method] = {**profile.methods[method], **settings}
    return profile


def load_profiles(specs: str | list[str], with_baseline: bool = True) -> list[Profile]:
    """Profiles from a name or a list of names ("a+b" composes); `none` first unless listed or not wanted."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    profiles = [load_profile(spec.split("+") if "+" in spec else spec) for spec in specs]
    if with_baseline and "none" not in [p.name for p in profiles]:
        profiles.insert(0, load_profile("none"))
    return profiles


def _config(method: str, settings: dict) -> Any:
    config_cls = METHODS[method].config
    try:
        return config_cls(**settings)
    except TypeError as exc:
        raise ValueError(f"accel method {method}: {exc} (settings: {', '.join(config_cls.__dataclass_fields__)})") \
            from exc


def compatible_methods(policy: Policy, profile: Profile, policy_name: str = "this policy") -> list[str]:
    """The profile's methods in application order; raises (or, with skip_incompatible, drops) what
    cannot go on `policy` or together."""
    chosen = []
    for method in METHODS:
        if method not in profile.methods:
            continue
        spec = METHODS[method]
        missing = [point for point in spec.hook_points if getattr(policy.structure, point, None) is None]
        excluded = spec.excluded_by and getattr(policy.structure, spec.excluded_by[0], None) is not None
        clash = [other for pair in EXCLUSIVE if method in pair for other in pair if other != method and other in chosen]
        if not (missing or excluded or clash):
            chosen.append(method)
        elif not profile.skip_incompatible:
            if missing:
                why = (f"needs the hook point(s) {missing}, which {policy_name} does not declare "
                       f"(it declares: {', '.join(policy.structure.available())})")
            elif excluded:
                why = f"cannot run on {policy_name}: {spec.excluded_by[1]}"
            else:
                why = f"cannot be combined with {clash[0]}: both replace the language model's forward pass"
            raise ValueError(f"accel profile '{profile.name}': {method} {why}")
    return chosen


def weights_fingerprint(policy: Policy) -> str:
    model = getattr(policy, "model", None)
    if model is None:
        return ""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class ProfileHandle:
    """The applied profile: `remove()` undoes every method, last applied first. `reuse_gate` is the
    control loop's gate when the profile has action_reuse, else None."""

    def __init__(self, profile: Profile, handles: list[Handle]):
        self.profile = profile
        self.handles = handles
        gates = [h.info["gate"] for h in handles if "gate" in h.info]
        self.reuse_gate = gates[0] if gates else None

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()


def apply_profile(policy: Policy, profile: Profile, calibration_dir: str | Path | None = None,
                  observations: Callable[[], list[Observation]] | None = None,
                  policy_name: str = "this policy") -> ProfileHandle:
    """Apply every method of `profile` to `policy`. `observations()` is called (once, lazily) when a
    method needs calibration data that `calibration_dir` does not already hold."""
    methods = compatible_methods(policy, profile, policy_name)
    handles: list[Handle] = []
    applied: list[dict] = []
    calibration_set: list[Observation] | None = None
    try:
        for method in methods:
            spec, config = METHODS[method], _config(method, profile.methods[method])
            artifact = None
            if spec.needs_calibration(config):
                # The weights and what was applied before change what this method measures: both name the artifact.
                context = hashlib.sha256(json.dumps(
                    [weights_fingerprint(policy), applied, asdict(config)], sort_keys=True).encode()).hexdigest()[:8]
                path = Path(calibration_dir) / f"{method}-{context}.json" if calibration_dir else None
                if path is not None and path.exists():
                    artifact = load_artifact(path, method)
                else:
                    if observations is None:
                        raise ValueError(f"accel method {method} needs calibration observations")
                    if calibration_set is None:
                        calibration_set = observations()
                    artifact = {**spec.calibrate(policy, calibration_set, config), "applied_before": applied}
                    if path is not None:
                        save_artifact(path, artifact)
            handles.append(spec.apply(policy, config, artifact))
            applied = [*applied, {method: asdict(config)}]
    except BaseException:
        for handle in reversed(handles):
            handle.remove()
        raise
    return ProfileHandle(profile, handles)
