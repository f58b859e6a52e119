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

import torch
from torch import nn

from vla_runtime.accel.hooks import Handle, ModelHook, add_hook
from vla_runtime.types import Policy


@dataclass
class ParallelDecodeConfig:
    max_passes: int | None = None  # None: N - 1, which makes the result exact
    init: str = "previous"  # previous | repeat_first

    def __post_init__(self) -> None:
        if self.init not in ("previous", "repeat_first"):
            raise ValueError(f"parallel_decode init must be 'previous' or 'repeat_first', got '{self.init}'")


class JacobiDecodeHook(ModelHook):
    def __init__(self, config: ParallelDecodeConfig):
        self.config = config
        self.passes: list[int] = []  # block passes per call, for benchmarks
        self.previous: torch.Tensor | None = None  # tokens of the last call in this episode

    def reset_state(self, module) -> None:
        self.previous = None

    def new_forward(self, loop: nn.Module, call_next, prefix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        model = loop.model
        count = model.config.num_action_tokens
        output = model.lm(inputs_embeds=prefix, attention_mask=mask, use_cache=True)
        cache = output.cache
        first = model.action_logits(output.last_hidden_state[:, -1]).argmax(-1)
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
            embeds = model.lm.embed_tokens(guess[:, :-1] + model.first_bin_id)
            hidden = model.lm(inputs_embeds=embeds, attention_mask=block_mask, cache=cache,
                              use_cache=True).last_hidden_state
            cache.crop(-(count - 1))  # keep only the prefix for the next pass
            updated = torch.cat([first[:, None], model.action_logits(hidden).argmax(-1)], dim=1)
            converged = torch.equal(updated, guess)
            guess = updated
            if converged:
                break
        self.passes.append(passes)
        self.previous = guess
        return guess


def apply(policy: Policy, config: ParallelDecodeConfig | None = None) -> Handle:
    loop = policy.structure.require("ar_decode_loop", "parallel_decode")
    hook = JacobiDecodeHook(config or ParallelDecodeConfig())
    return Handle("parallel_decode", [add_hook(loop, "parallel_decode", hook)], info={"hook": hook})
