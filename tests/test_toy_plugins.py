"""The seams, exercised from outside the package: a toy suite and a toy policy family (tests/toy_plugins,
found through entry points as a pip plug-in would be) run through vla-eval, vla-bench and vla-replay, with an
acceleration method applied through the declared PolicyStructure; a toy method registered from here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from vla_runtime.accel.method import AccelMethod, Phase, register_method
from vla_runtime.accel.profiles import Accelerator, load_profile
from vla_runtime.hooks import Handle, ModelHook, add_hook

TOY = Path(__file__).resolve().parent / "toy_plugins"
PACKAGE = Path(__file__).resolve().parent.parent / "vla_runtime"


@pytest.fixture
def toy_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TOY))


def cli(command: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TOY), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", f"vla_runtime.cli.{command}",
                           f"hydra.searchpath=[file://{TOY / 'configs'}]", *overrides],
                          env=env, capture_output=True, text=True, timeout=600)


def test_toy_plugins_are_found_through_entry_points_and_named_nowhere_in_the_package(toy_on_path):
    from vla_runtime.policies import make_policy, policy_names
    from vla_runtime.sim import make_suite, suite_names

    assert "toy" in suite_names() and "toy_vla" in policy_names()
    suite = make_suite("toy")
    suite.check_policy(make_policy("toy_vla"), "toy_vla")
    assert make_policy("expert", suite=suite).spec.privileged
    with pytest.raises(ValueError,
                       match="Unknown simulator suite 'nope'. Registered: libero, metaworld, simpler_bridge, toy"):
        make_suite("nope")
    named = [str(path) for path in PACKAGE.rglob("*.py") if "toy" in path.read_text().lower()]
    assert named == []


def test_toy_policy_on_another_suite_is_refused_naming_both_specs(toy_on_path, tmp_path):
    from vla_runtime.policies import make_policy
    from vla_runtime.sim import make_suite

    with pytest.raises(ValueError, match=r"Policy 'toy_vla' \(2-D actions, 2-D state, cameras \['top'\] at 16x16, "
                                         r"10 Hz\) does not fit suite 'metaworld' \(4-D actions"):
        make_suite("metaworld").check_policy(make_policy("toy_vla"), "toy_vla")
    refused = cli("eval", "sim=toy", "policy=ref_dit", "episodes_per_task=1", "workers=1", f"output_dir={tmp_path}")
    assert refused.returncode == 2, refused.stderr
    assert "Policy 'ref_dit' (4-D actions" in refused.stderr
    assert "does not fit suite 'toy' (2-D actions" in refused.stderr


def test_toy_suite_and_policy_through_vla_eval_bench_and_replay(tmp_path):
    expert = cli("eval", "sim=toy", "policy=expert", "episodes_per_task=3", "workers=1",
                 f"output_dir={tmp_path / 'expert'}")
    assert expert.returncode == 0, expert.stderr
    assert json.loads((tmp_path / "expert" / "results.json").read_text())["success_rate"] == 1.0
    # The same episodes through a launcher of the test tree's (found through its entry point, as a plug-in).
    toy_launched = cli("eval", "sim=toy", "policy=toy_vla", "launcher=toy_serial", "episodes_per_task=3",
                       f"output_dir={tmp_path / 'toy_launcher'}")
    local = cli("eval", "sim=toy", "policy=toy_vla", "launcher=local", "episodes_per_task=3", "workers=1",
                f"compare_to={tmp_path / 'expert' / 'results.json'}", f"output_dir={tmp_path / 'local_launcher'}")
    assert toy_launched.returncode == 0 and local.returncode == 0, toy_launched.stderr + local.stderr
    episodes = [[{k: e[k] for k in ("task", "seed", "success", "length", "policy_calls")}
                 for e in json.loads((tmp_path / run / "results.json").read_text())["episodes"]]
                for run in ("toy_launcher", "local_launcher")]
    assert episodes[0] == episodes[1]
    # Against the expert on the same six episodes, paired.
    paired = json.loads((tmp_path / "local_launcher" / "results.json").read_text())["paired_vs"]
    toy_success = sum(e["success"] for e in episodes[1])
    assert paired["pairs"] == 6 and (paired["wins"], paired["losses"]) == (0, 6 - toy_success)
    assert paired["delta"] == pytest.approx((toy_success - 6) / 6)
    assert "Against " in (tmp_path / "local_launcher" / "summary.md").read_text()

    # The toy VLA, head_cache applied through its DenoisingHead, every episode kept for replay.
    evaluated = cli("eval", "sim=toy", "policy=toy_vla", "accel=head_cache", "episodes_per_task=2", "workers=2",
                    "save_episodes=true", f"output_dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["accel"]["profile"] == "head_cache" and results["policy_calls"] > 0 and not results["errors"]
    assert {e["task"] for e in results["episodes"]} == {"reach-left", "reach-right"}

    bench = cli("bench", "sim=toy", "policy=toy_vla", "accel=[none,head_cache]", "measurement_per_task=1",
                "frames_per_sequence=2", "rounds=1", "episodes_per_task=1", "workers=1", "calibration_per_task=1",
                "num_threads=1", f"output_dir={tmp_path / 'bench'}")
    assert bench.returncode == 0, bench.stderr
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["profiles"]
    cached = rows["head_cache"]
    assert cached["methods"]["head_cache"]["branch_updates_share"] == 0.5  # static: every 2nd of 4 steps
    assert cached["flops_ratio"] < 1 and cached["action_mse"] > 0 and not cached["actions_identical"]
    assert rows["none"]["actions_identical"] and set(cached["success"]["sync"]) >= {"success_rate", "ci95"}
    # The baseline against itself: the same episodes, no outcome changed, a zero-width interval.
    itself = rows["none"]["success"]["sync"]["paired_vs_none"]
    assert (itself["delta"], itself["ci95"], itself["verdict"]) == (0.0, [0.0, 0.0], "no measurable loss")
    assert cached["success"]["sync"]["paired_vs_none"]["pairs"] == 2
    assert "| won / lost | verdict |" in (tmp_path / "bench" / "bench.md").read_text()
    # Realtime beside sync by default, each profile's calls taking latencies drawn from its own measured samples.
    samples = json.loads((tmp_path / "bench" / "latency" / "head_cache.json").read_text())["latency_samples_ms"]
    realtime = cached["success"]["realtime"]
    assert len(samples) == cached["latency_samples"] and realtime["paired_vs_none"]["pairs"] == 2
    assert min(samples) <= realtime["latency_ms"]["p50"] <= max(samples)
    assert "| jump / jerk (realtime) |" in (tmp_path / "bench" / "bench.md").read_text()

    replay = cli("replay", "sim=toy", "policy=toy_vla", f"source={tmp_path / 'eval' / 'episodes'}",
                 "accel=[none,head_cache]", f"output_dir={tmp_path / 'replay'}")
    assert replay.returncode == 0, replay.stderr
    table = json.loads((tmp_path / "replay" / "replay.json").read_text())["profiles"]
    assert table["none"]["action_mse_vs_none"] == 0.0  # the same policy twice: deterministic
    # The episodes were logged under head_cache: replaying it reproduces them; `none` does not.
    assert table["head_cache"]["action_mse_vs_logged"] < 1e-12 < table["none"]["action_mse_vs_logged"]


@dataclass
class ScaleConfig:
    factor: float = 2.0


class _Scale(ModelHook):
    def __init__(self, factor: float):
        self.factor = factor

    def post_forward(self, module, output):
        return output * self.factor


def _apply_scale(policy, config: ScaleConfig, artifact=None) -> Handle:
    encoder = policy.structure.require("vision_encoder", "toy_scale")
    return Handle("toy_scale", [add_hook(encoder, "toy_scale", _Scale(config.factor))])


def test_a_toy_method_is_one_registration_and_profiles_compose_it(toy_on_path):
    from vla_runtime.accel.method import METHODS
    from vla_runtime.policies import make_policy
    from vla_runtime.sim import make_suite

    register_method(AccelMethod("toy_scale", ScaleConfig, _apply_scale, requires=("vision_encoder",),
                                phase=Phase.CALLS))
    try:
        suite = make_suite("toy")
        policy = make_policy("toy_vla")
        obs = suite.make_env("reach-left").reset(5000)
        baseline = policy.predict_chunk(obs).actions
        accelerator = Accelerator(policy, None, policy_name="toy_vla")
        handle = accelerator.apply(load_profile(["head_cache", "toy_scale"], {"toy_scale": {"factor": 0.0}}))
        assert [h.method for h in handle.handles] == ["head_cache", "toy_scale"]  # by declared order
        scaled = policy.predict_chunk(obs).actions
        accelerator.remove()
        assert not np.allclose(scaled, baseline)
        np.testing.assert_array_equal(policy.predict_chunk(obs).actions, baseline)  # removed exactly
        with pytest.raises(ValueError, match=r"parallel_decode needs the hook point\(s\) \['ar_decoder'\]"):
            accelerator.apply(load_profile("parallel_decode"))
    finally:
        METHODS.unregister("toy_scale")


def _imports(folder: str) -> dict[str, set[str]]:
    """module path -> the vla_runtime modules it imports (anywhere in the file, lazily or not)."""
    import ast

    found = {}
    for path in (PACKAGE / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(PACKAGE))] = {name for name in names if name.startswith("vla_runtime")}
    return found


@pytest.mark.parametrize("folder, forbidden", [
    ("policies", ("vla_runtime.accel",)),
    ("control", ("vla_runtime.sim", "vla_runtime.ros", "vla_runtime.evaluation")),
    # The suites import nothing that runs policies in them: that is evaluation's, which imports them.
    ("sim", ("vla_runtime.accel", "vla_runtime.control", "vla_runtime.data", "vla_runtime.evaluation",
             "vla_runtime.ros", "vla_runtime.cli", "vla_runtime.execution", "vla_runtime.serve")),
    ("evaluation", ("vla_runtime.cli", "vla_runtime.ros", "vla_runtime.serve")),
])
def test_package_dependencies_point_one_way(folder, forbidden):
    wrong = {module: sorted(name for name in names if name.startswith(forbidden))
             for module, names in _imports(folder).items()}
    assert {module: names for module, names in wrong.items() if names} == {}


def test_no_command_imports_another():
    """The CLIs share what they build from configs through cli/build.py and cli/common.py, never each other."""
    shared = {"vla_runtime.cli", "vla_runtime.cli.common", "vla_runtime.cli.build"}  # the package: config paths
    wrong = {module: sorted(name for name in names if name.startswith("vla_runtime.cli") and name not in shared)
             for module, names in _imports("cli").items()}
    assert {module: names for module, names in wrong.items() if names} == {}


def test_a_suite_missing_part_of_its_contract_cannot_be_built():
    from vla_runtime.sim import Suite

    class TasksOnly(Suite):
        def tasks(self):
            return ("t",)

    with pytest.raises(TypeError, match="abstract method.*expert"):
        TasksOnly()
