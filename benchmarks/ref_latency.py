"""Per-inference latency (CPU) and parameter counts of the reference VLAs.

    python benchmarks/ref_latency.py --threads 2 --calls 50 --out benchmarks/ref_latency

Each model answers `--calls` observations rendered from Meta-World (drawer-open, eval seed 0), after
3 warm-up calls; the models take turns call by call, so machine noise hits them alike.
ref_dit_large has RANDOM WEIGHTS: it is a speed benchmark of the SmolVLA-scale architecture only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from vla_runtime.policies import make_policy
from vla_runtime.policies.ref_vla.policy import random_init_policy
from vla_runtime.sim import make_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--policies", nargs="*", default=["ref_dit", "ref_ar", "ref_dit_large"])
    parser.add_argument("--untrained", nargs="*", default=[], choices=["ref_dit", "ref_ar"],
                        help="benchmark these with random weights (same architecture, configs/model/NAME.yaml)")
    parser.add_argument("--out", default="benchmarks/ref_latency")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    suite = make_suite("metaworld")  # ref_dit_large is shaped for the suite's robot
    policies = {name: make_policy(name, suite=suite) for name in args.policies}
    instructions = [suite.instruction(task) for task in suite.tasks()]
    for name in args.untrained:
        config_file = resources.files("vla_runtime.configs") / "model" / f"{name}.yaml"
        model_config = OmegaConf.to_container(OmegaConf.load(str(config_file)))
        policies[f"{name}_untrained"] = random_init_policy(instructions, 0, **model_config)
    for name, policy in policies.items():
        suite.check_policy(policy, name)
    with suite.make_env("drawer-open") as env:
        obs = env.reset(suite.seeds("eval").seed(0)).without_privileged_state()
    for policy in policies.values():
        for _ in range(3):
            policy.predict_chunk(obs)
    latency_ms: dict[str, list[float]] = {name: [] for name in policies}
    for _ in tqdm(range(args.calls), desc="calls"):
        for name, policy in policies.items():
            started = time.perf_counter()
            policy.predict_chunk(obs)
            latency_ms[name].append(1000 * (time.perf_counter() - started))
    rows = {}
    for name, policy in policies.items():
        config = policy.config
        rows[name] = {
            "parameters": sum(p.numel() for p in policy.structure.weights.parameters()),
            "latency_ms_p50": float(np.percentile(latency_ms[name], 50)),
            "latency_ms_p95": float(np.percentile(latency_ms[name], 95)),
            "head": config.head, "lm_layers": config.lm_layers, "lm_hidden": config.lm_hidden,
            "visual_tokens": config.num_visual_tokens, "chunk_size": config.chunk_size,
            "random_weights": name == "ref_dit_large" or name.endswith("_untrained"),
        }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(
        {"threads": args.threads, "calls": args.calls, "cpu_count": os.cpu_count(), "policies": rows}, indent=2) + "\n")
    lines = ["# Reference VLAs: parameters and per-inference latency", "",
             f"Command: `python benchmarks/ref_latency.py --threads {args.threads} --calls {args.calls} "
             f"--policies {' '.join(args.policies)}"
             f"{' --untrained ' + ' '.join(args.untrained) if args.untrained else ''} --out {args.out}` "
             f"(CPU, {args.threads} threads, batch 1, one 128x128 image).", "",
             "| policy | parameters | LM layers x hidden | visual tokens | chunk | latency p50 (ms) | p95 (ms) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        label = f"{name} (random weights, speed only)" if row["random_weights"] else name
        lines.append(f"| {label} | {row['parameters'] / 1e6:.1f} M | {row['lm_layers']} x {row['lm_hidden']} | "
                     f"{row['visual_tokens']} | {row['chunk_size']} | {row['latency_ms_p50']:.1f} | "
                     f"{row['latency_ms_p95']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
