"""VLA-Cache-style reuse of the keys and values of visual tokens that did not change since the last frame.

The LM's forward is replaced (a replace-forward hook). A visual token is *static* when its LM input
embedding is nearly that of the previous frame (cosine similarity >= `similarity`); static tokens are
not recomputed: every layer takes their keys / values from the previous frame and computes queries,
attention output and MLP only for the other tokens (changed visual tokens, the instruction, proprio and
cognition tokens). The `relevant_share` of visual tokens that the instruction attended to most in the
last full pass are always recomputed (task-relevant regions, e.g. the gripper and the object, change
meaning even when their pixels barely move), and every `refresh_every` frames a full pass refreshes
the whole cache so stale entries cannot pile up.

It serves a policy's prefix pass: ref_dit's, cache-free, whose output holds the recomputed tokens only, in
their original order (the cognition token stays last); and pi0's, whose action expert reads the KV cache the
pass fills (`LanguageModel.caches_prefix`): a partial pass fills it for every token, the static ones with the
keys / values reused. `similarity > 1` never reuses: the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from vla_runtime.accel.attention import allowed_attention, normed, visual_relevance
from vla_runtime.accel.method import AccelMethod, Phase, Suggest, register_method
from vla_runtime.hooks import Handle, ModelHook, add_hook
from vla_runtime.transformers_compat import CACHE_ARG
from vla_runtime.types import LanguageModel, Policy


@dataclass
class VisualKVReuseConfig:
    similarity: float = 0.995
    relevant_share: float = 0.25
    relevance_layer: int = 1
    refresh_every: int = 4  # a full pass at least every this many frames

    def __post_init__(self) -> None:
        if not 0 <= self.relevant_share <= 1 or self.refresh_every < 1 or self.relevance_layer < 0:
            raise ValueError("visual_kv_reuse needs 0 <= relevant_share <= 1, refresh_every >= 1, relevance_layer >= 0")


class VisualKVReuseHook(ModelHook):
    def __init__(self, config: VisualKVReuseConfig, lm: LanguageModel):
        self.config = config
        self.lm = lm
        self.reused_tokens: list[int] = []  # static visual tokens per call, for benchmarks
        self.reset_state(None)

    def reset_state(self, module) -> None:
        self.previous_embeds: torch.Tensor | None = None
        self.keys: list[torch.Tensor] = []  # per layer, pre-rotary [B, T, kv_dim]
        self.values: list[torch.Tensor] = []
        self.relevant: torch.Tensor | None = None  # [B, N_visual] bool
        self.frames_since_full = 0

    def _static_tokens(self, embeds: torch.Tensor, span: tuple[int, int]) -> torch.Tensor | None:
        """[N_visual] bool, or None when this frame needs a full pass."""
        previous = self.previous_embeds
        if (self.config.similarity > 1 or previous is None or previous.shape != embeds.shape
                or self.frames_since_full + 1 >= self.config.refresh_every or embeds.shape[0] != 1):
            return None
        start, end = span
        similarity = F.cosine_similarity(embeds[0, start:end].float(), previous[0, start:end].float(), dim=-1)
        static = (similarity >= self.config.similarity) & ~self.relevant[0]
        return static if static.any() else None

    def new_forward(self, lm, call_next, input_ids=None, attention_mask=None, position_ids=None,
                    inputs_embeds=None, use_cache=None, **kwargs):
        if kwargs.get(CACHE_ARG) is not None or inputs_embeds is None or kwargs.get("adarms_cond") is not None:
            raise ValueError("visual_kv_reuse serves a policy's prefix pass: input embeddings, no cache to extend, "
                             "no adaptive norm conditioning")
        if use_cache and not self.lm.caches_prefix:
            raise ValueError("visual_kv_reuse: this policy asked its LM for a KV cache without declaring that its "
                             "prefix fills one (LanguageModel.caches_prefix)")
        span = self.lm.visual_token_span()
        length = inputs_embeds.shape[1]
        positions = torch.arange(length, device=inputs_embeds.device)[None] if position_ids is None else position_ids
        allowed = allowed_attention(attention_mask, inputs_embeds)
        static = self._static_tokens(inputs_embeds, span)
        if static is None:
            output = self._full_pass(call_next, inputs_embeds, attention_mask, position_ids, use_cache, allowed, span)
            self.frames_since_full = 0
            self.reused_tokens.append(0)
        else:
            output = self._partial_pass(inputs_embeds, positions, allowed, span, static, use_cache)
            self.frames_since_full += 1
            self.reused_tokens.append(int(static.sum()))
        self.previous_embeds = inputs_embeds.detach()
        return output

    def _full_pass(self, call_next, embeds, attention_mask, position_ids, use_cache, allowed, span):
        """The original forward (bit-identical output), recording every layer's keys / values and the
        instruction's attention to the visual tokens."""
        lm = self.lm
        keys, values, handles = [None] * len(lm.layers), [None] * len(lm.layers), []

        def store(target, index):
            def hook(module, args, output):
                target[index] = output.detach()
            return hook

        def relevance(layer, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            scores = visual_relevance(layer, hidden, kwargs["position_embeddings"], span, allowed)
            share = max(1, round(self.config.relevant_share * scores.shape[1])) if self.config.relevant_share else 0
            relevant = torch.zeros_like(scores, dtype=torch.bool)
            if share:
                relevant.scatter_(1, scores.topk(share, dim=1).indices, True)
            self.relevant = relevant

        for index, layer in enumerate(lm.layers):
            handles.append(layer.self_attn.k_proj.register_forward_hook(store(keys, index)))
            handles.append(layer.self_attn.v_proj.register_forward_hook(store(values, index)))
        relevance_layer = lm.layers[min(self.config.relevance_layer, len(lm.layers) - 1)]
        handles.append(relevance_layer.register_forward_pre_hook(relevance, with_kwargs=True))
        options = {"position_ids": position_ids} if position_ids is not None else {}
        if use_cache is not None:
            options["use_cache"] = use_cache
        try:
            output = call_next(inputs_embeds=embeds, attention_mask=attention_mask, **options)
        finally:
            for handle in handles:
                handle.remove()
        self.keys, self.values = keys, values
        return output

    def _partial_pass(self, embeds, positions, allowed, span, static, use_cache):
        """Recomputes every token but the static ones, with the keys / values of all; the output holds the
        recomputed tokens (and, for a policy whose prefix fills a KV cache, that cache for every token)."""
        lm = self.lm
        start, end = span
        batch, length = embeds.shape[:2]
        recompute = torch.ones(length, dtype=torch.bool, device=embeds.device)
        recompute[start:end] = ~static
        rows = recompute.nonzero().squeeze(1)
        cos, sin = lm.rotary_emb(embeds, positions)
        allowed = allowed[:, :, rows]  # [B, 1, |rows|, T]
        cache = DynamicCache() if use_cache else None
        hidden = embeds[:, rows].to(lm.norm.weight.dtype)  # as the LM casts its input (not from a linear: quantized)
        for index, layer in enumerate(lm.layers):
            attention = layer.self_attn
            inputs = normed(layer.input_layernorm, hidden)
            queries = attention.q_proj(inputs).view(batch, len(rows), -1, attention.head_dim).transpose(1, 2)
            keys, values = self.keys[index].clone(), self.values[index].clone()
            keys[:, rows], values[:, rows] = attention.k_proj(inputs), attention.v_proj(inputs)
            # Static tokens keep their old entries: the next frame may reuse them again (until a refresh).
            self.keys[index], self.values[index] = keys, values
            keys = keys.view(batch, length, -1, attention.head_dim).transpose(1, 2)
            values = values.view(batch, length, -1, attention.head_dim).transpose(1, 2)
            queries = apply_rotary_pos_emb(queries, queries, cos[:, rows], sin[:, rows])[0]
            keys = apply_rotary_pos_emb(keys, keys, cos, sin)[0]
            if cache is not None:
                cache.update(keys, values, index)
            groups = queries.shape[1] // keys.shape[1]
            attended = F.scaled_dot_product_attention(queries, repeat_kv(keys, groups), repeat_kv(values, groups),
                                                      attn_mask=allowed, scale=attention.scaling)
            hidden = hidden + attention.o_proj(attended.transpose(1, 2).reshape(batch, len(rows), -1))
            hidden = hidden + layer.mlp(normed(layer.post_attention_layernorm, hidden))
        return BaseModelOutputWithPast(last_hidden_state=normed(lm.norm, hidden), past_key_values=cache)


def apply(policy: Policy, config: VisualKVReuseConfig | None = None, artifact: dict | None = None) -> Handle:
    lm = policy.structure.require("language_model", "visual_kv_reuse")
    reason = _unsupported(policy.structure, config)
    if reason:
        raise ValueError(f"visual_kv_reuse cannot run on this policy: {reason}")
    hook = VisualKVReuseHook(config or VisualKVReuseConfig(), lm)
    return Handle("visual_kv_reuse", [add_hook(lm.module, "visual_kv_reuse", hook)], info={"hook": hook},
                  stats=lambda: _stats(hook))


def _stats(hook: VisualKVReuseHook) -> dict:
    reused = hook.reused_tokens
    return {"mean_reused_visual_tokens": float(np.mean(reused)) if reused else None}


def _unsupported(structure, config) -> str | None:
    if structure.language_model is not None and structure.language_model.module is None:
        return ("it replaces the language model's forward pass, and this policy drives its LM layers itself "
                "(its action expert's layers interleave with them)")
    return None


def _search(suggest: Suggest, structure) -> dict:
    """How similar a visual token must stay to keep its keys / values, and how often a full pass refreshes them."""
    return {"similarity": suggest.suggest_float("similarity", 0.95, 0.999),
            "refresh_every": suggest.suggest_int("refresh_every", 2, 8)}


METHOD = register_method(AccelMethod(
    "visual_kv_reuse", VisualKVReuseConfig, apply, requires=("language_model",), phase=Phase.LM_CACHE,
    unsupported=_unsupported, search=_search,
    excluded_by=("ar_decoder", "its decode loop reads a KV cache of the full prefix")))  # and token_select: see there
