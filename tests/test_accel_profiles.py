"""Action reuse, profiles (composition, incompatibility, calibration artifacts) and vla-bench."""

import json
import re

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from test_accel import actions, observations, untrained

from vla_runtime.accel import action_reuse
from vla_runtime.accel.method import METHODS, methods_in_order
from vla_runtime.accel.profiles import Accelerator, Profile, compatible_methods, ladder, load_profile, profile_names
from vla_runtime.cli.common import UsageError
from vla_runtime.types import ActionChunk


def method_names(policy, profile, policy_name="this policy"):
    return [method.name for method in compatible_methods(policy, profile, policy_name)]


def chunk(first_action):
    return ActionChunk(np.asarray([first_action] * 4, dtype=np.float32), t0=0.0, dt=0.0125)


def warm_gate(policy, config):
    """A gate that has seen two real inferences on the first observation, with stable actions."""
    handle = action_reuse.apply(policy, config)
    gate, obs = handle.reuse_gate, observations(1)[0]
    gate.reset()
    for _ in range(2):
        policy.predict_chunk(obs)
        gate.on_inference(obs, chunk([0.1, 0.0, 0.0, 0.0]))
    return handle, gate, obs


def test_action_reuse_threshold_above_one_never_reuses_and_remove_restores():
    policy = untrained("dit")
    baseline = actions(policy, observations())
    handle, gate, obs = warm_gate(policy, action_reuse.ActionReuseConfig(token_similarity=1.01, max_consecutive=5))
    assert not any(gate.should_reuse(obs, chunk([0.1, 0, 0, 0])) for _ in range(5))
    assert gate.reuses == 0 and gate.decisions == 5
    handle.remove()
    assert np.array_equal(actions(policy, observations()), baseline)


def test_action_reuse_is_bounded_and_needs_a_similar_frame_and_stable_actions():
    policy = untrained("dit")
    handle, gate, obs = warm_gate(policy, action_reuse.ActionReuseConfig(token_similarity=0.999, max_consecutive=2))
    decisions = [gate.should_reuse(obs, chunk([0.1, 0, 0, 0])) for _ in range(6)]
    assert decisions == [True, True, False, False, False, False]  # the same frame, but at most 2 in a row
    gate.on_inference(obs, chunk([0.1, 0, 0, 0]))  # a real inference resets the count
    assert gate.should_reuse(obs, chunk([0.1, 0, 0, 0]))
    other = observations(3)[2]
    gate.consecutive = 0
    assert not gate.should_reuse(other, chunk([0.1, 0, 0, 0]))  # a different frame
    gate.on_inference(obs, chunk([0.9, 0, 0, 0]))  # actions jumped: not stable
    assert not gate.should_reuse(obs, chunk([0.9, 0, 0, 0]))
    handle.remove()


def test_every_method_is_a_registered_descriptor_in_application_order():
    assert [m.name for m in methods_in_order()] == ["quantize", "vision_resolution", "layer_prune", "token_select",
                                                    "visual_kv_reuse", "head_cache", "step_reduction",
                                                    "parallel_decode", "action_reuse"]
    assert METHODS.get("parallel_decode").requires == ("ar_decoder",)
    assert METHODS.get("head_cache").requires == ("denoising_head",)
    assert METHODS.get("token_select").excluded_by[0] == "ar_decoder"
    with pytest.raises(ValueError, match="Unknown acceleration method 'turbo'"):
        METHODS.get("turbo")


def test_profiles_compose_and_name_what_is_incompatible():
    assert {"none", "efficientvla", "flashvla", "bac", "pdvla", "vlacache", "full"} <= set(profile_names())
    composed = load_profile(["efficientvla", "action_reuse"], {"token_select": {"keep": 24}})
    assert list(composed.methods) == ["layer_prune", "token_select", "head_cache", "action_reuse"]
    assert composed.methods["token_select"]["keep"] == 24 and composed.methods["layer_prune"]["num_layers"] == 2
    with pytest.raises(ValueError, match="Unknown accel profile or method 'turbo'"):
        load_profile("turbo")
    with pytest.raises(ValueError, match="accel options for 'parallel_decode', which profile 'bac' does not use"):
        load_profile("bac", {"parallel_decode": {"max_passes": 2}})
    dit, ar = untrained("dit"), untrained("ar")
    with pytest.raises(ValueError, match="accel profile 'pdvla': parallel_decode needs the hook point.*ar_decoder"
                                         ".*which ref_dit does not declare"):
        compatible_methods(dit, load_profile("pdvla"), "ref_dit")
    with pytest.raises(ValueError, match="accel profile 'efficientvla': token_select cannot run on ref_ar: its decode "
                                         "loop reads a KV cache"):
        compatible_methods(ar, load_profile("efficientvla"), "ref_ar")
    accelerator = Accelerator(dit, None, policy_name="ref_dit")
    with pytest.raises(ValueError, match="accel method head_cache: .*intervall.*settings: mode, interval"):
        accelerator.apply(load_profile("bac", {"head_cache": {"intervall": 3}}))
    assert accelerator.active is None
    with pytest.raises(ValueError, match="accel profile 'pdvla': parallel_decode needs the hook point.*ar_decoder"):
        accelerator.check(load_profile("pdvla"))
    accelerator.check(load_profile("bac"))  # fits: nothing raised, nothing applied
    assert accelerator.active is None
    assert method_names(ar, load_profile("full")) == ["layer_prune", "parallel_decode", "action_reuse"]
    assert method_names(dit, load_profile("full")) == ["layer_prune", "token_select", "head_cache", "action_reuse"]


@pytest.mark.parametrize("head", ["dit", "ar"])
def test_full_profile_calibrates_once_and_remove_restores_the_baseline(head, tmp_path):
    policy = untrained(head)
    obs = observations()
    baseline = actions(policy, obs)
    calls = []

    def calibration_observations():
        calls.append(1)
        return observations(2)

    profile = Profile("test", {**load_profile("full").methods, "layer_prune": {"num_layers": 1},
                               "token_select": {"layer": 1, "keep": 8}}, skip_incompatible=True)
    accelerator = Accelerator(policy, calibration_observations, tmp_path, policy_name=f"ref_{head}")
    handle = accelerator.apply(profile)
    assert accelerator.active is handle
    expected = (["layer_prune", "token_select", "head_cache", "action_reuse"] if head == "dit"
                else ["layer_prune", "parallel_decode", "action_reuse"])
    assert [h.method for h in handle.handles] == expected
    assert handle.reuse_gate is not None  # action_reuse: the gate goes to the control loop
    accelerated = actions(policy, obs)
    stats = handle.stats()
    assert list(stats) == expected
    assert stats["layer_prune"]["removed_layers"] and len(stats["layer_prune"]["removed_layers"]) == 1
    if head == "dit":
        assert stats["token_select"]["kept_visual_tokens"] == 8
        assert 0 < stats["head_cache"]["branch_updates_share"] <= 1
    else:
        assert stats["parallel_decode"]["mean_passes"] >= 1
    accelerator.remove()
    assert accelerator.active is None
    assert np.array_equal(actions(policy, obs), baseline)
    assert not np.array_equal(accelerated, baseline)
    artifacts = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.json"))
    assert artifacts == (["head_cache", "layer_prune"] if head == "dit" else ["layer_prune"])
    assert json.loads(next(tmp_path.glob("layer_prune-*.json")).read_text())["method"] == "layer_prune"
    # A second accelerator on the same directory: artifacts found, no new data.
    again = Accelerator(policy, calibration_observations, tmp_path, policy_name=f"ref_{head}")
    again.apply(profile)
    assert np.array_equal(actions(policy, obs), accelerated)
    again.apply(load_profile("none"))  # applying a profile removes the last one
    assert np.array_equal(actions(policy, obs), baseline)
    again.remove()
    assert calls == [1]


def test_calibration_dir_defaults_to_the_checkpoint_else_a_temporary_one(tmp_path):
    from vla_runtime.accel.profiles import default_calibration_dir

    policy = untrained("dit")
    assert policy.structure.checkpoint_dir is None and default_calibration_dir(policy) is None
    accelerator = Accelerator(policy, None)
    assert accelerator.calibration_dir.is_dir() and accelerator.calibration_dir != tmp_path
    policy.structure.checkpoint_dir = tmp_path
    assert default_calibration_dir(policy) == str(tmp_path / "calibration")
    assert Accelerator(policy, None).calibration_dir == tmp_path / "calibration"
    with pytest.raises(ValueError, match="needs calibration observations, and no source was given"):
        Accelerator(policy, None, tmp_path / "empty").apply(load_profile("bac"))


def test_vla_bench_measures_profiles_against_the_baseline(tmp_path):
    from vla_runtime.cli import bench

    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        cfg = compose("bench", overrides=["accel=[bac,pdvla]", "tasks=[drawer-close]",
                                          f"calibration_dir={tmp_path / 'cal'}"])
        with pytest.raises(ValueError, match="accel profile 'pdvla': parallel_decode needs"):
            bench.run(cfg)
        assert not (tmp_path / "cal").exists()  # refused before anything was calibrated
        for bad, match in (("realtime_latency=recorder", "did you mean 'recorded'"),
                           ("success_modes=[sync,reltime]", "unknown \\['reltime'\\]")):
            with pytest.raises(UsageError, match=match):
                bench.run(compose("bench", overrides=["tasks=[drawer-close]", bad]))
        cfg = compose("bench", overrides=["accel=[bac]", "tasks=[drawer-close]", "with_success=false",
                                          "measurement_per_task=2",
                                          "calibration_per_task=1", "rounds=2", "num_threads=1",
                                          "frames_per_sequence=2",
                                          f"calibration_dir={tmp_path / 'cal'}", f"output_dir={tmp_path / 'out'}"])
        result = bench.run(cfg)
    rows = result["profiles"]
    assert list(rows) == ["none", "bac"]  # the baseline is always measured
    assert rows["none"]["speedup"] == 1.0 and rows["none"]["actions_identical"]
    assert rows["bac"]["flops_ratio"] < 1 and rows["bac"]["latency_samples"] == 2 * 2 * 2
    assert 0 < rows["bac"]["methods"]["head_cache"]["branch_updates_share"] < 1
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0
    assert "| `bac` | eager | head_cache |" in (tmp_path / "out" / "bench.md").read_text()


def test_visual_kv_reuse_on_an_unchanged_frame_matches_a_full_pass_and_threshold_above_one_is_exact():
    from vla_runtime.accel import visual_kv_reuse

    policy = untrained("dit")
    obs = observations(1)[0]
    policy.reset()
    baseline = policy.predict_chunk(obs).actions
    policy.reset()  # the same noise for the second call of each pair below

    handle = visual_kv_reuse.apply(policy, visual_kv_reuse.VisualKVReuseConfig(similarity=1.01))
    policy.reset()
    policy.predict_chunk(obs)
    policy.generator.manual_seed(policy.noise_seed)
    assert np.array_equal(policy.predict_chunk(obs).actions, baseline)
    handle.remove()

    handle = visual_kv_reuse.apply(policy, visual_kv_reuse.VisualKVReuseConfig(similarity=0.999, relevant_share=0.25))
    policy.reset()
    policy.predict_chunk(obs)
    policy.generator.manual_seed(policy.noise_seed)
    reused = policy.predict_chunk(obs).actions  # same frame: static tokens' cached K/V are exactly theirs
    hook = handle.info["hook"]
    visual = policy.structure.language_model.visual_token_span()[1]
    assert hook.reused_tokens == [0, visual - round(0.25 * visual)]
    np.testing.assert_allclose(reused, baseline, atol=1e-4)
    handle.remove()
    policy.reset()
    assert np.array_equal(policy.predict_chunk(obs).actions, baseline)
    with pytest.raises(ValueError, match="visual_kv_reuse cannot be combined with token_select"):
        compatible_methods(policy, load_profile(["token_select", "visual_kv_reuse"]))
    with pytest.raises(ValueError, match="visual_kv_reuse cannot run on ref_ar: its decode loop reads a KV cache"):
        compatible_methods(untrained("ar"), load_profile("vlacache"), "ref_ar")


@pytest.mark.parametrize(("text", "message"), [
    ("description: empty: nothing\nmethods: {}\n", "is not valid yaml: mapping values are not allowed here at line 1"),
    ("- head_cache\n", "must be a mapping with `description:` and `methods:"),
    ("methods: [head_cache]\n", "must be a mapping with `description:` and `methods:"),
])
def test_a_broken_profile_file_is_named_with_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"Profile '{path}' ({path}) {message}")):
        load_profile(str(path))


def test_a_ladder_folder_stands_for_its_profiles_in_name_order(tmp_path):
    front = tmp_path / "front"
    front.mkdir()
    for name in ("01_trial8.yaml", "00_trial29.yaml", "notes.md"):
        (front / name).write_text("methods: {}\n")
    assert ladder(["none", str(front), "bac"]) == ["none", str(front / "00_trial29.yaml"),
                                                   str(front / "01_trial8.yaml"), "bac"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no profile"):
        ladder([str(tmp_path / "empty")])


@pytest.mark.parametrize("name", [name for name in profile_names() if name.startswith("tuned_")])
def test_tuned_profiles_ship_their_calibration_with_the_checkpoint(name):
    """A tuned profile (`tuned_<policy config>[_<variant>]`) runs as it was confirmed: its artifacts are in its
    policy's checkpoint, nothing calibrates again (there are no calibration observations here to do it with)."""
    from importlib import resources

    from vla_runtime.cli.common import policy_spec
    from vla_runtime.policies import make_policy

    configs = [p.name.removesuffix(".yaml") for p in (resources.files("vla_runtime.configs") / "policy").iterdir()]
    tuned_for = max((c for c in configs if f"{name}_".startswith(f"tuned_{c}_")), key=len)
    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        cfg = compose("eval", overrides=[f"policy={tuned_for}"])
    policy_name, options = policy_spec(cfg)
    accelerator = Accelerator(make_policy(policy_name, **options), None, policy_name=policy_name)
    handle = accelerator.apply(load_profile(name))
    assert list(handle.profile.methods) == list(load_profile(name).methods)
    accelerator.remove()
