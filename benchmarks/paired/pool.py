"""A profile's success against `none` over several blocks of paired episodes, pooled: each argument list holds
vla-eval results.json files (the same tasks and seeds across the two lists), their episodes paired by task and seed.

    python benchmarks/paired/pool.py --none A/results.json B/results.json --profile C/results.json D/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vla_runtime.evaluation.metrics import paired_delta


def episodes(paths: list[str]) -> list[dict]:
    return [episode for path in paths for episode in json.loads(Path(path).read_text())["episodes"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--none", nargs="+", required=True, help="results.json files of none")
    parser.add_argument("--profile", nargs="+", required=True, help="results.json files of the profile")
    parser.add_argument("--tolerance", type=float, default=3.0, help="points of success a lossless profile may lose")
    args = parser.parse_args()
    none, profile = episodes(args.none), episodes(args.profile)
    paired = paired_delta(none, profile)
    rates = [sum(e["success"] for e in run) / len(run) for run in (none, profile)]
    low, high = paired.ci95
    print(f"{paired.pairs} pairs: none {100 * rates[0]:.1f} %, profile {100 * rates[1]:.1f} %, "
          f"{100 * paired.delta:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] points (Wald 95 %), "
          f"{paired.wins} won / {paired.losses} lost, McNemar p = {paired.p_value:.2f}: "
          f"{paired.verdict(args.tolerance / 100)} (tolerance {args.tolerance:g} points)")


if __name__ == "__main__":
    main()
