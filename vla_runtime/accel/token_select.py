"""Visual token selection inside the language model: from layer L on, only K visual tokens go on.

The LM's forward is replaced (a replace-forward hook): layers 0..L-1 see every token; at the input of
layer L the selection strategy scores the visual tokens from the hidden states there, the others are
dropped, and the kept ones keep their position ids (rotary positions are not renumbered).

Strategies:
- `attention_topk`: the K visual tokens most attended by the tokens after the image (instruction,
  proprio, special token), using layer L's own query/key projections;
- `efficientvla`: a share of K by that task relevance, the rest by diversity (farthest-point
  sampling in cosine distance from the tokens already kept);
- `dart`: a few pivot tokens (largest hidden-state norm), then the tokens least duplicated with the
  pivots (lowest cosine similarity);
- `random`: K uniformly random visual tokens (a baseline every study needs).
Keeping every visual token leaves the original forward untouched.

A policy whose language model cannot be cut into at a layer selects before it, `layer=0`, on the output of
its `visual_tokens` module (per camera), with the strategies that need no attention: `dart`, `random`. So do
SmolVLA (the VLM's and the action expert's layers interleave; `LanguageModel.module` is None) and pi0 (its
prefix fills a KV cache the expert reads: every layer must keep the same tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPast

from vla_runtime.accel.attention import allowed_attention, visual_relevance
from vla_runtime.accel.method import AccelMethod, Phase, Suggest, register_method
from vla_runtime.hooks import Handle, ModelHook, add_hook
from vla_runtime.transformers_compat import CACHE_ARG
from vla_runtime.types import LanguageModel, Policy

STRATEGIES = ("efficientvla", "dart", "attention_topk", "random")
INPUT_STRATEGIES = ("dart", "random")  # before the LM there is no attention to score relevance with


@dataclass
class TokenSelectConfig:
    layer: int = 2  # selection happens at the input of this LM layer
    keep: int = 16  # visual tokens kept from then on
    strategy: str = "efficientvla"
    relevance_share: float = 0.5  # efficientvla: fraction of `keep` chosen by task relevance
    pivots: int = 4  # dart
    seed: int = 0  # random

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown token_select strategy '{self.strategy}'; choose one of {', '.join(STRATEGIES)}")
        if self.keep < 1 or self.layer < 0:
            raise ValueError("token_select keep must be >= 1 and layer >= 0")


def _farthest_points(features: torch.Tensor, chosen: list[int], count: int) -> list[int]:
    """Greedily add the token whose cosine similarity to everything chosen is lowest."""
    features = F.normalize(features, dim=-1)
    chosen = list(chosen)
    if not chosen:
        chosen.append(int(features.norm(dim=-1).argmax()))
    closeness = (features @ features[chosen].T).max(-1).values
    while len(chosen) < count:
        closeness[chosen] = float("inf")
        candidate = int(closeness.argmin())
        chosen.append(candidate)
        closeness = torch.maximum(closeness, features @ features[candidate])
    return chosen


def select_visual_tokens(config: TokenSelectConfig, layer, hidden: torch.Tensor, position_embeddings,
                         span: tuple[int, int], allowed: torch.Tensor | None,
                         generator: torch.Generator) -> torch.Tensor:
    """-> [B, keep] indices into the visual span, sorted (`layer`, `position_embeddings` and `allowed`, the
    [B, 1, T, T] attention mask, are read by the strategies that score relevance by attention only)."""
    start, end = span
    visual = hidden[:, start:end]
    keep = min(config.keep, end - start)
    chosen_rows = []
    if config.strategy in ("attention_topk", "efficientvla"):
        relevance = visual_relevance(layer, hidden, position_embeddings, span, allowed)
    for row in range(hidden.shape[0]):
        if config.strategy == "random":
            chosen = torch.randperm(end - start, generator=generator)[:keep].tolist()
        elif config.strategy == "attention_topk":
            chosen = relevance[row].topk(keep).indices.tolist()
        elif config.strategy == "efficientvla":
            by_relevance = relevance[row].topk(max(1, round(config.relevance_share * keep))).indices.tolist()
            chosen = _farthest_points(visual[row], by_relevance, keep)
        else:  # dart
            pivots = visual[row].norm(dim=-1).topk(min(config.pivots, keep)).indices.tolist()
            features = F.normalize(visual[row], dim=-1)
            duplication = (features @ features[pivots].T).max(-1).values
            duplication[pivots] = float("-inf")  # pivots stay
            rest = [i for i in duplication.argsort().tolist() if i not in pivots][: keep - len(pivots)]
            chosen = pivots + rest
        chosen_rows.append(sorted(chosen))
    return torch.tensor(chosen_rows, device=hidden.device)


class TokenSelectHook(ModelHook):
    def __init__(self, config: TokenSelectConfig, lm: LanguageModel):
        self.config = config
        self.lm = lm
        self.generator = torch.Generator().manual_seed(config.seed)
        self.kept_tokens: list[int] = []

    def reset_state(self, module) -> None:
        self.generator.manual_seed(self.config.seed)

    def new_forward(self, lm, call_next, input_ids=None, attention_mask=None, position_ids=None,
                    inputs_embeds=None, use_cache=None, **kwargs):
        start, end = self.lm.visual_token_span()
        if self.config.keep >= end - start:
            return call_next(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if use_cache or kwargs.get(CACHE_ARG) is not None or inputs_embeds is None or position_ids is not None:
            raise ValueError("token_select prunes the prefix pass of a policy without a KV cache (the DiT "
                             "variant); with a KV cache each layer would need its own mask")

        def selector(layer, hidden, rotary, allowed):
            chosen = select_visual_tokens(self.config, layer, hidden, rotary, (start, end), allowed, self.generator)
            self.kept_tokens.append(chosen.shape[1])
            return chosen + start

        hidden = run_with_selection(self.lm, inputs_embeds, attention_mask, self.config.layer, (start, end), selector)
        return BaseModelOutputWithPast(last_hidden_state=hidden)


def run_with_selection(lm: LanguageModel, embeds: torch.Tensor, attention_mask: torch.Tensor | None, at_layer: int,
                       span: tuple[int, int], selector) -> torch.Tensor:
    """The Llama forward, with the visual tokens of `span` narrowed to `selector(...)` (absolute
    indices, [B, K]) at the input of layer `at_layer`. Returns the final normed hidden states."""
    start, end = span
    hidden = embeds
    batch, length = hidden.shape[:2]
    mask = attention_mask if attention_mask is not None else hidden.new_ones(batch, length, dtype=torch.long)
    positions = torch.arange(length, device=hidden.device)[None].expand(batch, -1)
    for index, layer in enumerate(lm.layers):
        if index == at_layer:
            chosen = selector(layer, hidden, lm.rotary_emb(hidden, positions), allowed_attention(mask, hidden))
            before = torch.arange(0, start, device=hidden.device)[None].expand(batch, -1)
            after = torch.arange(end, length, device=hidden.device)[None].expand(batch, -1)
            order = torch.cat([before, chosen, after], dim=1)
            hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
            mask, positions = mask.gather(1, order), positions.gather(1, order)
        if index in (0, at_layer):
            # Causal over the kept order (the original order, minus dropped tokens); padding masked out.
            attention = allowed_attention(mask, hidden)
            rotary = lm.rotary_emb(hidden, positions)
        hidden = layer(hidden, attention_mask=attention, position_embeddings=rotary, position_ids=positions)
    return lm.norm(hidden)


class InputSelectHook(ModelHook):
    """On the `visual_tokens` module: only `keep` of its output tokens go on into the language model."""

    def __init__(self, config: TokenSelectConfig):
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.kept_tokens: list[int] = []

    def reset_state(self, module) -> None:
        self.generator.manual_seed(self.config.seed)

    def post_forward(self, module, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.keep >= tokens.shape[1]:
            return tokens
        chosen = select_visual_tokens(self.config, None, tokens, None, (0, tokens.shape[1]), None, self.generator)
        self.kept_tokens.append(chosen.shape[1])
        return tokens.gather(1, chosen.to(tokens.device)[..., None].expand(-1, -1, tokens.shape[-1]))


def _apply_at_input(policy: Policy, config: TokenSelectConfig) -> Handle:
    module = policy.structure.require("visual_tokens", "token_select before the language model")
    reason = _unsupported(policy.structure, config)
    if reason:
        raise ValueError(f"token_select cannot run on this policy: {reason}")
    hook = InputSelectHook(config)
    return Handle("token_select", [add_hook(module, "token_select", hook)], info={"hook": hook},
                  stats=lambda: _stats(hook))


def apply(policy: Policy, config: TokenSelectConfig, artifact: dict | None = None) -> Handle:
    lm = policy.structure.language_model
    if not _cuts_into(lm):
        return _apply_at_input(policy, config)
    if config.layer >= len(lm.layers):
        raise ValueError(f"token_select layer {config.layer} does not exist: the LM has {len(lm.layers)} layers")
    hook = TokenSelectHook(config, lm)
    return Handle("token_select", [add_hook(lm.module, "token_select", hook)], info={"hook": hook},
                  stats=lambda: _stats(hook))


def _stats(hook: InputSelectHook | TokenSelectHook) -> dict:
    kept = hook.kept_tokens
    return {"kept_visual_tokens": int(np.mean(kept)) if kept else None}


def _cuts_into(lm: LanguageModel | None) -> bool:
    """Whether tokens can be dropped at a layer inside the LM: it has a forward to replace, and no later reader
    needs every layer's keys / values for every token."""
    return lm is not None and lm.module is not None and not lm.caches_prefix


def _unsupported(structure, config: TokenSelectConfig) -> str | None:
    lm = structure.language_model
    if _cuts_into(lm):
        return None
    if structure.visual_tokens is None:
        return "it needs a language model it can cut into at a layer, or a `visual_tokens` hook point"
    if config.layer != 0 or config.strategy not in INPUT_STRATEGIES:
        why = ("runs interleaved with its action expert" if lm is None or lm.module is None
               else "fills a KV cache that its action expert reads at every layer")
        return (f"its language model {why}, so tokens are selected before it: layer=0 and strategy "
                f"{' or '.join(INPUT_STRATEGIES)} (got layer={config.layer}, strategy={config.strategy})")
    return None


def _search(suggest: Suggest, structure) -> dict:
    """How many visual tokens are kept, chosen how, and from which layer on where the LM can drop them inside
    (within the first two thirds, which layer_prune's space, at most a third removed before this, always leaves);
    else before the LM, by DART."""
    lm = structure.language_model
    keep = suggest.suggest_categorical("keep", [8, 16, 24, 32, 48])
    if not _cuts_into(lm):
        return {"keep": keep, "strategy": "dart", "layer": 0}
    return {"keep": keep, "strategy": suggest.suggest_categorical("strategy", ["efficientvla", "dart"]),
            "layer": suggest.suggest_int("layer", 0, len(lm.layers) - 1 - len(lm.layers) // 3)}


METHOD = register_method(AccelMethod(
    "token_select", TokenSelectConfig, apply, requires=(), phase=Phase.TOKENS, unsupported=_unsupported,
    excluded_by=("ar_decoder", "its decode loop reads a KV cache of the full prefix"),
    exclusive_with={"visual_kv_reuse": "both replace the language model's forward pass"}, search=_search))
