"""SmolVLA trained by LeRobot's own trainer (`lerobot-train`) on a LeRobotDataset, within a time budget.

lerobot-train counts steps, not minutes, and its cosine schedule must end where the run ends. So a short
probe run measures the seconds per step on this machine first, and the real run gets the number of steps
that fits the remaining budget. The result is a `policy=lerobot` folder: LeRobot's `pretrained_model` plus
the VLM folder (`vlm/`, written offline by `smolvlm.py`) and `vla_runtime.json` (control rate, provenance).

    python -m vla_runtime.policies.lerobot.training <LeRobotDataset> <output_dir> --minutes 30 --size small

`--init-from <policy folder>` fine-tunes a SmolVLA trained this way instead (its VLM and weights; e.g. with a
longer `--chunk-size`: SmolVLA's action expert has no per-position weights, so any chunk length loads).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vla_runtime.policies.lerobot.policy import RUNTIME_META, VLM_FOLDER
from vla_runtime.policies.lerobot.smolvlm import smolvla_options, write_smolvlm

LOGGED_STEP = re.compile(r" step:(\d+) ")
PROBE_SLOWDOWN = 1.4  # a long run's seconds per step over the probe's, as measured (see train_smolvla)


def _value(value) -> str:
    return f"[{','.join(str(v) for v in value)}]" if isinstance(value, tuple | list) else str(value).lower() \
        if isinstance(value, bool) else str(value)


def lerobot_train_args(dataset: Path, output_dir: Path, vlm: Path, size: str, steps: int, batch_size: int,
                       lr: float, device: str, num_workers: int, chunk_size: int, n_action_steps: int,
                       init_from: Path | None = None) -> list[str]:
    architecture = {} if init_from else smolvla_options(vlm, size)  # a start folder names its VLM (`repointed`)
    policy = {**architecture, "chunk_size": chunk_size, "n_action_steps": n_action_steps,
              "device": device, "push_to_hub": False, "optimizer_lr": lr,
              "scheduler_warmup_steps": max(1, steps // 20), "scheduler_decay_steps": steps,
              "scheduler_decay_lr": lr / 30}
    start = f"--policy.path={init_from}" if init_from else "--policy.type=smolvla"
    return [f"--dataset.repo_id=local/{dataset.name}", f"--dataset.root={dataset}", start,
            *(f"--policy.{key}={_value(value)}" for key, value in policy.items()),
            f"--output_dir={output_dir}", f"--steps={steps}", f"--save_freq={steps}", f"--batch_size={batch_size}",
            f"--num_workers={num_workers}", f"--log_freq={max(1, min(100, steps // 10))}", "--wandb.enable=false"]


def run_lerobot_train(args: list[str], log: Path) -> list[tuple[float, int]]:
    """lerobot-train in a child process, its output echoed and kept in `log`. Returns (seconds since its
    start, step) of each logged step, timed as the lines arrive (its own log stamps whole seconds)."""
    started, logged = time.monotonic(), []
    with subprocess.Popen([sys.executable, "-m", "lerobot.scripts.lerobot_train", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as child, open(log, "a") as file:
        for line in child.stdout:
            sys.stdout.write(line)
            file.write(line)
            match = LOGGED_STEP.search(line)
            if match:
                logged.append((time.monotonic() - started, int(match.group(1))))
    if child.returncode:
        raise RuntimeError(f"lerobot-train failed (exit {child.returncode}); see {log}")
    return logged


def repointed(policy: Path, copy: Path, vlm: Path) -> Path:
    """A copy of a trained policy folder whose config and tokenizer step name `vlm` as their VLM: the folder
    it was trained with (saved in them) is usually gone, and lerobot-train re-points neither."""
    shutil.copytree(policy, copy, ignore=shutil.ignore_patterns(VLM_FOLDER))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "vlm_model_name": str(vlm)}, indent=1))
    processor = json.loads((copy / "policy_preprocessor.json").read_text())
    for step in processor["steps"]:
        if step["registry_name"] == "tokenizer_processor":
            step["config"]["tokenizer_name"] = str(vlm)
    (copy / "policy_preprocessor.json").write_text(json.dumps(processor, indent=1))
    return copy


def train_smolvla(dataset: Path, output_dir: Path, instructions: list[str], control_dt: float, minutes: float,
                  size: str = "small", batch_size: int = 64, lr: float = 3e-4, device: str = "cpu",
                  num_workers: int = 4, chunk_size: int = 8, n_action_steps: int = 4, probe_steps: int = 100,
                  init_from: Path | None = None) -> Path:
    started = time.monotonic()
    output_dir.mkdir(parents=True, exist_ok=False)
    if init_from:
        vlm = Path(shutil.copytree(init_from / VLM_FOLDER, output_dir / VLM_FOLDER))
        start = repointed(init_from, output_dir / "init", vlm)
    else:
        vlm, start = write_smolvlm(output_dir / VLM_FOLDER, instructions, size), None
    common = dict(dataset=dataset, vlm=vlm, size=size, batch_size=batch_size, lr=lr, device=device,
                  num_workers=num_workers, chunk_size=chunk_size, n_action_steps=n_action_steps, init_from=start)
    log = output_dir / "train.log"
    probe_started = time.monotonic()
    logged = run_lerobot_train(lerobot_train_args(output_dir=output_dir / "probe", steps=probe_steps, **common), log)
    if len(logged) < 3:
        raise RuntimeError(f"Too few logged steps in the probe run to time it ({log})")
    # Seconds per step past the data loaders' start (from the second logged step on); the rest of the probe's
    # wall time is what a run costs besides its steps (start-up, dataset load, the checkpoint at the end).
    (t0, s0), (t1, s1) = logged[1], logged[-1]
    step_s = (t1 - t0) / (s1 - s0)
    overhead_s = time.monotonic() - probe_started - probe_steps * step_s
    # A long run's steps came out slower than the probe's (H200, 12 data workers: 0.140 vs 0.102 s): its
    # loaders no longer run ahead of the GPU. Plan for that, or the run overshoots its budget.
    planned_s = step_s * PROBE_SLOWDOWN
    steps = max(probe_steps, int((minutes * 60 - (time.monotonic() - started) - overhead_s) / planned_s))
    print(f"probe: {step_s:.3f} s/step (planned at {planned_s:.3f}), start-up {overhead_s:.0f} s -> {steps} steps "
          "in the remaining budget", flush=True)
    shutil.rmtree(output_dir / "probe")
    run_lerobot_train(lerobot_train_args(output_dir=output_dir / "run", steps=steps, **common), log)
    if start:
        shutil.rmtree(start)
    final = output_dir / "run" / "checkpoints" / "last" / "pretrained_model"
    shutil.copytree(vlm, final / VLM_FOLDER)
    (final / RUNTIME_META).write_text(json.dumps({
        "control_dt": control_dt, "trained_by": "lerobot-train (vla_runtime.policies.lerobot.training)",
        "dataset": str(dataset), "init_from": init_from and str(init_from), "vlm_size": size, "steps": steps,
        "batch_size": batch_size, "lr": lr, "device": device, "seconds_per_step": step_s,
        "wall_s": round(time.monotonic() - started)}, indent=1) + "\n")
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="a LeRobotDataset directory (vla-collect format=lerobot)")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget, probe and start-up included")
    parser.add_argument("--size", default="small", help="SmolVLM backbone size (smolvlm.SIZES)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--n-action-steps", type=int, default=4)
    parser.add_argument("--probe-steps", type=int, default=100,
                        help="steps of the timing probe (fewer where a step takes seconds, e.g. on a CPU)")
    parser.add_argument("--init-from", type=Path, help="a policy folder trained this way, to fine-tune")
    args = parser.parse_args(argv)
    if args.init_from and not (args.init_from / VLM_FOLDER / "config.json").is_file():
        parser.error(f"--init-from {args.init_from}: not a SmolVLA trained this way (no {VLM_FOLDER}/config.json "
                     "in it); give a folder this script wrote, e.g. checkpoints/smolvla_mt10")
    info = json.loads((args.dataset / "meta" / "info.json").read_text())
    import pandas

    instructions = list(pandas.read_parquet(args.dataset / "meta" / "tasks.parquet").index)
    final = train_smolvla(args.dataset, args.output_dir, instructions, 1 / info["fps"], args.minutes, args.size,
                          args.batch_size, args.lr, args.device, args.num_workers, args.chunk_size,
                          args.n_action_steps, args.probe_steps, args.init_from)
    print(f"policy=lerobot policy.path={final}")


if __name__ == "__main__":
    main()
