"""The video bundle that carries a dataset to a GPU machine (scripts/device_train.py)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from vla_runtime.data import Episode, EpisodeStore
from vla_runtime.sim.metaworld import INSTRUCTIONS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_train.py"


@pytest.fixture(scope="module")
def device_train():
    spec = importlib.util.spec_from_file_location("device_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundle_round_trip_keeps_arrays_and_nearly_the_pixels(tmp_path, device_train):
    store = EpisodeStore(tmp_path / "data", {"sim": "metaworld", "image_size": 64, "cameras": ["corner4", "wrist"]},
                         create=True)
    # Smooth images (a moving gradient), like rendered scenes; video coding of pure noise is not the use.
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    frames = np.stack([np.stack([np.roll(ramp, 3 * t)[None, :].repeat(64, 0),
                                 ramp[:, None].repeat(64, 1), np.full((64, 64), 80.0)], -1) for t in range(12)])
    rng = np.random.default_rng(0)
    images = {"corner4": frames.astype(np.uint8), "wrist": frames[:, ::-1].astype(np.uint8)}
    written = Episode("reach-v3", 43, INSTRUCTIONS["reach-v3"], 7, True, images,
                      rng.normal(size=(12, 4)).astype(np.float32), rng.uniform(-1, 1, (12, 4)).astype(np.float32),
                      np.arange(12) * 0.0125)
    store.write(written)
    device_train.pack(tmp_path / "data", tmp_path / "bundle")
    (episode,), meta = device_train.unpack(tmp_path / "bundle")
    assert meta["instructions"] == INSTRUCTIONS  # the suite's, as vla-train
    assert meta["robot"] == {"control_dt": 0.0125, "state_dim": 4, "action_dim": 4, "cameras": ["corner4", "wrist"],
                             "image_size": 64, "image_crop": None}
    assert (episode.task, episode.seed, episode.instruction) == ("reach-v3", 7, written.instruction)
    for key in ("state", "action", "timestamp"):
        np.testing.assert_array_equal(getattr(episode, key), getattr(written, key))
    for camera in ("corner4", "wrist"):
        error = np.abs(episode.images[camera].astype(int) - written.images[camera].astype(int))
        assert episode.images[camera].shape == (12, 64, 64, 3) and error.mean() < 3


def test_device_config_rejects_unknown_settings(device_train):
    cfg, model_options = device_train.load_config(["model=ref_ar", "lr=1.0e-4"])
    assert cfg["lr"] == 1e-4 and model_options["head"] == "ar"
    with pytest.raises(SystemExit, match="unknown setting 'learning_rate'"):
        device_train.load_config(["learning_rate=1"])


def test_runs_come_back_in_pieces_with_fp32_weights(tmp_path, device_train, monkeypatch):
    """send-back (GPU machine) -> receive (here): weights through fp16, no optimizer state, files under the limit."""
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run" / "ref_dit_x"
    run.mkdir(parents=True)
    weights = {"w": torch.randn(300, 300), "steps": torch.arange(3)}
    save_file(weights, run / "model.safetensors")
    save_file({"m": torch.zeros(10)}, run / "optimizer.safetensors")
    (run / "config.json").write_text('{"head": "dit"}')
    monkeypatch.setattr(device_train, "PART_BYTES", 100_000)  # several pieces from a small run
    device_train.send_back([run], tmp_path / "out")
    parts = sorted((tmp_path / "out").iterdir())
    assert len(parts) > 1 and all(part.stat().st_size <= 100_000 for part in parts)
    device_train.receive(tmp_path / "out", tmp_path / "back")
    back = tmp_path / "back" / "ref_dit_x"
    assert sorted(p.name for p in back.iterdir()) == ["config.json", "model.safetensors"]
    restored = load_file(back / "model.safetensors")
    assert restored["w"].dtype == torch.float32 and torch.equal(restored["steps"], weights["steps"])
    assert torch.equal(restored["w"], weights["w"].half().float())  # exactly the fp16 rounding, nothing else
