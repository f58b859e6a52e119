"""Acceleration profiles: named compositions of methods, applied to a policy in one call and removed in one.

A profile is `configs/profiles/<name>.yaml` (shipped as `vla_runtime.configs`):

    description: ...
    skip_incompatible: false   # true (`full`): leave out methods the policy has no hook point for
    methods:
      layer_prune: {num_layers: 2}
      token_select: {layer: 2, keep: 24, strategy: efficientvla}

A spec (`accel=` on the command line) is a profile name, a method name (its defaults), or a list of
those, merged left to right: `accel=[efficientvla,action_reuse]`.

Methods (the registered descriptors of `accel/method.py`) are applied in their declared order, each
calibrated (when it needs data) on the policy as the methods before it left it; artifacts are json files
in the calibration directory, named by method, weights and what was applied before it, and reused when
present. `Accelerator` is the one place that applies profiles: eval workers, vla-bench, vla-replay and the
ROS node all go through it, with calibration observations from whatever source suits them (a suite's
expert episodes, logged frames).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
import yaml

from vla_runtime.accel.calibration import load_artifact, save_artifact
from vla_runtime.accel.method import METHODS, AccelMethod, exclusion_reason, methods_in_order
from vla_runtime.execution import ExecConfig, apply_execution
from vla_runtime.hooks import Handle
from vla_runtime.plugins import did_you_mean
from vla_runtime.types import Observation, Policy


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
    """A shipped profile by name, or a profile file by its path (`accel=outputs/tune/ref_dit/tuned.yaml`)."""
    if name.endswith(".yaml"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"accel={name}: no such profile file")
    else:
        path = resources.files("vla_runtime.configs") / "profiles" / f"{name}.yaml"
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"Profile '{name}' ({path}) is not valid yaml: {problem}{where}") from exc
    if not isinstance(settings, dict) or not isinstance(settings.get("methods") or {}, dict):
        raise ValueError(f"Profile '{name}' ({path}) must be a mapping with `description:` and `methods: {{method: "
                         f"{{field: value}}}}`, got {type(settings).__name__}")
    unknown = [m for m in settings.get("methods") or {} if m not in METHODS.names()]
    if unknown:
        raise ValueError(f"Profile '{name}' ({path}) names unknown methods {unknown}; "
                         f"known: {', '.join(METHODS.names())}")
    return Profile(Path(name).stem, dict(settings.get("methods") or {}),
                   bool(settings.get("skip_incompatible", False)), settings.get("description", ""))


def load_profile(spec: str | list[str] | tuple[str, ...] | Profile, options: dict | None = None) -> Profile:
    """`spec`: profile name, profile file (`*.yaml`), method name, or a list of those. `options`: {method: {field:
    value}} on top."""
    if isinstance(spec, Profile):
        profile = spec
    else:
        names = [spec] if isinstance(spec, str) else list(spec)
        if not names:
            raise ValueError("An empty accel list: use accel=none for no acceleration")
        profile = Profile("+".join(Path(name).stem if name.endswith(".yaml") else name for name in names))
        for name in names:
            if name in profile_names() or name.endswith(".yaml"):
                part = _profile_file(name)
                profile.skip_incompatible |= part.skip_incompatible
                for method, settings in part.methods.items():
                    profile.methods[method] = {**profile.methods.get(method, {}), **(settings or {})}
            elif name in METHODS.names():
                profile.methods.setdefault(name, {})
            else:
                near = did_you_mean(name, [*profile_names(), *METHODS.names()])
                raise ValueError(f"Unknown accel profile or method '{name}'{near}. "
                                 f"Profiles: {', '.join(profile_names())}; methods: {', '.join(METHODS.names())}")
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


def ladder(specs: list[str] | tuple[str, ...]) -> list[str]:
    """A budget governor's ladder, most faithful first: profile specs, where a folder (a vla-tune run's `front/`)
    stands for the profile files it holds, in name order."""
    expanded = []
    for spec in specs:
        if Path(spec).is_dir():
            files = sorted(Path(spec).glob("*.yaml"))
            if not files:
                raise ValueError(f"Ladder folder {spec} holds no profile (*.yaml); a vla-tune run writes its Pareto "
                                 "front, most faithful first, to <output_dir>/front")
            expanded += [str(path) for path in files]
        else:
            expanded.append(spec)
    return expanded


def _why_not(method: AccelMethod, policy: Policy, chosen: list[AccelMethod], policy_name: str,
             settings: dict) -> str | None:
    structure = policy.structure
    missing = structure.missing(method.requires)
    if missing:
        return (f"needs the hook point(s) {missing}, which {policy_name} does not declare "
                f"(it declares: {', '.join(structure.available()) or 'none'})")
    if method.excluded_by and getattr(structure, method.excluded_by[0], None) is not None:
        return f"cannot run on {policy_name}: {method.excluded_by[1]}"
    reason = method.unsupported(structure, method.make_config(settings)) if method.unsupported else None
    if reason:
        return f"cannot run on {policy_name}: {reason}"
    for other in chosen:
        reason = exclusion_reason(method, other)
        if reason:
            return f"cannot be combined with {other.name}: {reason}"
    return None


def compatible_methods(policy: Policy, profile: Profile, policy_name: str = "this policy") -> list[AccelMethod]:
    """The profile's methods in application order; raises (or, with skip_incompatible, drops) what
    cannot go on `policy` or together."""
    chosen: list[AccelMethod] = []
    for method in methods_in_order():
        if method.name not in profile.methods:
            continue
        why = _why_not(method, policy, chosen, policy_name, profile.methods[method.name])
        if why is None:
            chosen.append(method)
        elif not profile.skip_incompatible:
            raise ValueError(f"accel profile '{profile.name}': {method.name} {why}")
    return chosen


def weights_fingerprint(policy: Policy) -> str:
    weights = policy.structure.weights
    if weights is None:
        return ""
    digest = hashlib.sha256()
    for name, value in weights.state_dict().items():
        digest.update(name.encode())
        _digest_value(digest, value)
    return digest.hexdigest()[:16]


def _digest_value(digest, value) -> None:
    """A state-dict entry into `digest`: a tensor's bytes (a quantized one's integers and scales), a quantized
    module's packed (weight, bias) one by one, anything else (a dtype) by its repr."""
    if isinstance(value, (tuple, list)):
        for item in value:
            _digest_value(digest, item)
    elif isinstance(value, torch.Tensor):
        if value.is_quantized:
            _digest_value(digest, (value.int_repr(), value.q_per_channel_scales() if value.qscheme() in (
                torch.per_channel_affine, torch.per_channel_symmetric) else torch.tensor(value.q_scale())))
        else:
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(repr(value).encode())


class ProfileHandle:
    """The applied profile: `remove()` undoes every method, last applied first. `reuse_gate` is the
    control loop's gate when the profile has action_reuse, else None."""

    def __init__(self, profile: Profile, handles: list[Handle], execution: Handle | None = None):
        self.profile = profile
        self.handles = handles
        self.execution = execution  # the execution backend, over the methods' hooks (vla_runtime/execution.py)
        gates = [h.reuse_gate for h in handles if h.reuse_gate is not None]
        self.reuse_gate = gates[0] if gates else None

    def stats(self) -> dict[str, dict]:
        """What each method reports about the calls made since it was applied."""
        return {h.method: h.stats() for h in self.handles}

    def remove(self) -> None:
        if self.execution is not None:
            self.execution.remove()
        for handle in reversed(self.handles):
            handle.remove()


def default_calibration_dir(policy: Policy) -> str | None:
    """`<checkpoint>/calibration` when the policy has a checkpoint and that can be written, else None."""
    checkpoint = policy.structure.checkpoint_dir
    if checkpoint is None:
        return None
    default = Path(checkpoint) / "calibration"
    return str(default) if os.access(default if default.exists() else checkpoint, os.W_OK) else None


class Accelerator:
    """Applies acceleration profiles to one policy, one at a time (applying a profile removes the last).

    `observations()` gives the calibration set; it is called once, the first time a method needs data
    that the calibration directory does not hold. The directory is `calibration_dir`, else
    `<checkpoint>/calibration` when writable, else a temporary one for this process. `execution`: the backend
    every profile runs on (None: eager), built over the profile's hooks after its calibration.
    """

    def __init__(self, policy: Policy, observations: Callable[[], list[Observation]] | None,
                 calibration_dir: str | Path | None = None, policy_name: str = "this policy",
                 execution: ExecConfig | None = None):
        self.policy = policy
        self.execution = execution  # every profile runs on this backend, compiled over its hooks
        self.policy_name = policy_name
        self._observations = observations
        self._calibration_set: list[Observation] | None = None
        self.calibration_dir = Path(calibration_dir or default_calibration_dir(policy)
                                    or tempfile.mkdtemp(prefix="vla-calibration-"))
        self.active: ProfileHandle | None = None
        self._fingerprints: dict[str, str] = {}

    def _fingerprint(self, applied: list[dict]) -> str:
        """The weights' fingerprint as the methods in `applied` leave them, hashed once per such state (a 3 B
        model takes seconds to hash; its weights do not change between profiles but by the methods)."""
        key = json.dumps(applied, sort_keys=True)
        if key not in self._fingerprints:
            self._fingerprints[key] = weights_fingerprint(self.policy)
        return self._fingerprints[key]

    def check(self, profile: Profile) -> None:
        """Raises, naming both, when the profile does not fit the policy; nothing is applied."""
        compatible_methods(self.policy, profile, self.policy_name)

    def apply(self, profile: Profile) -> ProfileHandle:
        self.remove()
        self.active = self._apply(profile)
        return self.active

    def remove(self) -> None:
        if self.active is not None:
            self.active.remove()
            self.active = None

    def warm_up(self) -> None:
        """Runs the applied profile over the calibration observations: a compiled backend builds its graphs
        now, not in the first policy call of an episode or a control tick."""
        for obs in self.calibration_set():
            self.policy.reset()
            self.policy.predict_chunk(obs)
        self.policy.reset()

    def calibration_set(self) -> list[Observation]:
        """The calibration observations (also what a compiled backend warms up on)."""
        if self._calibration_set is None:
            if self._observations is None:
                raise ValueError("this profile needs calibration observations, and no source was given")
            self._calibration_set = self._observations()
        return self._calibration_set

    def _apply(self, profile: Profile) -> ProfileHandle:
        policy = self.policy
        handles: list[Handle] = []
        applied: list[dict] = []
        try:
            for method in compatible_methods(policy, profile, self.policy_name):
                config = method.make_config(profile.methods[method.name])
                artifact = None
                if method.needs_calibration(config):
                    # The weights and what was applied before change what this method measures: both name it.
                    named = [self._fingerprint(applied), applied, method.calibration_key(config)]
                    context = hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:8]
                    path = self.calibration_dir / f"{method.name}-{context}.json"
                    if path.exists():
                        artifact = load_artifact(path, method.name)
                    else:
                        measured = method.calibrate(policy, self.calibration_set(), config)
                        artifact = {**measured, "applied_before": applied}
                        save_artifact(path, artifact)
                handles.append(method.apply(policy, config, artifact))
                applied = [*applied, {method.name: asdict(config)}]
            # Calibration above ran eager; the backend is built over the hooks just applied.
            plain = self.execution is None or self.execution.changes_nothing
            execution = None if plain else apply_execution(policy, self.execution)
        except BaseException:  # a method or the backend refused: nothing stays applied
            for handle in reversed(handles):
                handle.remove()
            raise
        return ProfileHandle(profile, handles, execution)
