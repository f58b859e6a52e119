"""Reuse gates: before the loop asks the policy for a new chunk, a gate may say "the last chunk still
holds" and the loop re-queues it instead (acceleration methods supply real gates)."""

from __future__ import annotations

from typing import Protocol

from vla_runtime.plugins import did_you_mean
from vla_runtime.types import ActionChunk, Observation


class ReuseGate(Protocol):
    def should_reuse(self, obs: Observation, last_chunk: ActionChunk | None) -> bool: ...

    def on_inference(self, obs: Observation, chunk: ActionChunk) -> None: ...

    def reset(self) -> None: ...


class NeverReuse:
    """Always infer."""

    def should_reuse(self, obs: Observation, last_chunk: ActionChunk | None) -> bool:
        return False

    def on_inference(self, obs: Observation, chunk: ActionChunk) -> None:
        pass

    def reset(self) -> None:
        pass


REUSE_GATES = {"never": NeverReuse}


def make_reuse_gate(name: str) -> ReuseGate:
    if name not in REUSE_GATES:
        raise ValueError(f"Unknown reuse gate '{name}'{did_you_mean(name, REUSE_GATES)}; available: "
                         f"{', '.join(REUSE_GATES)}")
    return REUSE_GATES[name]()
