"""Meta-World step and render cost per frame, at several image sizes (one process, one thread).

    python benchmarks/sim_speed.py --steps 200 --out benchmarks/sim_speed

Physics (`step`, no rendering) and rendering one camera (`render`) are timed separately, on the same
env, interleaved frame by frame, with random actions from a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vla_runtime.sim.metaworld import MT10, MetaWorldConfig, MetaWorldEnv


def measure(task: str, image_size: int, steps: int, camera: str) -> dict[str, float]:
    config = MetaWorldConfig(cameras=(camera,), image_size=image_size, default_max_steps=steps + 1)
    rng = np.random.default_rng(0)
    step_s, render_s = [], []
    with MetaWorldEnv(task, config, render=False) as env:
        env.reset(seed=0)
        env.render(camera)  # builds the GL context outside the timing
        for _ in range(steps):
            started = time.perf_counter()
            env.step(rng.uniform(-1, 1, 4))
            step_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            env.render(camera)
            render_s.append(time.perf_counter() - started)
    return {"step_ms": 1000 * float(np.median(step_s)), "render_ms": 1000 * float(np.median(render_s))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 224])
    parser.add_argument("--camera", default="corner4")
    parser.add_argument("--out", default="benchmarks/sim_speed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for size in tqdm(args.sizes, desc="image sizes"):
        per_task = {task: measure(task, size, args.steps, args.camera) for task in MT10}
        rows.append({
            "image_size": size,
            "step_ms_median": float(np.median([m["step_ms"] for m in per_task.values()])),
            "render_ms_median": float(np.median([m["render_ms"] for m in per_task.values()])),
            "per_task": per_task,
        })
    result = {"camera": args.camera, "steps_per_task": args.steps, "tasks": list(MT10),
              "mujoco_gl": os.environ.get("MUJOCO_GL"), "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Meta-World step and render time per frame",
        "",
        f"Command: `python benchmarks/sim_speed.py --steps {args.steps} --out {args.out}` "
        f"(camera {args.camera}, MUJOCO_GL={result['mujoco_gl']}, {result['cpu_count']} cores, "
        "median over MT10 tasks of the per-task median).",
        "",
        "| image size | env step (ms) | render one camera (ms) | frames/s (step + render) |",
        "|---:|---:|---:|---:|",
    ]
    for row in rows:
        total = row["step_ms_median"] + row["render_ms_median"]
        lines.append(f"| {row['image_size']}x{row['image_size']} | {row['step_ms_median']:.2f} | "
                     f"{row['render_ms_median']:.2f} | {1000 / total:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
