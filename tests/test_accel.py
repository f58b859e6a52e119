import numpy as np
import pytest
import torch

from vla_runtime.accel import layer_prune, parallel_decode
from vla_runtime.accel.calibration import load_artifact, save_artifact
from vla_runtime.hooks import HookRegistry, ModelHook, add_hook
from vla_runtime.policies.ref_vla.policy import random_init_policy
from vla_runtime.sim.metaworld import INSTRUCTIONS
from vla_runtime.types import Observation

TINY = dict(image_size=64, stem_channels=(16, 32), vit_hidden=32, vit_layers=1, vit_heads=2, lm_hidden=32,
            lm_layers=4, lm_heads=2, lm_kv_heads=2, lm_intermediate=64, dit_hidden=32, dit_layers=2, dit_heads=2,
            denoising_steps=3)


def observations(count=3):
    rng = np.random.default_rng(0)
    return [Observation({"corner4": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)},
                        rng.normal(size=4).astype(np.float32), text, 0.0)
            for text in ["open the drawer", "press the button from the top", "reach the goal with the hand"][:count]]


def actions(policy, obs_list):
    out = []
    for obs in obs_list:
        policy.reset()
        out.append(policy.predict_chunk(obs).actions)
    return np.stack(out)


def untrained(head, seed=0, **overrides):
    policy = random_init_policy(list(INSTRUCTIONS.values()), seed, head=head, **{"chunk_size": 4, **overrides}, **TINY)
    with torch.no_grad():  # adaLN-Zero starts the DiT at exactly zero output: wake it so actions depend on the LM
        for parameter in policy.structure.weights.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.2)
    return policy


@pytest.fixture(params=["dit", "ar"])
def policy(request):
    return untrained(request.param)


class Doubler(ModelHook):
    def post_forward(self, module, output):
        return output * 2


def test_hook_registry_chains_and_removes_exactly():
    layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    baseline = layer(x)
    remove_first = add_hook(layer, "first", Doubler())
    remove_second = add_hook(layer, "second", Doubler())
    assert torch.allclose(layer(x), 4 * baseline)
    remove_first()
    assert torch.allclose(layer(x), 2 * baseline)
    remove_second()
    assert "forward" not in layer.__dict__ and HookRegistry.find(layer) is None
    assert torch.equal(layer(x), baseline)
    with pytest.raises(ValueError, match="already"):
        add_hook(layer, "same", Doubler())
        add_hook(layer, "same", Doubler())


def test_layer_prune_zero_layers_is_the_baseline_and_remove_restores(policy, tmp_path):
    obs = observations()
    baseline = actions(policy, obs)
    artifact = layer_prune.calibrate(policy, obs)
    assert sorted(artifact["order"]) == [0, 1, 2, 3] and len(artifact["similarity"]) == 4
    path = save_artifact(tmp_path / "layer_prune.json", artifact)
    assert load_artifact(path, "layer_prune") == artifact

    handle = layer_prune.apply(policy, layer_prune.LayerPruneConfig(num_layers=0), artifact)
    assert np.array_equal(actions(policy, obs), baseline)
    handle.remove()

    handle = layer_prune.apply(policy, layer_prune.LayerPruneConfig(num_layers=2), artifact)
    assert len(policy.model.lm.layers) == 2 and handle.info["removed"] == sorted(artifact["order"][:2])
    assert policy.structure.language_model.layers is policy.model.lm.layers
    assert policy.structure.language_model.config.num_hidden_layers == 2
    pruned = actions(policy, obs)
    assert pruned.shape == baseline.shape and not np.array_equal(pruned, baseline)
    handle.remove()
    assert len(policy.model.lm.layers) == 4 and policy.structure.language_model.config.num_hidden_layers == 4
    assert np.array_equal(actions(policy, obs), baseline)


def test_greedy_layer_prune_calibration_and_bad_artifacts(tmp_path):
    policy = untrained("dit")
    artifact = layer_prune.calibrate(policy, observations(2), layer_prune.LayerPruneConfig(num_layers=2, greedy=True))
    assert len(artifact["order"]) == 2 and len(set(artifact["order"])) == 2
    with pytest.raises(ValueError, match="num_layers must be in"):
        too_many = layer_prune.LayerPruneConfig(num_layers=4)
        layer_prune.apply(policy, too_many, layer_prune.calibrate(policy, observations(1)))
    save_artifact(tmp_path / "other.json", {"method": "token_select"})
    with pytest.raises(ValueError, match="not 'layer_prune'"):
        load_artifact(tmp_path / "other.json", "layer_prune")
    with pytest.raises(FileNotFoundError, match="run the layer_prune calibration"):
        load_artifact(tmp_path / "missing.json", "layer_prune")


def test_jacobi_decoding_equals_greedy_and_removes_cleanly():
    policy = untrained("ar", seed=3)
    obs = observations()
    greedy = actions(policy, obs)
    handle = parallel_decode.apply(policy)
    jacobi = actions(policy, obs)
    passes = handle.info["hook"].passes
    handle.remove()
    assert np.array_equal(jacobi, greedy)
    assert policy.structure.ar_decoder.num_tokens == policy.config.num_action_tokens
    assert len(passes) == 3 and all(1 <= p <= policy.structure.ar_decoder.num_tokens - 1 for p in passes)
    assert np.array_equal(actions(policy, obs), greedy)


def test_jacobi_decoding_equals_greedy_on_the_trained_ref_ar():
    from vla_runtime.policies import make_policy
    policy = make_policy("ref_ar")
    rng = np.random.default_rng(1)
    obs = [Observation({"corner4": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)},
                       rng.normal(size=4).astype(np.float32), text, 0.0)
           for text in [INSTRUCTIONS[t] for t in ("drawer-open-v3", "window-open-v3", "door-open-v3")]]
    greedy = actions(policy, obs)
    handle = parallel_decode.apply(policy)
    jacobi = actions(policy, obs)
    handle.remove()
    assert np.array_equal(jacobi, greedy)

    def episode(policy):  # one reset, then consecutive calls: the warm start uses the previous call's tokens
        policy.reset()
        return np.stack([policy.predict_chunk(o).actions for o in obs])

    greedy_episode = episode(policy)
    for init in ("previous", "repeat_first"):
        handle = parallel_decode.apply(policy, parallel_decode.ParallelDecodeConfig(init=init))
        assert np.array_equal(episode(policy), greedy_episode)
        handle.remove()


def test_parallel_decode_needs_an_ar_policy():
    policy = untrained("dit")
    with pytest.raises(ValueError, match="parallel_decode needs the hook point 'ar_decoder'.*it declares: "
                                         "vision_encoder, preprocess_images, language_model, denoising_head"):
        parallel_decode.apply(policy)


def test_head_cache_refresh_every_step_is_the_baseline_and_remove_restores(tmp_path):
    from vla_runtime.accel import head_cache

    policy = untrained("dit")
    obs = observations()
    baseline = actions(policy, obs)
    handle = head_cache.apply(policy, head_cache.HeadCacheConfig(mode="static", interval=1))
    assert np.array_equal(actions(policy, obs), baseline)
    handle.remove()

    handle = head_cache.apply(policy, head_cache.HeadCacheConfig(mode="static", interval=2))
    cached = actions(policy, obs)
    branch = handle.info["branches"]["0.attn"]
    assert branch.computed == 3 * 2 and branch.reused == 3 * 1  # 3 steps: compute at 0 and 2, reuse at 1
    assert not np.array_equal(cached, baseline) and np.allclose(cached, baseline, atol=0.5)
    handle.remove()
    assert np.array_equal(actions(policy, obs), baseline)

    artifact = head_cache.calibrate(policy, obs)
    assert set(artifact["similarity"]) == {"0.attn", "0.mlp", "1.attn", "1.mlp"}
    assert np.allclose(np.diag(artifact["similarity"]["0.mlp"]), 1.0, atol=1e-5)
    assert load_artifact(save_artifact(tmp_path / "head_cache.json", artifact), "head_cache") == artifact
    handle = head_cache.apply(policy, head_cache.HeadCacheConfig(mode="bac", updates=3), artifact)
    assert np.array_equal(actions(policy, obs), baseline)  # 3 updates of 3 steps: nothing cached
    handle.remove()
    with pytest.raises(ValueError, match="needs a calibration artifact"):
        head_cache.apply(policy, head_cache.HeadCacheConfig(mode="bac"))


def test_head_cache_batched_conditioning_matches_per_step_conditioning():
    from vla_runtime.accel import head_cache

    policy = untrained("dit")
    obs = observations()
    results = {}
    for batched in (False, True):
        handle = head_cache.apply(policy, head_cache.HeadCacheConfig(interval=2, batch_conditioning=batched))
        results[batched] = actions(policy, obs)
        handle.remove()
    np.testing.assert_allclose(results[True], results[False], atol=1e-5)


def test_bac_dynamic_programming_and_bubbling_union():
    from vla_runtime.accel.head_cache import bac_schedule, choose_update_steps

    # Steps 0-2 look alike, 3-5 look alike: with two updates, update at 0 and 3.
    similarity = np.full((6, 6), 0.1)
    similarity[:3, :3] = similarity[3:, 3:] = 0.9
    np.fill_diagonal(similarity, 1.0)
    assert choose_update_steps(similarity, 2) == [0, 3]
    assert choose_update_steps(similarity, 6) == [0, 1, 2, 3, 4, 5]
    flat = np.ones((6, 6))
    artifact = {"method": "head_cache", "steps": 6,
                "similarity": {"0.attn": flat.tolist(), "0.mlp": similarity.tolist()}}
    schedule = bac_schedule(artifact, 2)
    assert schedule["0.mlp"] == {0, 3} and schedule["0.attn"] >= {0, 3}  # the MLP's steps bubbled up


def test_token_select_forward_without_dropping_matches_the_lm():
    from vla_runtime.accel.token_select import run_with_selection

    policy = untrained("dit")
    model = policy.model.eval()
    obs = observations(1)[0]
    images = policy.image_tensor(obs)
    from vla_runtime.policies.ref_vla.processing_ref_vla import tokenize

    ids, text_mask = tokenize(policy.tokenizer, [obs.instruction], policy.config.max_text_tokens)
    with torch.no_grad():
        prefix, mask = model.embed_prefix(images, ids, text_mask, torch.zeros(1, 4))
        reference = model.lm(inputs_embeds=prefix, attention_mask=mask).last_hidden_state
        everything = run_with_selection(policy.structure.language_model, prefix, mask, 2, (0, 64),
                                        lambda layer, hidden, rotary, m: torch.arange(64)[None])
    assert torch.allclose(everything, reference, atol=1e-5)


@pytest.mark.parametrize("strategy", ["efficientvla", "dart", "attention_topk", "random"])
def test_token_select_strategies(strategy):
    from vla_runtime.accel import token_select

    policy = untrained("dit")
    obs = observations()
    baseline = actions(policy, obs)
    keep_all = token_select.apply(policy, token_select.TokenSelectConfig(keep=64, strategy=strategy))
    assert np.array_equal(actions(policy, obs), baseline)
    keep_all.remove()

    handle = token_select.apply(policy, token_select.TokenSelectConfig(layer=1, keep=12, strategy=strategy))
    first = actions(policy, obs)
    again = actions(policy, obs)
    handle.remove()
    assert handle.info["hook"].kept_tokens == [12] * 6
    assert np.all(np.isfinite(first)) and not np.array_equal(first, baseline)
    assert np.array_equal(first, again)  # deterministic, random included (seeded per inference)
    assert np.array_equal(actions(policy, obs), baseline)


def test_token_select_selection_is_k_distinct_visual_tokens():
    from vla_runtime.accel.attention import allowed_attention
    from vla_runtime.accel.token_select import TokenSelectConfig, select_visual_tokens

    policy = untrained("dit")
    lm = policy.structure.language_model
    layer = lm.layers[1]
    hidden = torch.randn(2, 82, 32)
    rotary = lm.rotary_emb(hidden, torch.arange(82)[None].expand(2, -1))
    allowed = allowed_attention(torch.ones(2, 82, dtype=torch.long), hidden)
    for strategy in ("efficientvla", "dart", "attention_topk", "random"):
        chosen = select_visual_tokens(TokenSelectConfig(keep=10, strategy=strategy), layer, hidden, rotary, (0, 64),
                                      allowed, torch.Generator().manual_seed(0))
        assert chosen.shape == (2, 10)
        assert all(len(set(row.tolist())) == 10 and row.min() >= 0 and row.max() < 64 for row in chosen)
    with pytest.raises(ValueError, match="Unknown token_select strategy 'best'"):
        TokenSelectConfig(strategy="best")
