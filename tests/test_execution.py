"""Execution backends: compiled policies match eager ones, compile only while warming up, switch between
warmed-up profiles without compiling, and refuse what needs a GPU on the CPU."""

import numpy as np
import pytest
import torch
from test_accel import actions, observations, untrained

from vla_runtime.accel.profiles import Accelerator, load_profile, load_profiles
from vla_runtime.evaluation.speed import _latency_round, entries
from vla_runtime.execution import CompileStats, ExecConfig, apply_execution, compile_units, exec_config
from vla_runtime.hooks import HookRegistry


@pytest.fixture(scope="module")
def policy():
    return untrained("dit")


def test_compiled_none_matches_eager_and_compiles_nothing_after_its_warm_up(policy, tmp_path):
    obs = observations(3)
    eager = actions(policy, obs)
    accelerator = Accelerator(policy, lambda: observations(2), tmp_path, execution=ExecConfig("compile"))
    handle = accelerator.apply(load_profile("none"))
    assert handle.execution.info["compiled_units"] == ["VisionEncoder", "LlamaModel", "DiTActionHead"]
    compiled = actions(policy, obs)  # the warm-up: compiles
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
    assert not np.array_equal(compiled[0], compiled[1])  # different observations: not a constant
    frames = CompileStats.frames()
    for _ in range(50 // len(obs)):
        actions(policy, obs)
    assert CompileStats.frames() == frames  # static shapes: no recompilation
    accelerator.remove()
    assert "forward" not in vars(policy.model.dit) and "forward" not in vars(policy.model.lm)
    np.testing.assert_array_equal(actions(policy, obs), eager)  # removal restores eager exactly


def test_a_switch_between_warmed_up_profiles_compiles_nothing(policy, tmp_path):
    """The governor's case: each profile compiled once ahead (its own hooks, its own graphs), then switching
    back and forth reuses them."""
    obs = observations(2)
    accelerator = Accelerator(policy, lambda: observations(2), tmp_path, execution=ExecConfig("compile"))
    profiles = [load_profile("none"), load_profile("bac")]
    results = {}
    for profile in profiles:  # warm-up, ahead of the control loop
        accelerator.apply(profile)
        results[profile.name] = actions(policy, obs)
    frames, fallbacks = CompileStats.frames(), CompileStats.fallbacks()
    for profile in profiles * 2:
        accelerator.apply(profile)
        np.testing.assert_allclose(actions(policy, obs), results[profile.name], atol=1e-5)
    assert CompileStats.frames() == frames
    assert CompileStats.fallbacks() == fallbacks == 0  # and none of it ran eager for want of graphs
    accelerator.remove()


def test_the_control_nodes_profiles_are_compiled_before_its_loop_and_the_governor_switches_without_compiling(
        policy):
    from vla_runtime.ros.profile_manager import ProfileManager

    obs = observations(1)[0]
    manager = ProfileManager(policy, "ref_dit", "none", ["none", "bac"], 50.0, lambda: observations(2),
                             ExecConfig("compile"))
    assert manager.active == "none" and manager.handle.execution is not None
    frames = CompileStats.frames()
    for spec in ("bac", "none", "bac"):  # what the governor does between two ticks
        manager.set(spec)
        policy.reset()
        policy.predict_chunk(obs)
    assert CompileStats.frames() == frames
    manager.accelerator.remove()


def test_a_method_that_replaces_the_lm_forward_gets_the_lm_layers_compiled_beneath_it(policy, tmp_path):
    """token_select runs its own loop over the LM's layers: they are compiled one by one, the selection
    (Python, data-dependent) is not."""
    accelerator = Accelerator(policy, lambda: observations(2), tmp_path)
    accelerator.apply(load_profile(["token_select", "step_reduction"], {"token_select": {"layer": 1, "keep": 4}}))
    try:
        units = [name for name, _ in compile_units(policy.model.lm)]
        assert units == ["", "embed_tokens", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "rotary_emb"]
        # step_reduction's hook on the head calls through to its forward: the head is compiled whole beneath it.
        assert [name for name, _ in compile_units(policy.model.dit)] == [""]
    finally:
        accelerator.remove()


def test_cuda_graphs_need_a_cuda_device_and_bad_settings_are_named(policy):
    with pytest.raises(ValueError, match="cuda_graphs needs the policy on a CUDA device; it is on cpu"):
        apply_execution(policy, ExecConfig("cuda_graphs"))
    with pytest.raises(ValueError, match="cuda_graphs needs the policy on a CUDA device"):
        apply_execution(policy, ExecConfig("cuda_graphs", dtype="bf16"))
    with pytest.raises(ValueError, match="Unknown execution backend 'tensorrt'; choose one of eager, compile, "
                                         "cuda_graphs"):
        exec_config("tensorrt")
    with pytest.raises(ValueError, match="Unknown dtype 'int8'"):
        exec_config({"backend": "compile", "dtype": "int8"})
    assert "forward" not in vars(policy.model.dit)  # nothing was applied


def test_bench_rows_are_every_profile_on_every_backend_with_eager_none_as_the_baseline():
    rows = entries(load_profiles(["bac"]), [exec_config("compile")])
    assert [row.name for row in rows] == ["none", "bac", "none@compile", "bac@compile"]
    rows = entries(load_profiles(["bac"]), [exec_config("eager"), exec_config({"backend": "compile",
                                                                                  "freezing": True})])
    assert [row.name for row in rows] == ["none", "bac", "none@compile-frozen", "bac@compile-frozen"]


def test_latency_rounds_take_eager_turns_per_sequence_and_compiled_turns_per_round():
    none, bac, none_c, bac_c = entries(load_profiles(["bac"]), [exec_config("compile")])
    rows = [none, bac, none_c, bac_c]
    half = entries(load_profiles(["bac"]), [exec_config({"backend": "eager", "dtype": "bf16"})])[-1]
    assert _latency_round([none, half], 2, 0) == [(none, [0]), (none, [1]), (half, [0, 1])]  # casts when applied
    first, second = (_latency_round(rows, 3, index) for index in range(2))
    names = [(row.name, indices) for row, indices in first]
    assert names == [("none", [0]), ("bac", [0]), ("bac", [1]), ("none", [1]), ("none", [2]), ("bac", [2]),
                     ("none@compile", [0, 1, 2]), ("bac@compile", [0, 1, 2])]
    assert [(row.name, indices) for row, indices in second][:2] == [("bac", [0]), ("none", [0])]
    assert [row.name for row, _ in second][-2:] == ["bac@compile", "none@compile"]
    for blocks in (first, second):  # every row measures every sequence once per round
        for row in rows:
            assert sorted(i for r, indices in blocks if r is row for i in indices) == [0, 1, 2]


@pytest.mark.parametrize("profile", ["none", "bac", "vlacache", "flashvla", "layer_prune", "token_select",
                                     "action_reuse"])
def test_bf16_runs_under_each_method_and_removal_gives_float32_back_exactly(policy, profile, tmp_path):
    """What a GPU's bf16 rows run, on the CPU: half-precision weights under autocast beneath every method's hooks,
    actions near float32's, and the float32 weights swapped back exactly."""
    obs = observations(3)
    float32 = Accelerator(policy, lambda: observations(2), tmp_path)
    float32.apply(load_profile(profile))
    reference = actions(policy, obs)
    float32.remove()
    eager = actions(policy, obs)
    half = Accelerator(policy, lambda: observations(2), tmp_path, execution=ExecConfig(dtype="bf16"))
    handle = half.apply(load_profile(profile))
    weights = policy.structure.weights
    assert {p.dtype for p in weights.parameters()} == {torch.bfloat16}
    assert handle.execution.info["parked_bytes"] == sum(p.numel() * 4 for p in weights.parameters()) + sum(
        b.numel() * 4 for b in weights.buffers() if b.is_floating_point())
    bf16 = actions(policy, obs)
    half.remove()
    assert np.all(np.isfinite(bf16)) and not np.array_equal(bf16, reference)  # it ran, in another precision
    np.testing.assert_allclose(bf16, reference, atol=0.15)
    assert {p.dtype for p in weights.parameters()} == {torch.float32}
    assert "predict_chunk" not in vars(policy)
    np.testing.assert_array_equal(actions(policy, obs), eager)


def test_a_backend_that_cannot_apply_leaves_no_method_applied(policy, tmp_path):
    """cuda_graphs on a CPU policy is refused after the profile's methods went on: they come off again (a
    refused backend used to leave bac's hooks on, and every later profile ran with them)."""
    obs = observations(2)
    eager = actions(policy, obs)
    accelerator = Accelerator(policy, lambda: observations(2), tmp_path,
                              execution=ExecConfig("cuda_graphs", dtype="bf16"))
    with pytest.raises(ValueError, match="cuda_graphs needs the policy on a CUDA device"):
        accelerator.apply(load_profile("bac"))
    assert HookRegistry.find(policy.model.dit) is None or not HookRegistry.find(policy.model.dit).hooks
    assert {p.dtype for p in policy.structure.weights.parameters()} == {torch.float32}
    np.testing.assert_array_equal(actions(policy, obs), eager)


def test_process_wide_compile_state_is_bounded_and_restored(policy, tmp_path):
    """The recompile limit a compiled backend raises is put back when it is removed; the per-config code copies
    are a bounded cache."""
    from vla_runtime.execution import _code_copy

    before = torch._dynamo.config.recompile_limit
    handle = apply_execution(policy, ExecConfig("compile"))
    assert torch._dynamo.config.recompile_limit >= 64
    handle.remove()
    assert torch._dynamo.config.recompile_limit == before
    assert _code_copy.cache_info().maxsize == 256
