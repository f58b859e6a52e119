import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_runtime.cli.collect import collect
from vla_runtime.data import ActionChunkDataset, Episode, EpisodeStore, make_dataloader
from vla_runtime.data import episodes as episodes_module
from vla_runtime.evaluation.runner import run_episode
from vla_runtime.policies import make_policy


def collect_small(sim, root, tasks=("drawer-close-v3",), n=1):
    return collect(sim, list(tasks), n, root, max_attempts_per_task=3 * n, workers=1, progress=False)


def test_collect_then_read_is_exact(tmp_path, small_sim):
    kept = collect_small(small_sim, tmp_path / "ds")
    assert kept == {"drawer-close-v3": 1}
    (episode,) = list(EpisodeStore(tmp_path / "ds"))
    # Replaying the same train seed must reproduce every stored array bit for bit.
    with small_sim.make_env("drawer-close") as env:
        replay = run_episode(env, make_policy("expert", suite=small_sim), episode.seed, keep_trajectory=True).trajectory
    assert episode.seed == small_sim.seeds("train").seed(0)
    assert episode.task_id == small_sim.task_id("drawer-close-v3")
    assert EpisodeStore(tmp_path / "ds").meta["sim"] == small_sim.settings()  # what made the images
    assert EpisodeStore(tmp_path / "ds").suite_name == "metaworld"
    assert episode.success and episode.instruction == "close the drawer" and episode.task == "drawer-close-v3"
    assert np.array_equal(episode.images["corner4"], np.stack(replay.images["corner4"]))
    assert np.array_equal(episode.state, np.stack(replay.states))
    assert np.array_equal(episode.action, np.stack(replay.actions))
    assert np.array_equal(episode.timestamp, np.asarray(replay.timestamps))
    assert episode.images["corner4"].dtype == np.uint8 and episode.state.dtype == np.float32


def make_episode(seed=0, length=6):
    rng = np.random.default_rng(seed)
    return Episode(
        task="reach-v3", task_id=43, instruction="reach the goal with the hand", seed=seed, success=True,
        images={"corner4": rng.integers(0, 256, (length, 8, 8, 3), dtype=np.uint8)},
        state=rng.normal(size=(length, 4)).astype(np.float32),
        action=rng.uniform(-1, 1, (length, 4)).astype(np.float32),
        timestamp=np.arange(length) * 0.0125,
    )


def test_write_read_round_trip_and_batches(tmp_path):
    store = EpisodeStore(tmp_path, {"image_size": 8}, create=True)
    written = [make_episode(seed) for seed in (1, 2)]
    for episode in written:
        store.write(episode)
    for original, loaded in zip(written, store, strict=True):
        for key in ("state", "action", "timestamp"):
            assert np.array_equal(getattr(original, key), getattr(loaded, key))
        assert np.array_equal(original.images["corner4"], loaded.images["corner4"])
    with pytest.raises(FileExistsError):
        store.write(written[0])

    loader = make_dataloader(tmp_path, batch_size=4, chunk_size=3, shuffle=False)
    batch = next(iter(loader))
    images = batch["images"]["corner4"]
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8
    assert batch["state"].shape == (4, 4) and batch["actions"].shape == (4, 3, 4)
    assert batch["instruction"][0] == "reach the goal with the hand"
    assert torch.equal(batch["actions"][0], torch.from_numpy(written[0].action[0:3]))
    # The last frame's chunk runs past the end: the last action repeats, flagged as padding.
    dataset = ActionChunkDataset(tmp_path, chunk_size=3)
    last = dataset[5]
    assert last["action_is_pad"].tolist() == [False, True, True]
    assert torch.equal(last["actions"][2], torch.from_numpy(written[0].action[5]))
    assert len(dataset) == 12 and len(dataset.stats()["action"]["mean"]) == 4


def test_an_idle_tail_is_cut_to_max_idle_frames():
    moving, still = make_episode(length=10), make_episode(seed=1, length=4)
    moving.action[6:] = moving.action[9]  # frames 6-9: holding still until the episode's length runs out,
    moving.action[7:9] += 1e-5  # with a settling controller's residues
    still.action[:] = 0.5  # never moves: all four frames are its idle tail
    assert len(ActionChunkDataset([moving, still], chunk_size=3)) == 14
    cut = ActionChunkDataset([moving, still], chunk_size=3, max_idle_frames=1)
    assert len(cut) == 8  # frames 0-6 of the first (one of its idle tail), frame 0 of the second
    assert [t for e, t in cut._frames if e == 0] == list(range(7)) and [t for e, t in cut._frames if e == 1] == [0]
    assert torch.equal(cut[6]["actions"], torch.from_numpy(moving.action[6:9]))  # its chunk still shows the hold
    assert len(ActionChunkDataset([moving], chunk_size=3, max_idle_frames=0)) == 6


def test_early_frames_are_weighted_per_episode():
    data = ActionChunkDataset([make_episode(length=5), make_episode(seed=1, length=3)], chunk_size=2)
    assert data.early_frame_weights(2, 4.0).tolist() == [4, 4, 1, 1, 1, 4, 4, 1]
    assert data.early_frame_weights(0, 4.0).tolist() == [1.0] * 8


def test_episode_arrays_must_agree_in_length():
    with pytest.raises(ValueError, match="disagree in length"):
        Episode("reach-v3", 43, "x", 0, True, {"corner4": np.zeros((3, 8, 8, 3), np.uint8)},
                np.zeros((4, 4)), np.zeros((4, 4)), np.zeros(4))


def test_a_crash_while_writing_leaves_no_episode_and_resume_cleans_up(tmp_path, monkeypatch, small_sim):
    store = EpisodeStore(tmp_path, {"image_size": 8}, create=True)
    store.write(make_episode(1))
    real_rename = os.rename

    def die_before_rename(*args):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(episodes_module.os, "rename", die_before_rename)
    with pytest.raises(KeyboardInterrupt):
        store.write(make_episode(2))
    monkeypatch.setattr(episodes_module.os, "rename", real_rename)
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "episodes").iterdir())
    assert [e.seed for e in EpisodeStore(tmp_path)] == [1]
    assert EpisodeStore(tmp_path).remove_partial_episodes()
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "episodes").iterdir())


def test_collect_killed_mid_run_reads_clean_and_resumes(tmp_path):
    root = tmp_path / "ds"
    command = [sys.executable, "-m", "vla_runtime.cli.collect", "tasks=[drawer-open]", "episodes_per_task=3",
               "workers=1", "sim.image_size=64", f"output_dir={root}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        # dataset.json appears just after the directory: test for it, not for the directory.
        if (root / "dataset.json").exists() and len(EpisodeStore(root)) >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    store = EpisodeStore(root)
    complete = len(store)
    assert 1 <= complete < 3
    for episode in store:  # every listed episode reads whole
        assert episode.success and episode.length == len(episode.images["corner4"])
    subprocess.run(command, check=True, capture_output=True)
    seeds = sorted(a["seed"] for a in EpisodeStore(root).index())
    assert seeds == [0, 1, 2]


def test_resume_with_other_settings_and_damaged_metadata_are_clear_errors(tmp_path):
    EpisodeStore(tmp_path, {"image_size": 64}, create=True)
    with pytest.raises(ValueError, match="different simulator settings"):
        EpisodeStore(tmp_path, {"image_size": 128}, create=True)
    with pytest.raises(ValueError, match="does not say which suite"):  # converting or training from it would guess
        _ = EpisodeStore(tmp_path).suite_name
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset.json is not valid JSON"):
        EpisodeStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an episode dataset"):
        EpisodeStore(tmp_path / "nothing")
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="expected format"):
        EpisodeStore(tmp_path)


def test_rejected_seeds_survive_a_torn_line(tmp_path):
    store = EpisodeStore(tmp_path, {}, create=True)
    store.add_rejected("reach-v3", 4)
    with open(Path(tmp_path) / "rejected.txt", "a") as f:
        f.write("reach-v3 ")  # killed mid-line
    assert store.rejected() == {("reach-v3", 4)}


def test_an_unknown_dataset_format_is_named_and_lerobot_says_how_to_install():
    import importlib.util

    from vla_runtime.data.lerobot_format import check_format

    with pytest.raises(ValueError, match="Unknown dataset format 'parquet'; choose one of native, lerobot"):
        check_format("parquet")
    assert check_format("native") == "native"
    if importlib.util.find_spec("lerobot") is None:  # the main environment (Python 3.11)
        with pytest.raises(ImportError, match=r"format=lerobot needs the lerobot library .*setup.sh --lerobot"):
            check_format("lerobot")
    else:
        assert check_format("lerobot") == "lerobot"
