"""Forecasting head caches, step reduction and weight quantization (issue 32)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_accel import TINY, actions, observations, untrained

from vla_runtime.accel import head_cache, quantize, step_reduction
from vla_runtime.accel.forecast import extrapolate
from vla_runtime.accel.profiles import Accelerator, Profile
from vla_runtime.policies.ref_vla.policy import random_init_policy
from vla_runtime.sim.metaworld import INSTRUCTIONS
from vla_runtime.types import DenoisingHead, PolicyStructure


def test_extrapolation_is_exact_on_polynomials_of_its_order_with_uneven_steps():
    def parabola(s):
        return torch.tensor([1.0 + 2.0 * s - 0.5 * s * s])

    history = [(s, parabola(s)) for s in (0, 1, 3)]
    assert torch.allclose(extrapolate(history, 5), parabola(5))
    assert torch.allclose(extrapolate(history[1:], 4), torch.tensor([parabola(1) + 1.5 * (parabola(3) - parabola(1))]))
    assert extrapolate(history[-1:], 7) is history[-1][1]  # order 0: the last value as it is


class Velocity(torch.nn.Module):
    """A flow-matching step whose velocity is a polynomial in t of `degree`, minus `pull` times the state;
    counts its calls."""

    def __init__(self, degree: int, pull: float = 0.0):
        super().__init__()
        self.degree = degree
        self.pull = pull
        self.calls = 0

    def forward(self, x, t, cognition):
        self.calls += 1
        tau = t[:, None, None]
        return cognition[:, None, :] * (1 + tau + 3 * tau ** self.degree) - self.pull * x


def loop(step, steps: int, grid: list[int] | None = None) -> torch.Tensor:
    """The Euler loop x <- x + v / steps from t = 0, over every step or only `grid`'s (each as long as the steps
    up to the next)."""
    grid = grid or list(range(steps))
    x, cognition = torch.zeros(1, 2, 3), torch.ones(1, 3)
    for start, end in zip(grid, [*grid[1:], steps], strict=True):
        x = x + step(x, torch.full((1,), start / steps), cognition) * (end - start) / steps
    return x


def toy(degree: int, steps: int = 8, pull: float = 0.0, **head) -> SimpleNamespace:
    module = Velocity(degree, pull)
    return SimpleNamespace(structure=PolicyStructure(denoising_head=DenoisingHead(step=module, steps=steps,
                                                                                  blocks=[], **head)))


def test_a_fixed_schedule_is_the_shorter_euler_loop_and_remove_restores():
    policy = toy(degree=2, pull=0.5)
    step = policy.structure.denoising_head.step
    baseline = loop(step, 8)
    handle = step_reduction.apply(policy, step_reduction.StepReductionConfig(mode="schedule", steps=4))
    step.calls = 0
    reduced = loop(step, 8)
    assert step.calls == 4 and handle.stats()["real_steps_share"] == 0.5
    assert not torch.allclose(reduced, baseline, atol=1e-3)
    handle.remove()
    assert torch.equal(loop(step, 8), baseline)
    assert torch.allclose(reduced, loop(step, 8, grid=[0, 2, 4, 6]), atol=1e-6)


@pytest.mark.parametrize("order", [1, 2])
def test_extrapolation_skips_steps_and_is_exact_up_to_its_order(order):
    for degree, exact in ((order, True), (order + 1, False)):
        policy = toy(degree)
        step = policy.structure.denoising_head.step
        baseline = loop(step, 8)
        handle = step_reduction.apply(policy, step_reduction.StepReductionConfig(
            mode="extrapolate", order=order, max_skips=2, last_real=1))
        step.calls = 0
        reduced = loop(step, 8)
        # order + 1 real steps first, then at most 2 skipped in a row, the last step real.
        real = {1: [0, 1, 4, 7], 2: [0, 1, 2, 5, 7]}[order]
        assert step.calls == len(real) and handle.info["skipper"].skipped == 8 - len(real)
        assert torch.allclose(reduced, baseline, atol=1e-5) == exact
        handle.remove()


def test_the_gate_keeps_computing_while_the_forecast_misses():
    policy = toy(degree=3)
    step = policy.structure.denoising_head.step
    baseline = loop(step, 8)
    for tolerance, skips in ((1e-9, 0), (10.0, 2)):  # 10: steps 3 and 5, after errors at 2 and 4
        handle = step_reduction.apply(policy, step_reduction.StepReductionConfig(
            mode="extrapolate", order=1, max_skips=1, tolerance=tolerance))
        reduced = loop(step, 8)
        assert handle.info["skipper"].skipped == skips
        assert torch.equal(reduced, baseline) == (skips == 0)
        handle.remove()


def test_step_reduction_refuses_what_it_cannot_forecast():
    with pytest.raises(ValueError, match="step_reduction mode must be one of schedule, extrapolate"):
        step_reduction.StepReductionConfig(mode="skip")
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        step_reduction.StepReductionConfig(mode="extrapolate", order=3)
    prefixed = toy(1, is_prefix=lambda args, kwargs: False)
    with pytest.raises(ValueError, match="also runs the prefix"):
        step_reduction.apply(prefixed, step_reduction.StepReductionConfig())


def test_step_reduction_on_a_policy_runs_its_schedule_and_remove_restores():
    policy = untrained("dit")  # 3 denoising steps
    obs = observations()
    baseline = actions(policy, obs)
    handle = step_reduction.apply(policy, step_reduction.StepReductionConfig(steps=3))
    assert np.array_equal(actions(policy, obs), baseline)  # every step real: the baseline
    handle.remove()
    handle = step_reduction.apply(policy, step_reduction.StepReductionConfig(steps=2))
    reduced = actions(policy, obs)
    assert handle.stats()["real_steps_share"] == pytest.approx(2 / 3)
    assert not np.array_equal(reduced, baseline) and np.allclose(reduced, baseline, atol=0.5)
    handle.remove()
    assert np.array_equal(actions(policy, obs), baseline)


def eight_step_policy():
    policy = random_init_policy(list(INSTRUCTIONS.values()), 0, head="dit", chunk_size=4,
                                **{**TINY, "denoising_steps": 8})
    with torch.no_grad():
        for parameter in policy.structure.weights.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.2)
    return policy


def test_head_cache_forecasts_skipped_steps_and_its_gate_forces_updates():
    policy = eight_step_policy()
    obs = observations()
    baseline = actions(policy, obs)
    results, shares = {}, {}
    for order, tolerance in ((0, None), (1, None), (2, None), (1, 1e-9)):
        handle = head_cache.apply(policy, head_cache.HeadCacheConfig(interval=2, order=order, tolerance=tolerance))
        results[order, tolerance] = actions(policy, obs)
        shares[order, tolerance] = handle.stats()["branch_updates_share"]
        handle.remove()
        assert np.array_equal(actions(policy, obs), baseline)
    for key in ((0, None), (1, None), (2, None)):
        assert shares[key] == 0.5 and not np.array_equal(results[key], baseline)
    assert not np.array_equal(results[1, None], results[0, None])
    # Gate below any error: once an error was measured (the third computed step, 4), every step computes.
    assert shares[1, 1e-9] == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="tolerance gates a forecast"):
        head_cache.HeadCacheConfig(order=0, tolerance=0.1)


def test_quantize_swaps_the_linears_keeps_the_hook_points_and_restores_exactly():
    policy = untrained("dit")
    obs = observations()
    baseline = actions(policy, obs)
    handle = quantize.apply(policy, quantize.QuantizeConfig(parts=["language_model", "head", "vision"]))
    quantized = actions(policy, obs)
    layers = handle.stats()["quantized_layers"]
    linears = [m for m in policy.structure.weights.modules() if type(m) is torch.nn.Linear]
    assert layers > 0 and not any(type(m) is torch.nn.Linear for m in policy.structure.denoising_head.step.modules()
                                  if m is not policy.structure.denoising_head.step)
    assert not np.array_equal(quantized, baseline) and np.allclose(quantized, baseline, atol=0.2)
    handle.remove()
    assert np.array_equal(actions(policy, obs), baseline)
    assert len([m for m in policy.structure.weights.modules() if type(m) is torch.nn.Linear]) == len(linears) + layers

    named = torch.nn.Linear(4, 4)  # a hook point that is itself a linear stays float
    structure = PolicyStructure(vision_encoder=torch.nn.Sequential(named, torch.nn.Linear(4, 4)), weights=named)
    holder = SimpleNamespace(structure=structure)
    handle = quantize.apply(holder, quantize.QuantizeConfig(parts=["vision"]))
    assert structure.vision_encoder[0] is named and type(structure.vision_encoder[1]) is not torch.nn.Linear
    handle.remove()
    assert type(structure.vision_encoder[1]) is torch.nn.Linear


def test_quantize_names_bad_settings_and_missing_parts():
    with pytest.raises(ValueError, match="Unknown quantize scheme 'int4'.*choose one of dynamic_int8"):
        quantize.QuantizeConfig(scheme="int4")
    with pytest.raises(ValueError, match="parts must be a non-empty list of language_model, head, vision"):
        quantize.QuantizeConfig(parts=["lm"])
    with pytest.raises(ValueError, match="it has no head to quantize"):
        quantize.apply(untrained("ar"), quantize.QuantizeConfig(parts=["head"]))


def test_quantize_composes_with_a_calibrated_cache_and_step_reduction(tmp_path):
    policy = untrained("dit")
    obs = observations()
    baseline = actions(policy, obs)
    profile = Profile("test", {"quantize": {"parts": ["language_model", "head"]},
                               "head_cache": {"mode": "bac", "updates": 2, "order": 1},
                               "step_reduction": {"steps": 2}})
    accelerator = Accelerator(policy, lambda: observations(2), tmp_path, policy_name="ref_dit")
    handle = accelerator.apply(profile)
    assert [h.method for h in handle.handles] == ["quantize", "head_cache", "step_reduction"]
    accelerated = actions(policy, obs)
    assert np.allclose(accelerated, baseline, atol=0.5) and not np.array_equal(accelerated, baseline)
    assert len(list(tmp_path.glob("head_cache-*.json"))) == 1  # calibrated on the quantized weights
    accelerator.remove()
    assert np.array_equal(actions(policy, obs), baseline)


def test_torchao_schemes_quantize_and_restore_exactly():
    pytest.importorskip("torchao")
    policy = untrained("dit")
    obs = observations(1)
    baseline = actions(policy, obs)
    handle = quantize.apply(policy, quantize.QuantizeConfig(scheme="int8_weight_only", parts=["head"]))
    quantized = actions(policy, obs)
    assert not np.array_equal(quantized, baseline) and np.allclose(quantized, baseline, atol=0.2)
    handle.remove()
    assert np.array_equal(actions(policy, obs), baseline)


def test_a_quantized_linear_counts_the_flops_of_a_float_one():
    from torch.utils.flop_counter import FlopCounterMode

    encoder = torch.nn.Sequential(torch.nn.Linear(16, 8))
    handle = quantize.apply(SimpleNamespace(structure=PolicyStructure(vision_encoder=encoder)),
                            quantize.QuantizeConfig(parts=["vision"]))
    with FlopCounterMode(display=False) as counter:
        encoder(torch.randn(4, 16))
    assert type(encoder[0]) is not torch.nn.Linear and counter.get_total_flops() == 2 * 4 * 16 * 8
    handle.remove()
