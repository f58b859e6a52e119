"""What the methods that select or reuse visual tokens share: how much the tokens after the image attend
to each visual token, at one decoder layer."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def visual_relevance(layer, hidden: torch.Tensor, position_embeddings, span: tuple[int, int],
               mask: torch.Tensor) -> torch.Tensor:
    """[B, N_visual]: attention from the tokens after the image to each visual token, at `layer`."""
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    shape = (*hidden.shape[:-1], -1, attention.head_dim)
    queries = attention.q_proj(normed).view(shape).transpose(1, 2)
    keys = attention.k_proj(normed).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)
    start, end = span
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    scores = queries[:, :, end:] @ keys.transpose(-1, -2) * attention.scaling  # [B, H, Q_after, K_all]
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=hidden.device).tril(diagonal=end)
    scores = scores.masked_fill(~(causal & mask[:, None, None, :].bool()), float("-inf"))
    weights = scores.softmax(-1)
    query_mask = mask[:, None, end:, None].float()  # padded instruction tokens do not vote
    votes = (weights * query_mask).sum(dim=(1, 2)) / (query_mask.sum(dim=(1, 2)) * weights.shape[1]).clamp_min(1)
    return votes[:, start:end]
