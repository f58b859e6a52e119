"""Train the reference VLAs on a GPU machine that has no simulator, no zarr and no hydra.

A vla-collect dataset (zarr, ~290 MB for MT10) is too large to send to a lent GPU machine, so it
travels as a bundle: one H.264 4:4:4 video per episode (CRF 12 by default, mean pixel error ~1.3/255,
~22 MB for MT10) plus the states, actions and metadata in npz/json. On the GPU machine the bundle is decoded
into in-memory episodes and trained with the same loop and configs as `vla-train`.

    # here (needs the project's venv: zarr + imageio-ffmpeg)
    python scripts/device_train.py pack data/mt10 .devdata/mt10
    # there (python3 with torch, transformers, tokenizers, safetensors, opencv, pyyaml); several runs can
    # share the GPU side by side; then the weights come back as fp16 pieces (a device call returns at most
    # 8 files of 16 MiB) and become fp32 again here
    python3 scripts/device_train.py train .devdata/mt10 /tmp/run/ref_dit model=ref_dit batch_size=256 max_minutes=6
    python3 scripts/device_train.py send-back $OUT /tmp/run/ref_dit
    python scripts/device_train.py receive <files_at> outputs/gpu_run

A SmolVLA trained by lerobot-train (the `lerobot` family; the machine needs lerobot and its missing
dependencies carried as wheels, see README, LeRobot): the bundle becomes a LeRobotDataset there, then
    python3 scripts/device_train.py lerobot .devdata/mt10 /tmp/run/smolvla --minutes 6 -- --batch-size 128
    python3 scripts/device_train.py send-back $OUT /tmp/run/smolvla/run/checkpoints/last/pretrained_model

LIBERO's two cameras and longer episodes need `pack --crf 20` to fit (220 LIBERO-Object episodes: 32.5 MB,
mean pixel error 1.9/255).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VIDEO_CRF = 12  # the default; LIBERO's two cameras and longer episodes need ~20 to fit the 64 MiB a call takes


def pack(source: Path, bundle: Path, crf: int = VIDEO_CRF) -> None:
    import imageio.v3 as iio
    from tqdm.auto import tqdm

    from vla_runtime.data.episodes import EpisodeStore
    from vla_runtime.policies.ref_vla.policy import recorded_robot

    store = EpisodeStore(source)
    # As vla-train: the instructions of every task of the dataset's suite, and its robot.
    suite, robot = recorded_robot(store)
    instructions = {task: suite.instruction(task) for task in suite.tasks()}
    (bundle / "video").mkdir(parents=True, exist_ok=True)
    episodes, arrays = [], {}
    for episode in tqdm(store, total=len(store), desc="pack", unit="episode"):
        for camera, frames in episode.images.items():
            iio.imwrite(bundle / "video" / f"{episode.name}.{camera}.mp4", frames, extension=".mp4",
                        codec="libx264", fps=round(1 / suite.spec.control_dt), pixelformat="yuv444p",
                        macro_block_size=1, output_params=["-crf", str(crf), "-preset", "slow"])
        episodes.append({"name": episode.name, "task": episode.task, "task_id": episode.task_id,
                         "instruction": episode.instruction, "seed": episode.seed,
                         "success": episode.success, "cameras": sorted(episode.images), "length": episode.length})
        for key in ("state", "action", "timestamp"):
            arrays[f"{episode.name}/{key}"] = getattr(episode, key)
    np.savez_compressed(bundle / "arrays.npz", **arrays)
    (bundle / "meta.json").write_text(json.dumps(
        {"source": str(source), "video_crf": crf, "instructions": instructions,
         "robot": robot, "episodes": episodes},
        indent=1) + "\n")
    size_mb = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 1e6
    print(f"{len(episodes)} episodes -> {bundle} ({size_mb:.1f} MB)")


def read_video(path: Path) -> np.ndarray:
    """uint8 [T, H, W, 3] RGB. OpenCV where installed (the GPU machine's image has it, not imageio-ffmpeg)."""
    try:
        import cv2
    except ImportError:
        import imageio.v3 as iio

        return iio.imread(path, extension=".mp4")
    video = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames.append(frame[..., ::-1])  # BGR -> RGB
    return np.ascontiguousarray(np.stack(frames))


def unpack(bundle: Path) -> tuple[list, dict]:
    from vla_runtime.data.episodes import Episode

    meta = json.loads((bundle / "meta.json").read_text())
    arrays = np.load(bundle / "arrays.npz")
    episodes = []
    for info in meta["episodes"]:
        images = {camera: read_video(bundle / "video" / f"{info['name']}.{camera}.mp4") for camera in info["cameras"]}
        for camera, frames in images.items():
            if len(frames) != info["length"]:
                raise ValueError(f"{info['name']}.{camera}.mp4 decoded to {len(frames)} frames, "
                                 f"expected {info['length']}")
        episodes.append(Episode(info["task"], info["task_id"], info["instruction"], info["seed"], info["success"],
                                images,
                                *(arrays[f"{info['name']}/{key}"] for key in ("state", "action", "timestamp"))))
    return episodes, meta


def load_config(overrides: list[str]) -> tuple[dict, dict]:
    """configs/train.yaml + configs/model/<model>.yaml with key=value overrides, without hydra: the ref_vla trainer's
    settings (`TrainConfig`) and the model options."""
    import yaml

    settings = yaml.safe_load((REPO / "configs" / "train.yaml").read_text())
    settings.pop("defaults"), settings.pop("hydra"), settings.pop("trainer")
    pairs = dict(item.split("=", 1) for item in overrides)
    model_name = pairs.pop("model", "ref_dit")
    model_options = yaml.safe_load((REPO / "configs" / "model" / f"{model_name}.yaml").read_text())
    for key, text in pairs.items():
        if key not in settings:
            raise SystemExit(f"unknown setting '{key}' (train.yaml has {', '.join(settings)})")
        settings[key] = yaml.safe_load(text)
    return settings, model_options


def train_from_bundle(bundle: Path, output_dir: Path, overrides: list[str]) -> None:
    import torch

    from vla_runtime.data.torch_dataset import ActionChunkDataset
    from vla_runtime.policies.ref_vla.training import TrainConfig, train

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    settings, model_options = load_config(overrides)
    cfg = TrainConfig.from_settings({**settings, "output_dir": str(output_dir),
                                     "dataset": f"{bundle} (video bundle of {settings['dataset']})"})
    started = time.monotonic()
    episodes, meta = unpack(bundle)
    print(f"decoded {len(episodes)} episodes in {time.monotonic() - started:.0f} s", flush=True)
    model_options = {**meta["robot"], **model_options}
    dataset = ActionChunkDataset(episodes, chunk_size=model_options.get("chunk_size", 8),
                                 max_idle_frames=cfg.max_idle_frames)
    train(cfg, dataset, meta["instructions"].values(), model_options)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (output_dir / "provenance.json").write_text(json.dumps({
        "command": "python3 scripts/device_train.py train " + " ".join([str(bundle), str(output_dir), *overrides]),
        "device": device, "torch": torch.__version__, "bundle_video_crf": meta["video_crf"],
        "wall_s": time.monotonic() - started}, indent=1) + "\n")


def lerobot_from_bundle(bundle: Path, output_dir: Path, minutes: float, workers: int, train_args: list[str]) -> None:
    """The bundle -> a LeRobotDataset (frames as images: no video decoding in the data loaders), then a
    SmolVLA trained on it by lerobot-train for `minutes` (`training.py`; its options after `--`)."""
    from vla_runtime.data.lerobot_format import write_lerobot
    from vla_runtime.policies.lerobot import training

    started = time.monotonic()
    episodes, meta = unpack(bundle)
    dataset = output_dir.with_name(f"{output_dir.name}_dataset")
    control_dt = meta["robot"]["control_dt"]
    write_lerobot(episodes, dataset, round(1 / control_dt), use_videos=False, workers=workers)
    del episodes
    print(f"LeRobotDataset of {len(meta['episodes'])} episodes in {time.monotonic() - started:.0f} s", flush=True)
    training.main([str(dataset), str(output_dir), "--minutes", str(minutes), *train_args])


PART_BYTES = 15 * 2**20  # a file back from a device call holds at most 16 MiB, all of them 64 MiB


def send_back(runs: list[Path], out: Path) -> None:
    """Training outputs -> pieces a device call can return: weights as fp16 (9 M parameters in fp32 are 37 MB),
    no optimizer state, one tar split into PART_BYTES files."""
    import io
    import tarfile

    from safetensors.torch import load_file, save

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for run in runs:
            for path in sorted(run.iterdir()):
                if path.name == "model.safetensors":
                    half = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
                    data = save(half)
                    info = tarfile.TarInfo(f"{run.name}/model.fp16.safetensors")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
                elif path.name != "optimizer.safetensors":  # files, and folders whole (a SmolVLA's vlm/)
                    archive.add(path, f"{run.name}/{path.name}")
    data = buffer.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, len(data), PART_BYTES)):
        (out / f"runs.tar.{index:02d}").write_bytes(data[start:start + PART_BYTES])
    print(f"{len(runs)} runs -> {out} ({len(data) / 1e6:.1f} MB in {-(-len(data) // PART_BYTES)} parts)")


def receive(parts: Path, destination: Path) -> None:
    """The pieces `send_back` wrote -> run folders with fp32 `model.safetensors` again."""
    import io
    import tarfile

    from safetensors.torch import load_file, save_file

    data = b"".join(path.read_bytes() for path in sorted(parts.glob("runs.tar.*")))
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(destination, filter="data")
    for half in destination.glob("*/model.fp16.safetensors"):
        save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(half).items()},
                  half.with_name("model.safetensors"))
        half.unlink()
        print(f"{half.parent}: fp32 weights restored")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pack_parser = commands.add_parser("pack", help="dataset directory -> video bundle")
    pack_parser.add_argument("source", type=Path)
    pack_parser.add_argument("bundle", type=Path)
    pack_parser.add_argument("--crf", type=int, default=VIDEO_CRF,
                             help=f"H.264 quality (lower is better and larger; default {VIDEO_CRF})")
    train_parser = commands.add_parser("train", help="train from a video bundle")
    train_parser.add_argument("bundle", type=Path)
    train_parser.add_argument("output_dir", type=Path)
    train_parser.add_argument("overrides", nargs="*", help="key=value, as for vla-train (model=ref_ar, ...)")
    send_parser = commands.add_parser("send-back", help="(on the GPU machine) run folders -> fp16 pieces in OUT")
    send_parser.add_argument("out", type=Path)
    send_parser.add_argument("runs", type=Path, nargs="+")
    lerobot_parser = commands.add_parser("lerobot", help="a SmolVLA trained by lerobot-train on a video bundle")
    lerobot_parser.add_argument("bundle", type=Path)
    lerobot_parser.add_argument("output_dir", type=Path)
    lerobot_parser.add_argument("--minutes", type=float, required=True, help="training budget (after the dataset)")
    lerobot_parser.add_argument("--workers", type=int, default=8, help="processes writing the LeRobotDataset")
    receive_parser = commands.add_parser("receive", help="(here) the pieces -> run folders with fp32 weights")
    receive_parser.add_argument("parts", type=Path)
    receive_parser.add_argument("destination", type=Path)
    # `lerobot` passes what it does not know (after --) to vla_runtime.policies.lerobot.training.
    args, rest = parser.parse_known_args()
    rest = [arg for arg in rest if arg != "--"]
    if rest and args.command != "lerobot":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "pack":
        pack(args.source, args.bundle, args.crf)
    elif args.command == "train":
        train_from_bundle(args.bundle, args.output_dir, args.overrides)
    elif args.command == "lerobot":
        lerobot_from_bundle(args.bundle, args.output_dir, args.minutes, args.workers, rest)
    elif args.command == "send-back":
        send_back(args.runs, args.out)
    else:
        receive(args.parts, args.destination)


if __name__ == "__main__":
    main()
