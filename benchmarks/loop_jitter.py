"""Control-loop timing: tick jitter on the wall clock, and the loop's own overhead per tick.

    python benchmarks/loop_jitter.py --hz 20 --seconds 60 --out benchmarks/loop_jitter

Jitter: the real loop (MonotonicClock, threaded inference worker) at `--hz` for `--seconds`, with a
no-op policy (8 zero actions per chunk) and a robot that does nothing; jitter = how late each tick
started. Overhead: the same loop on a simulated clock (no sleeping), so the time per tick is the
loop's own bookkeeping (queue, safety, worker hand-off) and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from vla_runtime.control.inference import LatencyModel, SimulatedInferenceWorker, ThreadedInferenceWorker
from vla_runtime.control.loop import ControlLoop, MonotonicClock, RuntimeConfig, SimulatedClock
from vla_runtime.types import ActionChunk, Observation, PolicySpec, PolicyStructure


class NoOpPolicy:
    spec = PolicySpec(action_dim=4, state_dim=4, chunk_size=8)
    structure = PolicyStructure()

    def reset(self) -> None:
        pass

    def predict_chunk(self, obs: Observation) -> ActionChunk:
        return ActionChunk(np.zeros((8, 4), np.float32), t0=obs.timestamp, dt=0.05)


class NoOpRobot:
    def observation_age_s(self) -> float:
        return 0.0

    def observe(self) -> Observation:
        return Observation({}, np.zeros(4, np.float32), "noop", time.monotonic())

    def send(self, command: np.ndarray) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hz", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--overhead-ticks", type=int, default=200_000)
    parser.add_argument("--out", default="benchmarks/loop_jitter")
    args = parser.parse_args()

    worker = ThreadedInferenceWorker(NoOpPolicy())
    # Ask 2 actions early: a chunk requested only when the queue is empty lands a tick too late.
    config = RuntimeConfig(control_hz=args.hz, request_when="count", request_threshold=2)
    loop = ControlLoop(NoOpRobot(), worker, config, clock=MonotonicClock())
    try:
        metrics = loop.run(int(args.hz * args.seconds))
    finally:
        worker.close()
    jitter_us = 1e6 * np.asarray(metrics.tick_jitter_s)

    overhead_loop = ControlLoop(NoOpRobot(), SimulatedInferenceWorker(NoOpPolicy(), LatencyModel("fixed"), 1 / args.hz),
                                RuntimeConfig(control_hz=args.hz, request_when="count", request_threshold=0),
                                clock=SimulatedClock())
    started = time.perf_counter()
    overhead_loop.run(args.overhead_ticks)
    overhead_us = 1e6 * (time.perf_counter() - started) / args.overhead_ticks

    result = {
        "hz": args.hz, "seconds": args.seconds, "ticks": metrics.ticks, "misses": metrics.misses,
        "policy_calls": metrics.policy_calls, "jitter_us_p50": float(np.percentile(jitter_us, 50)),
        "jitter_us_p99": float(np.percentile(jitter_us, 99)), "jitter_us_max": float(jitter_us.max()),
        "overhead_us_per_tick": overhead_us, "overhead_ticks": args.overhead_ticks, "cpu_count": os.cpu_count(),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Control loop: tick jitter and overhead", "",
        f"Command: `python benchmarks/loop_jitter.py --hz {args.hz:g} --seconds {args.seconds:g} --out {args.out}`", "",
        "| what | value |", "|---|---:|",
        f"| ticks at {args.hz:g} Hz over {args.seconds:g} s | {metrics.ticks} |",
        f"| deadline misses | {metrics.misses} |",
        f"| tick jitter p50 | {result['jitter_us_p50']:.0f} us |",
        f"| tick jitter p99 | {result['jitter_us_p99']:.0f} us |",
        f"| tick jitter max | {result['jitter_us_max']:.0f} us |",
        f"| loop overhead per tick (simulated clock, {args.overhead_ticks} ticks) | {overhead_us:.1f} us |",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
