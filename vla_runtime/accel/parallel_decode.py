"""PD-VLA-style parallel decoding: Jacobi fixed-point iteration over the whole block of action tokens.

Greedy decoding costs one LM pass per token. Jacobi decoding guesses every token, runs one pass over
the whole block (prefix KV-cached), replaces each token by the argmax at its position, and repeats until
nothing changes. Token i depends only on tokens < i, so after k passes the first k + 1 tokens are the
greedy ones: the fixed point is greedy decoding, reached in at most N - 1 passes, usually far fewer.

The initial guess does not change the result, only how many passes it takes: `init="previous"` starts
from the tokens of the policy's previous call in the episode (actions change slowly from one chunk
to the next), `"repeat_first"` from the first token repeated (PD-VLA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vla_runtime.accel.method import AccelMethod, Phase, register_method
from vla_runtime.hooks import Handle, ModelHook, add_hook
from vla_runtime.types import ARDecoder, Policy


@dataclass
class ParallelDecodeConfig:
    max_passes: int | None = None  # None: N - 1, which makes the result exact
    init: str = "previous"  # previous | repeat_first

    def __post_init__(self) -> None:
        if self.init not in ("previous", "repeat_first"):
            raise ValueError(f"parallel_decode init must be 'previous' or 'repeat_first', got '{self.init}'")


class JacobiDecodeHook(ModelHook):
    def __init__(self, config: ParallelDecodeConfig, decoder: ARDecoder):
        self.config = config
        self.decoder = decoder
        self.passes: list[int] = []  # block passes per call, for benchmarks
        self.previous: torch.Tensor | None = None  # tokens of the last call in this episode

    def reset_state(self, module) -> None:
        self.previous = None

    def new_forward(self, loop: nn.Module, call_next, prefix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        decoder = self.decoder
        count = decoder.num_tokens
        hidden, cache = decoder.forward(prefix, mask, None)
        first = decoder.logits(hidden[:, -1]).argmax(-1)
        guess = first[:, None].repeat(1, count)
        if self.config.init == "previous" and self.previous is not None and self.previous.shape == guess.shape:
            guess = torch.cat([first[:, None], self.previous[:, 1:]], dim=1)
        if count == 1:
            self.passes.append(0)
            return guess
        block_mask = torch.cat([mask, mask.new_ones(mask.shape[0], count - 1)], dim=1)
        max_passes = min(self.config.max_passes or count - 1, count - 1)
        passes = 0
        while passes < max_passes:
            passes += 1
            hidden, cache = decoder.forward(decoder.embed_tokens(guess[:, :-1]), block_mask, cache)
            cache.crop(-(count - 1))  # keep only the prefix for the next pass
            updated = torch.cat([first[:, None], decoder.logits(hidden).argmax(-1)], dim=1)
            converged = torch.equal(updated, guess)
            guess = updated
            if converged:
                break
        self.passes.append(passes)
        self.previous = guess
        return guess


def apply(policy: Policy, config: ParallelDecodeConfig | None = None, artifact: dict | None = None) -> Handle:
    decoder = policy.structure.require("ar_decoder", "parallel_decode")
    hook = JacobiDecodeHook(config or ParallelDecodeConfig(), decoder)
    return Handle("parallel_decode", [add_hook(decoder.loop, "parallel_decode", hook)], info={"hook": hook},
                  stats=lambda: _stats(hook))


def _stats(hook: JacobiDecodeHook) -> dict:
    passes = hook.passes
    return {"mean_passes": float(np.mean(passes)) if passes else None}


METHOD = register_method(AccelMethod("parallel_decode", ParallelDecodeConfig, apply, requires=("ar_decoder",),
                                     phase=Phase.DECODING))
