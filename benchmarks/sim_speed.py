"""A suite's cost per frame: building an env, resetting it, a physics step and rendering one camera, at
several image sizes (one process).

    python benchmarks/sim_speed.py --steps 200 --out benchmarks/sim_speed                     # Meta-World MT10
    python benchmarks/sim_speed.py --sim libero --tasks libero_object --sizes 128 --steps 100 \
        --out benchmarks/sim_speed_libero

Physics (`step`, no rendering) and rendering each of the suite's cameras (`render`) are timed separately,
on the same env, interleaved frame by frame, with random actions from a fixed seed.
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

from vla_runtime.sim import Suite
from vla_runtime.sim.suite import configured_suite


def measure(suite: Suite, task: str, steps: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    spec = suite.spec
    step_s, render_s = [], []
    started = time.perf_counter()
    with suite.make_env(task, render=False, max_steps=steps + 1) as env:
        make_s = time.perf_counter() - started
        started = time.perf_counter()
        env.reset(seed=suite.eval_seeds.seed(0))
        reset_s = time.perf_counter() - started
        env.observe(render=True)  # builds the GL context outside the timing
        for _ in range(steps):
            started = time.perf_counter()
            env.step(rng.uniform(spec.action_low, spec.action_high))
            step_s.append(time.perf_counter() - started)
            for camera in spec.cameras:
                started = time.perf_counter()
                env.render(camera)
                render_s.append(time.perf_counter() - started)
    return {"make_s": make_s, "reset_s": reset_s, "step_ms": 1000 * float(np.median(step_s)),
            "render_ms": 1000 * float(np.median(render_s))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sim", default="metaworld", help="a registered suite")
    parser.add_argument("--tasks", default=None, help="a task set or task (default: the suite's default set)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 224])
    parser.add_argument("--out", default="benchmarks/sim_speed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for size in tqdm(args.sizes, desc="image sizes"):
        suite, default_tasks = configured_suite(args.sim, image_size=size)
        tasks = suite.resolve_tasks(args.tasks) if args.tasks else default_tasks
        per_task = {task: measure(suite, task, args.steps) for task in tqdm(tasks, desc=f"{size}x{size}")}
        rows.append({"image_size": size, **{
            f"{key}_median": float(np.median([m[key] for m in per_task.values()]))
            for key in ("make_s", "reset_s", "step_ms", "render_ms")}, "per_task": per_task})
    command = " ".join(["python benchmarks/sim_speed.py", *(["--sim", args.sim] if args.sim != "metaworld" else []),
                        *(["--tasks", args.tasks] if args.tasks else []), "--sizes", *map(str, args.sizes),
                        "--steps", str(args.steps), "--out", args.out])
    result = {"command": command, "sim": args.sim, "cameras": list(suite.spec.cameras), "steps_per_task": args.steps,
              "tasks": tasks, "mujoco_gl": os.environ.get("MUJOCO_GL"),
              "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# {args.sim}: env build, reset, step and render time",
        "",
        f"Command: `{command}` (cameras {', '.join(suite.spec.cameras)}, MUJOCO_GL={result['mujoco_gl']}, "
        f"{result['cpu_count']} cores; median over {len(tasks)} tasks of the per-task median).",
        "",
        "| image size | build env (s) | reset (s) | env step (ms) | render one camera (ms) "
        "| frames/s (step + all cameras) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        total = row["step_ms_median"] + len(suite.spec.cameras) * row["render_ms_median"]
        lines.append(f"| {row['image_size']}x{row['image_size']} | {row['make_s_median']:.2f} | "
                     f"{row['reset_s_median']:.3f} | {row['step_ms_median']:.2f} | {row['render_ms_median']:.2f} | "
                     f"{1000 / total:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
