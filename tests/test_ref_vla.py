import json
import shutil

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from vla_runtime.cli import train as train_cli
from vla_runtime.data import EpisodeStore
from vla_runtime.policies import make_policy
from vla_runtime.policies.ref_vla.checkpoint import CheckpointError, load_model, save_model
from vla_runtime.policies.ref_vla.configuration_ref_vla import RefVLAConfig
from vla_runtime.policies.ref_vla.policy import RefVLAPolicy, random_init_policy
from vla_runtime.policies.ref_vla.processing_ref_vla import color_jitter, tokenize, train_instruction_tokenizer
from vla_runtime.sim import make_suite
from vla_runtime.sim.metaworld import INSTRUCTIONS
from vla_runtime.types import Observation

TINY = dict(image_size=64, stem_channels=(16, 32), vit_hidden=32, vit_layers=1, vit_heads=2, lm_hidden=32,
            lm_layers=2, lm_heads=2, lm_kv_heads=2, lm_intermediate=64, dit_hidden=32, dit_layers=2, dit_heads=2,
            denoising_steps=3, chunk_size=3)


@pytest.fixture(scope="module")
def tokenizer():
    return train_instruction_tokenizer(list(INSTRUCTIONS.values()))


def tiny_policy(tokenizer, head, **overrides):
    return random_init_policy(list(INSTRUCTIONS.values()), 0, head=head, **{**TINY, **overrides})


def observation(size=64, seed=0):
    rng = np.random.default_rng(seed)
    return Observation(images={"corner4": rng.integers(0, 256, (size, size, 3), dtype=np.uint8)},
                       state=rng.normal(size=4).astype(np.float32), instruction="open the drawer", timestamp=0.5)


def batch(config, tokenizer, size=2):
    ids, mask = tokenize(tokenizer, ["open the drawer", "press the button from the top"][:size], config.max_text_tokens)
    return (torch.rand(size, 1, 3, config.image_size, config.image_size) * 2 - 1, ids, mask, torch.randn(size, 4),
            torch.rand(size, config.chunk_size, 4) * 2 - 1, torch.zeros(size, config.chunk_size, dtype=torch.bool))


@pytest.mark.parametrize("head", ["dit", "ar"])
def test_forward_shapes_and_loss(tokenizer, head):
    policy = tiny_policy(tokenizer, head)
    model = policy.model
    images, ids, mask, state, actions, is_pad = batch(model.config, tokenizer)
    assert model.vision(images).shape == (2, 64, 32)  # 64 visual tokens per image
    loss = model.train().loss(images, ids, mask, state, actions, is_pad)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.lm.layers.parameters())
    chunk = policy.predict_chunk(observation())
    assert chunk.actions.shape == (3, 4) and np.all(np.abs(chunk.actions) <= 1) and chunk.t0 == 0.5
    structure = policy.structure
    lm = structure.language_model
    assert len(lm.layers) == 2 and lm.layers is model.lm.layers and lm.visual_token_span() == (0, 64)
    assert (structure.denoising_head is not None) == (head == "dit")
    assert (structure.ar_decoder is not None) == (head == "ar")
    if head == "dit":
        assert structure.denoising_head.steps == 3 and len(structure.denoising_head.blocks) == 2
        assert all(set(block.branches) == {"attn", "mlp"} for block in structure.denoising_head.blocks)
    else:
        assert structure.ar_decoder.num_tokens == model.config.num_action_tokens
    assert structure.weights is model and structure.checkpoint_dir is None  # random weights
    assert policy.spec.chunk_size == 3 and policy.spec.cameras == ("corner4",) and policy.spec.image_size == (64, 64)
    assert not policy.spec.privileged


def test_ar_greedy_decode_with_cache_matches_full_recompute(tokenizer):
    policy = tiny_policy(tokenizer, "ar")
    model = policy.model.eval()
    images, ids, mask, state, _, _ = batch(model.config, tokenizer, size=1)
    with torch.no_grad():
        cached = model.decode_loop(*model.embed_prefix(images, ids, mask, state))
        prefix, prefix_mask = model.embed_prefix(images, ids, mask, state)
        tokens = []
        for _ in range(model.config.num_action_tokens):  # no cache: the whole sequence every step
            extra = model.lm.embed_tokens(torch.tensor([tokens]).long() + model.first_bin_id) if tokens else None
            embeds = prefix if extra is None else torch.cat([prefix, extra], 1)
            full_mask = torch.cat([prefix_mask, prefix_mask.new_ones(1, len(tokens))], 1)
            hidden = model.lm(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
            tokens.append(int(model.action_logits(hidden[:, -1]).argmax(-1)))
    assert cached[0].tolist() == tokens


def test_action_bins_round_trip(tokenizer):
    model = tiny_policy(tokenizer, "ar").model
    actions = torch.linspace(-1, 1, 257)
    bins = model.actions_to_bins(actions)
    assert bins.min() == 0 and bins.max() == 255
    assert torch.all((model.bins_to_actions(bins) - actions).abs() <= 1 / 256 + 1e-6)


def test_shipped_ref_dit_loads_and_acts_on_a_meta_world_frame():
    suite = make_suite("metaworld")
    policy = make_policy("ref_dit", suite=suite)  # built from its checkpoint: the suite is not needed, nor refused
    suite.check_policy(policy, "ref_dit")
    with suite.make_env("drawer-close") as env:
        obs = env.reset(suite.seeds("eval").seed(0)).without_privileged_state()
    policy.reset()
    first = policy.predict_chunk(obs).actions
    policy.reset()
    assert first.shape == (8, 4) and np.all(np.abs(first) <= 1.0)
    assert np.array_equal(first, policy.predict_chunk(obs).actions)  # same noise seed, same actions
    assert policy.spec.actions_per_chunk == 4 and policy.spec.cameras == ("corner4",)
    assert policy.structure.checkpoint_dir is not None and (policy.structure.checkpoint_dir / "config.json").exists()
    with pytest.raises(ValueError, match="Policy 'ref_dit' .* does not fit suite 'metaworld' .*image size"):
        make_suite("metaworld", image_size=64).check_policy(policy, "ref_dit")


def test_large_config_is_smolvla_scale():
    suite = make_suite("metaworld")
    policy = make_policy("ref_dit_large", suite=suite)
    suite.check_policy(policy, "ref_dit_large")  # shaped for the suite's robot
    config = policy.config
    parameters = sum(p.numel() for p in policy.model.parameters())
    assert 400e6 <= parameters <= 500e6, parameters
    assert config.lm_layers == 16 and config.lm_hidden >= 960 and config.num_visual_tokens >= 64
    assert policy.predict_chunk(observation(128)).actions.shape == (config.chunk_size, 4)
    with pytest.raises(ValueError, match="Policy 'ref_dit_large' is built from a simulator suite; none was given"):
        make_policy("ref_dit_large")


@pytest.mark.parametrize("head", ["dit", "ar"])
def test_save_load_round_trip_gives_identical_actions(tmp_path, tokenizer, head):
    policy = tiny_policy(tokenizer, head)
    save_model(tmp_path, policy.model, policy.normalizer, tokenizer)
    loaded = RefVLAPolicy.from_checkpoint(tmp_path)
    policy.reset()
    loaded.reset()
    obs = observation()
    assert np.array_equal(policy.predict_chunk(obs).actions, loaded.predict_chunk(obs).actions)


def test_corrupt_checkpoints_are_clear_errors(tmp_path, tokenizer):
    policy = tiny_policy(tokenizer, "dit")
    good = tmp_path / "good"
    save_model(good, policy.model, policy.normalizer, tokenizer)

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "stats.json").unlink()
    with pytest.raises(CheckpointError, match="missing stats.json"):
        load_model(missing)

    not_safetensors = tmp_path / "pickle"
    shutil.copytree(good, not_safetensors)
    (not_safetensors / "model.safetensors").write_bytes(b"\x80\x04\x95 this is a pickle, not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(not_safetensors)

    wrong_shapes = tmp_path / "shapes"
    shutil.copytree(good, wrong_shapes)
    config = json.loads((wrong_shapes / "config.json").read_text())
    config["lm_intermediate"] = 48
    (wrong_shapes / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match config.json: .*mlp"):
        load_model(wrong_shapes)

    with pytest.raises(ValueError, match="Expected a uint8 64x64x3 image from camera 'corner4'"):
        policy.predict_chunk(observation(size=32))


def test_training_resumes_from_its_checkpoint(tmp_path):
    store = EpisodeStore(tmp_path / "data", {"sim": "metaworld", "image_size": 64}, create=True)
    rng = np.random.default_rng(0)
    for seed in range(2):
        from vla_runtime.data import Episode

        store.write(Episode("drawer-open-v3", 19, INSTRUCTIONS["drawer-open-v3"], seed, True,
                            {"corner4": rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)},
                            rng.normal(size=(10, 4)).astype(np.float32),
                            rng.uniform(-1, 1, (10, 4)).astype(np.float32), np.arange(10) * 0.0125))
    overrides = [f"dataset={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}", "batch_size=4", "max_steps=3",
                 "save_every_steps=2", "log_every_steps=1", "warmup_steps=1", "num_threads=1",
                 *[f"+model.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY.items()
                   if k not in ("chunk_size",)], "model.chunk_size=3"]
    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
        train_cli.train(cfg)
        state = json.loads((tmp_path / "run" / "train_state.json").read_text())
        assert state["step"] == 3 and (tmp_path / "run" / "loss.png").stat().st_size > 0
        first_weights = load_model(tmp_path / "run")[0].state_dict()
        with open(tmp_path / "run" / "train_log.jsonl", "a") as log:  # as if stopped after logging step 4 unsaved
            log.write(json.dumps({"step": 4, "loss": 1.0, "lr": 1e-4, "elapsed_s": 1.0}) + "\n")
        train_cli.train(compose("train", overrides=[*overrides, "max_steps=5"]))
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["step"] == 5
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # continued from step 3, not restarted; the unsaved step 4 logged once
    resumed = load_model(tmp_path / "run")[0].state_dict()
    assert any(not torch.equal(first_weights[k], resumed[k]) for k in first_weights)

    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        fine_tune = [*overrides, f"output_dir={tmp_path / 'fine_tune'}", f"init_from={tmp_path / 'run'}", "max_steps=1"]
        train_cli.train(compose("train", overrides=fine_tune))
    start = load_model(tmp_path / "run")[0].state_dict()
    tuned = load_model(tmp_path / "fine_tune")[0].state_dict()
    assert json.loads((tmp_path / "fine_tune" / "train_state.json").read_text())["step"] == 1
    assert any(not torch.equal(start[k], tuned[k]) for k in start)  # started from those weights, then moved

    # Training-time RTC from a checkpoint without it: the head's "given" flag added, learned from zero.
    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        rtc = [*fine_tune, f"output_dir={tmp_path / 'rtc'}", "model.rtc_max_delay=2"]
        train_cli.train(compose("train", overrides=rtc))
    model = load_model(tmp_path / "rtc")[0]
    assert model.config.rtc_max_delay == 2 and model.dit.given.abs().sum() > 0
    assert RefVLAPolicy.from_checkpoint(tmp_path / "rtc").spec.rtc_max_delay == 2


def test_training_on_a_missing_or_mismatched_dataset_is_a_clear_error(tmp_path):
    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        with pytest.raises(FileNotFoundError, match="is not an episode dataset"):
            train_cli.train(compose("train", overrides=[f"dataset={tmp_path / 'none'}",
                                                        f"output_dir={tmp_path / 'run'}"]))
        store = EpisodeStore(tmp_path / "small", {"sim": "metaworld", "image_size": 32}, create=True)
        from vla_runtime.data import Episode

        store.write(Episode("reach-v3", 43, INSTRUCTIONS["reach-v3"], 0, True,
                            {"corner4": np.zeros((3, 32, 32, 3), np.uint8)}, np.zeros((3, 4), np.float32),
                            np.zeros((3, 4), np.float32), np.arange(3) * 0.0125))
        # The model follows the dataset's cameras and image size unless its config names them.
        with pytest.raises(ValueError, match="the model needs 128x128 images from camera 'corner4'"):
            train_cli.train(compose("train", overrides=[f"dataset={tmp_path / 'small'}", "+model.image_size=128",
                                                        f"output_dir={tmp_path / 'run'}"]))


def test_a_dataset_rendered_with_a_crop_trains_a_model_that_declares_it(tmp_path):
    from vla_runtime.data import Episode

    crop = [0.25, 0.0, 0.75, 1.0]
    for name, meta in (("cropped", {"image_crop": crop}), ("whole", {})):
        store = EpisodeStore(tmp_path / name, {"sim": "metaworld", "image_size": 64, **meta}, create=True)
        store.write(Episode("reach-v3", 43, INSTRUCTIONS["reach-v3"], 0, True,
                            {"corner4": np.zeros((4, 64, 64, 3), np.uint8)}, np.zeros((4, 4), np.float32),
                            np.zeros((4, 4), np.float32), np.arange(4) * 0.0125))
    overrides = [f"dataset={tmp_path / 'cropped'}", f"output_dir={tmp_path / 'run'}", "batch_size=2", "max_steps=1",
                 "warmup_steps=1", "log_every_steps=1", "num_threads=1", "color_jitter=0.3",
                 "early_frames=1", "early_frame_weight=5",  # through the weighted sampler too
                 *[f"+model.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY.items()
                   if k not in ("chunk_size",)], "model.chunk_size=3"]
    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        train_cli.train(compose("train", overrides=overrides))
        # Resuming on data of another view, or naming a crop the data does not have: one clear error each.
        with pytest.raises(ValueError, match=r"its images show crop None .* reads crop \(0.25, 0.0, 0.75, 1.0\)"):
            train_cli.train(compose("train", overrides=[*overrides, f"dataset={tmp_path / 'whole'}"]))
        with pytest.raises(ValueError, match=r"model.image_crop=\[0.0, 0.0, 1.0, 1.0\], but .* crop \(0.25"):
            train_cli.train(compose("train", overrides=[*overrides, "+model.image_crop=[0.0,0.0,1.0,1.0]"]))
        with pytest.raises(ValueError, match=r"color_jitter must be in \[0, 1\)"):
            train_cli.train(compose("train", overrides=[*overrides, "color_jitter=1.5"]))
    policy = RefVLAPolicy.from_checkpoint(tmp_path / "run")
    assert policy.spec.image_crop == (0.25, 0.0, 0.75, 1.0)  # from the data; runners render or crop the same
    assert "crop [0.25, 0.0, 0.75, 1.0]" in policy.spec.describe()


def test_color_jitter_scales_brightness_contrast_and_saturation_per_image():
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(40, 200, (64, 3, 8, 8), generator=rng, dtype=torch.uint8)
    assert torch.equal(color_jitter(images, 0.0), images)
    jittered = color_jitter(images, 0.4, torch.Generator().manual_seed(1))
    assert jittered.dtype == torch.uint8 and jittered.shape == images.shape
    assert torch.equal(jittered, color_jitter(images, 0.4, torch.Generator().manual_seed(1)))  # seeded
    ratio = jittered.float().mean(dim=(1, 2, 3)) / images.float().mean(dim=(1, 2, 3))
    assert ratio.min() < 0.85 and ratio.max() > 1.15 and ratio.min() > 0.5  # per image, within the factors' reach
    assert color_jitter(images, 0.1).float().sub(images.float()).abs().mean() < \
        color_jitter(images, 0.4).float().sub(images.float()).abs().mean()


def test_two_cameras_give_two_token_blocks_and_need_both_images(tokenizer):
    """LIBERO-style: agentview and wrist, each 64 tokens through the shared encoder, in camera order."""
    policy = tiny_policy(tokenizer, "dit", cameras=("corner4", "wrist"))
    model = policy.model.eval()
    assert policy.spec.cameras == ("corner4", "wrist") and model.visual_token_span == (0, 128)
    obs = observation()
    with pytest.raises(ValueError, match="from camera 'wrist'"):
        policy.predict_chunk(obs)
    wrist = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    obs.images["wrist"] = wrist
    images = policy.image_tensor(obs)
    assert images.shape == (1, 2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.vision(images)
        alone = model.vision(images[:, 1:])
    # batched and single-image passes round differently (by ~1e-6 on some builds): a loose match, not bits
    assert tokens.shape == (1, 128, 32) and torch.allclose(tokens[:, 64:], alone, atol=1e-4)
    assert policy.predict_chunk(obs).actions.shape == (3, 4)


def test_single_camera_checkpoints_load_with_the_old_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"head": "dit", "camera": "corner4", "text_vocab_size": 10}))
    assert RefVLAConfig.from_json(tmp_path / "config.json").cameras == ("corner4",)


def test_checkpoint_keys_follow_this_transformers_vit_layout():
    """ref_vla checkpoints load under transformers 5.5 (lerobot's pin) and 5.2x, whose ViT modules differ."""
    from vla_runtime.transformers_compat import match_vit_layout

    old = {"vision.vit.encoder.layer.3.attention.attention.query.weight": 1,
           "vision.vit.encoder.layer.3.output.dense.bias": 2, "lm.layers.3.mlp.down_proj.weight": 3}
    new = {"vision.vit.layers.3.attention.q_proj.weight": 1, "vision.vit.layers.3.mlp.fc2.bias": 2,
           "lm.layers.3.mlp.down_proj.weight": 3}
    assert match_vit_layout(old, new) == new and match_vit_layout(new, old) == old
    assert match_vit_layout(new, new) is new


def test_a_saved_model_reloads_for_another_chunk_length_and_nothing_else(tmp_path, tokenizer):
    policy = tiny_policy(tokenizer, "dit", chunk_size=4)
    save_model(tmp_path, policy.model, policy.normalizer, policy.tokenizer)
    model, _, _ = load_model(tmp_path, {"chunk_size": 16, "actions_per_chunk": 8})
    assert model.config.chunk_size == 16 and model.dit.position.shape[1] == 16
    # The ends of the resampled position embedding are the saved ones; every other weight is unchanged.
    saved = policy.model.dit.position[0]
    assert torch.allclose(model.dit.position[0, [0, -1]], saved[[0, -1]])
    assert torch.equal(model.dit.blocks[0].mlp[0].weight, policy.model.dit.blocks[0].mlp[0].weight)
    with pytest.raises(CheckpointError, match="only chunk_size, actions_per_chunk"):
        load_model(tmp_path, {"lm_layers": 2})
