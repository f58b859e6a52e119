"""LeRobot policies and datasets: tiny SmolVLA / ACT built offline, saved and loaded as `policy=lerobot`, the
acceleration methods on the structures of SmolVLA, pi0 / pi0.5 and diffusion, LeRobotDataset written and read
back, an evaluation saved as a LeRobotDataset that replays to the actions it executed.

lerobot needs Python >= 3.12: these tests run in `.venv-lerobot` (`bash scripts/setup.sh --lerobot`; CI runs
them there with VLA_REQUIRE_LEROBOT=1, where a missing lerobot fails instead of skipping)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("VLA_REQUIRE_LEROBOT"):
    import lerobot  # noqa: F401
else:
    pytest.importorskip("lerobot", reason="lerobot needs Python >= 3.12: run these in .venv-lerobot")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402

from vla_runtime.accel import (  # noqa: E402
    action_reuse,
    head_cache,
    layer_prune,
    quantize,
    step_reduction,
    token_select,
    vision_resolution,
    visual_kv_reuse,
)
from vla_runtime.accel.profiles import compatible_methods, load_profile  # noqa: E402
from vla_runtime.data.episodes import Episode  # noqa: E402
from vla_runtime.data.lerobot_format import EPISODES_META, write_lerobot  # noqa: E402
from vla_runtime.data.sources import logged_episodes  # noqa: E402
from vla_runtime.execution import ExecConfig, apply_execution  # noqa: E402
from vla_runtime.policies.lerobot.policy import RUNTIME_META, LeRobotPolicy  # noqa: E402
from vla_runtime.policies.lerobot.smolvlm import random_smolvla  # noqa: E402
from vla_runtime.policies.registry import make_policy  # noqa: E402
from vla_runtime.sim import make_suite  # noqa: E402
from vla_runtime.types import Observation  # noqa: E402

INSTRUCTION = "close the drawer"


def save(folder: Path, policy, preprocessor, postprocessor, control_dt: float | None = 0.0125) -> Path:
    for part in (policy, preprocessor, postprocessor):
        part.save_pretrained(folder)
    if control_dt:
        (folder / RUNTIME_META).write_text(json.dumps({"control_dt": control_dt}))
    return folder


@pytest.fixture(scope="module")
def smolvla_dir(tmp_path_factory) -> Path:
    """A tiny SmolVLA for Meta-World's robot (camera corner4 at 128 px, 4-D state and action)."""
    folder = tmp_path_factory.mktemp("smolvla")
    metaworld = make_suite("metaworld")
    torch.manual_seed(0)  # the same random weights every run: no test sits on a lucky draw
    parts = random_smolvla(folder / "vlm", [metaworld.instruction(t) for t in metaworld.tasks()], "tiny",
                           ("corner4",), (128, 128), 4, 4, chunk_size=8, n_action_steps=4)
    return save(folder, *parts)


@pytest.fixture()
def smolvla(smolvla_dir) -> LeRobotPolicy:
    return make_policy("lerobot", path=str(smolvla_dir))


def observation(seed: int = 0, state_dim: int = 4) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation({"corner4": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)},
                       rng.standard_normal(state_dim).astype(np.float32), INSTRUCTION, 0.0)


def another_scene(obs: Observation) -> Observation:
    """`obs` with each image half black, half white: another scene for a reuse gate. Not another noise image: a
    random encoder's features of two noise images sit near the gate's 0.99 threshold (0.9912 once: a flaky test);
    of this frame, 0.82-0.85 (ACT's ResNet, seeds 0-2)."""
    def split(image: np.ndarray) -> np.ndarray:
        half = image.shape[0] // 2
        return np.concatenate([np.zeros_like(image[:half]), np.full_like(image[half:], 255)])

    return dataclasses.replace(obs, images={name: split(image) for name, image in obs.images.items()})


def chunk(policy, obs) -> np.ndarray:
    policy.reset()
    return policy.predict_chunk(obs).actions


def test_a_saved_smolvla_loads_with_its_processors_and_declares_its_spec(smolvla, smolvla_dir):
    spec = smolvla.spec
    assert (spec.cameras, spec.image_size, spec.state_dim, spec.action_dim) == (("corner4",), (128, 128), 4, 4)
    assert (spec.chunk_size, spec.actions_per_chunk, spec.control_dt) == (8, 4, 0.0125)
    make_suite("metaworld").check_policy(smolvla, "lerobot")  # fits the robot it was built for
    obs = observation()
    actions = chunk(smolvla, obs)
    assert actions.shape == (8, 4) and np.isfinite(actions).all()
    np.testing.assert_array_equal(chunk(smolvla, obs), actions)  # reset: the same noise again
    # The loaded weights and processors are the saved ones: LeRobot's own pipeline on the same noise agrees.
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    reference = SmolVLAPolicy.from_pretrained(str(smolvla_dir)).eval()
    pre, post = make_pre_post_processors(reference.config, pretrained_path=str(smolvla_dir))
    noise = torch.randn((1, 8, reference.config.max_action_dim), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = post(reference.predict_action_chunk(pre(smolvla.batch(obs)), noise=noise))[0].numpy()
    np.testing.assert_allclose(actions, expected, atol=1e-6)


def test_a_policy_for_another_robot_is_refused_naming_both(tmp_path):
    parts = random_smolvla(tmp_path / "vlm", [INSTRUCTION], "tiny", ("agentview", "wrist"), (64, 64), 8, 7,
                           chunk_size=4, n_action_steps=2)
    policy = make_policy("lerobot", path=str(save(tmp_path, *parts, control_dt=None)))
    assert policy.spec.control_dt is None and policy.spec.cameras == ("agentview", "wrist")
    with pytest.raises(ValueError, match=r"action dim 7 vs 4; state dim 8 vs 4; cameras \['agentview', 'wrist'\]"):
        make_suite("metaworld").check_policy(policy, "lerobot")
    with pytest.raises(ValueError, match="needs policy.path"):
        make_policy("lerobot")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json there"):
        make_policy("lerobot", path=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="policy.path=nobody/no_such_policy: not a local folder"):
        make_policy("lerobot", path="nobody/no_such_policy")
    with pytest.raises(ValueError, match="uint8 \\(64, 64, 3\\) image from camera 'agentview'"):
        policy.predict_chunk(observation(state_dim=8))


def test_act_loads_from_its_folder(tmp_path):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors

    config = ACTConfig(input_features={"observation.images.corner4": PolicyFeature(FeatureType.VISUAL, (3, 128, 128)),
                                       "observation.state": PolicyFeature(FeatureType.STATE, (4,))},
                       output_features={"action": PolicyFeature(FeatureType.ACTION, (4,))}, device="cpu",
                       pretrained_backbone_weights=None, chunk_size=10, n_action_steps=5, dim_model=64,
                       n_heads=2, dim_feedforward=128, n_encoder_layers=1, n_decoder_layers=1, use_vae=False)
    stats = {key: {"mean": torch.zeros(4), "std": torch.ones(4)} for key in ("observation.state", "action")}
    stats["observation.images.corner4"] = {"mean": torch.zeros(3, 1, 1), "std": torch.ones(3, 1, 1)}
    torch.manual_seed(0)  # the random ResNet the similarity below is measured with
    policy = make_policy("lerobot", path=str(save(tmp_path, ACTPolicy(config), *make_pre_post_processors(
        config, dataset_stats=stats))))
    assert (policy.spec.chunk_size, policy.spec.actions_per_chunk) == (10, 5)
    baseline = chunk(policy, observation())
    assert baseline.shape == (10, 4)
    # Its ResNet's last stage is the vision encoder: action_reuse's gate sees the same frame as the same.
    handle = action_reuse.apply(policy, action_reuse.ActionReuseConfig())
    np.testing.assert_array_equal(chunk(policy, observation()), baseline)
    assert handle.reuse_gate._token_similarity(observation()) == pytest.approx(1.0)
    assert handle.reuse_gate._token_similarity(another_scene(observation())) < 0.95
    handle.remove()
    with pytest.raises(ValueError, match="head_cache needs the hook point 'denoising_head'"):
        head_cache.apply(policy, head_cache.HeadCacheConfig())


def test_diffusion_loads_from_its_folder_declares_its_unet_and_one_with_an_observation_history_is_refused(tmp_path):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors

    def saved(folder: Path, n_obs_steps: int) -> Path:
        config = DiffusionConfig(
            input_features={"observation.images.corner4": PolicyFeature(FeatureType.VISUAL, (3, 128, 128)),
                            "observation.state": PolicyFeature(FeatureType.STATE, (4,))},
            output_features={"action": PolicyFeature(FeatureType.ACTION, (4,))}, device="cpu",
            pretrained_backbone_weights=None, use_group_norm=True, crop_shape=None, horizon=16, n_action_steps=8,
            down_dims=(32, 64), diffusion_step_embed_dim=32, num_inference_steps=5, n_obs_steps=n_obs_steps)
        unit = {"mean": torch.zeros(4), "std": torch.ones(4), "min": -torch.ones(4), "max": torch.ones(4)}
        stats = {"observation.state": unit, "action": unit, "observation.images.corner4": {
            "mean": torch.zeros(3, 1, 1), "std": torch.ones(3, 1, 1)}}
        return save(folder, DiffusionPolicy(config), *make_pre_post_processors(config, dataset_stats=stats))

    policy = make_policy("lerobot", path=str(saved(tmp_path / "one", n_obs_steps=1)))
    assert (policy.spec.chunk_size, policy.spec.actions_per_chunk) == (8, 8)  # the horizon's executed part
    actions = chunk(policy, observation())
    assert actions.shape == (8, 4) and np.isfinite(actions).all()
    np.testing.assert_array_equal(chunk(policy, observation()), actions)  # its noise comes from our generator
    with pytest.raises(ValueError, match="reads the last 2 observations"):
        make_policy("lerobot", path=str(saved(tmp_path / "two", n_obs_steps=2)))

    # Its UNet's residual blocks are cached across denoising steps; the step comes from the scheduler's timestep.
    head = policy.structure.denoising_head
    assert len(head.blocks) == 4 and head.steps == 5  # two down levels, the middle, one up level
    handle = head_cache.apply(policy, head_cache.HeadCacheConfig(interval=2))
    cached = chunk(policy, observation())
    branches = handle.info["branches"].values()
    assert sum(b.computed for b in branches) == 3 * 8 and sum(b.reused for b in branches) == 2 * 8  # steps 0, 2, 4
    assert not np.array_equal(cached, actions)
    handle.remove()
    np.testing.assert_array_equal(chunk(policy, observation()), actions)
    # Its epsilon is extrapolated over the scheduler's steps: 0, 1 real, 2 forecast, 3 real, the last real.
    handle = step_reduction.apply(policy, step_reduction.StepReductionConfig(mode="extrapolate", order=1))
    reduced = chunk(policy, observation())
    assert handle.info["skipper"].skipped == 1 and not np.array_equal(reduced, actions)
    handle.remove()
    np.testing.assert_array_equal(chunk(policy, observation()), actions)
    gate = action_reuse.apply(policy, action_reuse.ActionReuseConfig()).reuse_gate
    np.testing.assert_array_equal(chunk(policy, observation()), actions)  # a gate: the chunk is the policy's own
    assert gate._token_similarity(observation()) == pytest.approx(1.0)
    assert gate._token_similarity(observation(2)) < 0.99
    with pytest.raises(ValueError, match="layer_prune needs the hook point 'language_model'"):
        layer_prune.calibrate(policy, [observation()])


def method_round_trip(policy, method: str, layers_kept: int, tokens_kept: int) -> None:
    """Applies `method` to a tiny policy of 4 VLM layers: the actions change (action_reuse, a gate for the
    control loop, leaves them and tells frames apart), and removing it restores them bit for bit."""
    obs = observation(1)
    baseline = chunk(policy, obs)
    if method == "head_cache_static":
        handle = head_cache.apply(policy, head_cache.HeadCacheConfig(interval=2))
    elif method == "head_cache_bac":
        handle = head_cache.apply(policy, head_cache.HeadCacheConfig(mode="bac", updates=3),
                                  head_cache.calibrate(policy, [obs]))
    elif method == "head_cache_forecast":
        handle = head_cache.apply(policy, head_cache.HeadCacheConfig(interval=2, order=1))
    elif method == "quantize":  # the VLM's and the expert's layers cast their inputs to their linears' dtype
        handle = quantize.apply(policy, quantize.QuantizeConfig(parts=["language_model", "head", "vision"]))
        assert handle.stats()["quantized_layers"] > 0
    elif method == "layer_prune":
        calibration = layer_prune.calibrate(policy, [obs])
        assert len(calibration["similarity"]) == 4 and all(-1 <= s <= 1 for s in calibration["similarity"])
        handle = layer_prune.apply(policy, layer_prune.LayerPruneConfig(num_layers=4 - layers_kept), calibration)
        # A VLM layer leaves with the expert layer that reads its keys / values.
        structure = policy.structure
        assert len(structure.language_model.layers) == len(structure.denoising_head.blocks) == layers_kept
    elif method == "token_select":
        handle = token_select.apply(policy, token_select.TokenSelectConfig(layer=0, keep=tokens_kept, strategy="dart"))
    elif method == "vision_resolution":  # the tiny SigLIP takes 32 px, in blocks of 16 (patch 8, shuffle 2)
        handle = vision_resolution.apply(policy, vision_resolution.VisionResolutionConfig(size=16))
    else:
        handle = action_reuse.apply(policy, action_reuse.ActionReuseConfig())
    accelerated = chunk(policy, obs)
    if method == "action_reuse":
        np.testing.assert_array_equal(accelerated, baseline)
        assert handle.reuse_gate._token_similarity(obs) == pytest.approx(1.0)
        assert handle.reuse_gate._token_similarity(another_scene(obs)) < 0.95
    else:
        assert not np.array_equal(accelerated, baseline)
    if method.startswith("head_cache"):
        assert sum(branch.reused for branch in handle.info["branches"].values()) > 0
    if method == "token_select":
        assert handle.info["hook"].kept_tokens == [tokens_kept]
    handle.remove()
    np.testing.assert_array_equal(chunk(policy, obs), baseline)


@pytest.mark.parametrize("method", ["head_cache_static", "head_cache_bac", "head_cache_forecast", "quantize",
                                    "layer_prune", "token_select", "action_reuse", "vision_resolution"])
def test_acceleration_methods_change_smolvla_and_their_removal_restores_it_exactly(smolvla, method):
    method_round_trip(smolvla, method, layers_kept=2, tokens_kept=2)  # layers leave in aligned pairs


def test_smolvla_layer_removal_needs_no_attention_renumbering(smolvla):
    """pi0's layer removal (hooks.drop_layers) renumbers each kept layer's `self_attn.layer_idx`, since its Gemma
    indexes the KV cache by it; SmolVLA's removal does not, because its VLM-with-expert indexes layers and cache by
    loop position. The actions with the stale indices equal those with renumbered ones: should LeRobot start
    reading `layer_idx`, this fails and SmolVLA's removal must renumber too."""
    obs = observation(1)
    undo = smolvla.structure.language_model.remove_layers([0, 1])  # what layer_prune calls
    kept = [*smolvla.structure.language_model.layers, *smolvla.structure.denoising_head.step.lm_expert.layers]
    stale = [layer.self_attn.layer_idx for layer in kept]
    assert stale == [2, 3, 2, 3]  # the kept layers still carry their old indices
    pruned = chunk(smolvla, obs)
    try:
        for index, layer in enumerate(kept):
            layer.self_attn.layer_idx = index % 2
        np.testing.assert_array_equal(chunk(smolvla, obs), pruned)
    finally:
        for layer, index in zip(kept, stale, strict=True):
            layer.self_attn.layer_idx = index
        undo()


def test_compiled_smolvla_gives_its_eager_actions_and_removal_restores_eager(smolvla):
    obs = observation(1)
    eager = chunk(smolvla, obs)
    handle = apply_execution(smolvla, ExecConfig("compile"))
    try:
        # SigLIP, the connector and the VLM-with-expert (its prefix pass and every flow step)
        assert handle.info["compiled_units"] == ["SmolVLMVisionTransformer", "SmolVLMConnector",
                                                 "SmolVLMWithExpertModel"]
        np.testing.assert_allclose(chunk(smolvla, obs), eager, atol=1e-4)
    finally:
        handle.remove()
    np.testing.assert_array_equal(chunk(smolvla, obs), eager)


def test_methods_that_do_not_apply_to_smolvla_are_refused_with_the_reason(smolvla):
    with pytest.raises(ValueError, match="aligned groups of 2"):
        layer_prune.apply(smolvla, layer_prune.LayerPruneConfig(num_layers=1),
                          layer_prune.calibrate(smolvla, [observation()]))
    with pytest.raises(ValueError, match="selected before it: layer=0 and strategy dart or random"):
        token_select.apply(smolvla, token_select.TokenSelectConfig(layer=2, strategy="efficientvla"))
    with pytest.raises(ValueError, match="multiple of 16 px .* up to 32, got 24"):
        vision_resolution.apply(smolvla, vision_resolution.VisionResolutionConfig(size=24))
    with pytest.raises(ValueError, match="visual_kv_reuse.*drives its LM layers itself"):
        compatible_methods(smolvla, load_profile("vlacache"), "smolvla")
    full = [method.name for method in compatible_methods(smolvla, load_profile("full"), "smolvla")]
    assert full == ["layer_prune", "head_cache", "action_reuse"]


def test_vla_tune_searches_smolvla_with_the_settings_it_takes(smolvla):
    """Token selection runs on SmolVLA only before its LM (layer 0, dart): vla-tune's space proposes it so."""
    from vla_runtime.accel.profiles import Accelerator, Profile
    from vla_runtime.evaluation.tuning import propose, searchable

    class AllOn:
        def suggest_categorical(self, name, choices):
            return True if list(choices) == [False, True] else choices[-1]

        def suggest_int(self, name, low, high, step=1):
            return high

        def suggest_float(self, name, low, high):
            return high

    accelerator = Accelerator(smolvla, None)
    methods = searchable(accelerator)
    # visual_kv_reuse replaces an LM forward; step_reduction cannot forecast a VLM-with-expert's output
    assert methods == ["quantize", "layer_prune", "token_select", "head_cache"]
    proposal = propose(AllOn(), accelerator, methods)
    assert proposal["token_select"] == {"keep": 48, "strategy": "dart", "layer": 0}
    accelerator.check(Profile("proposed", proposal))


@pytest.fixture(scope="module", params=["pi0", "pi05"])
def pi(request) -> LeRobotPolicy:
    """A tiny pi0 / pi0.5 with random weights for Meta-World's robot (built by patching lerobot's internals)."""
    torch.manual_seed(0)
    return make_policy("pi0_random", suite=make_suite("metaworld"), kind=request.param, size="tiny", chunk_size=8,
                       n_action_steps=4)


@pytest.mark.parametrize("method", ["head_cache_bac", "quantize", "layer_prune", "token_select", "action_reuse"])
def test_acceleration_methods_change_pi0_and_their_removal_restores_it_exactly(pi, method):
    assert pi.structure.available() == ["vision_encoder", "preprocess_images", "visual_tokens", "language_model",
                                        "denoising_head"]
    # token_select before the LM: its prefix fills the KV cache every expert layer reads; 4 of 16 tokens
    method_round_trip(pi, method, layers_kept=3, tokens_kept=4)


def test_visual_kv_reuse_fills_pi0s_prefix_cache_for_every_token(pi):
    """The same frame twice: the second prefix pass reuses the keys / values of every visual token but the
    relevant quarter, and the expert reading that cache gives the full pass's actions."""
    obs = observation(1)
    pi.reset()
    full = [pi.predict_chunk(obs).actions for _ in range(2)]
    handle = visual_kv_reuse.apply(pi, visual_kv_reuse.VisualKVReuseConfig(similarity=0.99, relevant_share=0.25))
    pi.reset()
    reused = [pi.predict_chunk(obs).actions for _ in range(2)]
    assert handle.info["hook"].reused_tokens == [0, 12]
    np.testing.assert_array_equal(reused[0], full[0])
    np.testing.assert_allclose(reused[1], full[1], atol=1e-5)
    assert not np.array_equal(full[0], full[1])  # the second call's noise differs: not a vacuous comparison
    handle.remove()
    with pytest.raises(ValueError, match="fills a KV cache that its action expert reads"):
        token_select.apply(pi, token_select.TokenSelectConfig(layer=1, strategy="efficientvla"))
    with pytest.raises(ValueError, match="vision_resolution.*does not declare"):
        vision_resolution.apply(pi, vision_resolution.VisionResolutionConfig(size=16))


def synthetic_episode(seed: int, length: int = 6, image_size: int = 32) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(task="drawer-close-v3", task_id=5, instruction=INSTRUCTION, seed=seed, success=True,
                   images={"corner4": rng.integers(0, 256, (length, image_size, image_size, 3), dtype=np.uint8)},
                   state=rng.standard_normal((length, 4)).astype(np.float32),
                   action=rng.uniform(-1, 1, (length, 4)).astype(np.float32),
                   timestamp=np.arange(length) / 80.0)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_lerobot_dataset_round_trips(tmp_path, workers):
    episodes = [synthetic_episode(seed, length=5 + seed) for seed in range(3)]
    root = write_lerobot(episodes, tmp_path / "data", fps=80, use_videos=False, workers=workers)
    assert [e["seed"] for e in json.loads((root / EPISODES_META).read_text())["episodes"]] == [0, 1, 2]
    back = list(logged_episodes(root))
    assert len(back) == 3
    for original, read in zip(episodes, back, strict=True):
        assert (read.task, read.seed, read.instruction) == (original.task, original.seed, INSTRUCTION)
        np.testing.assert_array_equal(read.images["corner4"], original.images["corner4"])  # PNG: lossless
        np.testing.assert_array_equal(read.state, original.state)
        np.testing.assert_array_equal(read.action, original.action)
        np.testing.assert_allclose(read.timestamp, original.timestamp, atol=1e-6)
    assert not list(tmp_path.glob(".data.shard*"))  # the shards are gone once joined


def test_an_eval_saved_as_a_lerobot_dataset_replays_to_the_actions_it_executed(tmp_path, smolvla_dir):
    from vla_runtime.cli import eval as eval_cli
    from vla_runtime.cli.replay import run as replay_run

    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        cfg = compose("eval", overrides=["policy=lerobot", f"policy.path={smolvla_dir}", "tasks=[drawer-close-v3]",
                                         "episodes_per_task=1", "workers=1", "save_episodes=true", "format=lerobot",
                                         "lerobot_video=false", "sim.default_max_steps=12",
                                         f"output_dir={tmp_path / 'eval'}"])
    eval_cli.run(cfg)
    dataset = tmp_path / "eval" / "lerobot"
    assert json.loads((dataset / "meta" / "info.json").read_text())["total_episodes"] == 1
    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        cfg = compose("replay", overrides=[f"source={dataset}", "policy=lerobot", f"policy.path={smolvla_dir}",
                                           f"output_dir={tmp_path / 'replay'}", "num_threads=1"])
    replay_run(cfg)
    report = json.loads((tmp_path / "replay" / "replay.json").read_text())
    assert report["steps"] == 12
    assert report["profiles"]["none"]["action_mse_vs_logged"] < 1e-10


def test_vla_convert_writes_a_lerobot_dataset_and_refuses_to_overwrite_one(tmp_path):
    import subprocess
    import sys

    from vla_runtime.data.episodes import EpisodeStore

    store = EpisodeStore(tmp_path / "native", make_suite("metaworld").settings(), create=True)
    episodes = [synthetic_episode(seed) for seed in range(2)]
    for episode in episodes:
        store.write(episode)
    command = [sys.executable, "-m", "vla_runtime.cli.convert", f"source={tmp_path / 'native'}",
               f"output_dir={tmp_path / 'lerobot'}", "use_videos=false", "workers=1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    back = list(logged_episodes(tmp_path / "lerobot"))
    assert [e.seed for e in back] == [0, 1]
    np.testing.assert_array_equal(back[1].images["corner4"], episodes[1].images["corner4"])
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "LeRobot refuses to overwrite" in again.stderr


def test_vla_collect_format_lerobot_writes_both_datasets(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vla_runtime.cli.collect", "format=lerobot", "lerobot_video=false",
                           "tasks=[drawer-close-v3]", "episodes_per_task=1", "workers=1",
                           f"output_dir={tmp_path / 'demos'}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    native = list(logged_episodes(tmp_path / "demos"))
    lerobot = list(logged_episodes(tmp_path / "demos" / "lerobot"))
    assert len(native) == len(lerobot) == 1 and lerobot[0].task == "drawer-close-v3"
    np.testing.assert_array_equal(lerobot[0].action, native[0].action)
    np.testing.assert_array_equal(lerobot[0].images["corner4"], native[0].images["corner4"])


def test_the_gpu_table_rehearses_the_lerobot_policies_on_the_cpu(tmp_path):
    """scripts/device_bench.py's LeRobot rows at tiny sizes (issue 29): LeRobot's own predict_action_chunk beside
    ours, every backend, the near-lossless and fastest profiles; one camera (SmolVLA) and two (pi0)."""
    from test_device_bench import rehearse

    results = rehearse(tmp_path, ["SmolVLA", "pi0 (2 cameras)"])
    for label in ("SmolVLA", "pi0 (2 cameras)"):
        rows = [row for row in results["rows"] if row["subject"] == label and row["status"] == "ok"]
        assert rows[0]["profile"] == "lerobot" and all(row["speedup_vs_lerobot"] > 0 for row in rows)
    assert results["subjects"]["pi0 (2 cameras)"]["cameras"] == ["agentview", "robot0_eye_in_hand"]


def test_a_trained_smolvla_fine_tunes_to_a_longer_chunk_although_its_vlm_folder_is_gone(tmp_path, smolvla_dir):
    """training.py --init-from: lerobot-train fine-tunes a saved SmolVLA to 16 actions per chunk. Its config and
    tokenizer name the VLM folder it was trained with (the shipped one: the GPU machine's /tmp), gone here; the run
    re-points them at the VLM copied beside it."""
    import shutil

    from safetensors.torch import load_file

    from vla_runtime.policies.lerobot.training import train_smolvla

    moved = Path(shutil.copytree(smolvla_dir, tmp_path / "moved"))
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "vlm_model_name": "/gone/vlm"}))
    processor = json.loads((moved / "policy_preprocessor.json").read_text())
    for step in processor["steps"]:
        if step["registry_name"] == "tokenizer_processor":
            step["config"]["tokenizer_name"] = "/gone/vlm"
    (moved / "policy_preprocessor.json").write_text(json.dumps(processor))
    dataset = write_lerobot([synthetic_episode(seed, length=12, image_size=128) for seed in range(2)],
                            tmp_path / "data", fps=80, use_videos=False, workers=1)
    final = train_smolvla(dataset, tmp_path / "run", [INSTRUCTION], 1 / 80, minutes=0, size="tiny", batch_size=4,
                          num_workers=0, chunk_size=16, n_action_steps=8, probe_steps=3, init_from=moved)
    tuned = make_policy("lerobot", path=str(final))
    assert (tuned.spec.chunk_size, tuned.spec.actions_per_chunk) == (16, 8)
    assert chunk(tuned, observation()).shape == (16, 4)
    assert json.loads((final / RUNTIME_META).read_text())["init_from"] == str(moved)
    assert not (tmp_path / "run" / "init").exists()  # the re-pointed copy goes once the run is done
    # Fine-tuned, not trained afresh: every weight has its saved shape and the whole moved by a few lr steps only.
    before, after = load_file(moved / "model.safetensors"), load_file(final / "model.safetensors")
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    change = sum(float((after[k].float() - before[k].float()).norm() ** 2) for k in before) ** 0.5
    size = sum(float(before[k].float().norm() ** 2) for k in before) ** 0.5
    assert 0 < change < 0.1 * size


def test_fine_tuning_from_a_folder_that_is_not_a_trained_smolvla_is_one_line_and_exit_2(tmp_path, capsys):
    from vla_runtime.policies.lerobot.training import main

    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), str(tmp_path / "out"), "--minutes", "1", "--init-from", str(tmp_path)])
    assert stop.value.code == 2 and "not a SmolVLA trained this way" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written
