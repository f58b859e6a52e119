"""What the methods that select or reuse visual tokens share: which tokens may attend to which, a norm's
output, and how much the tokens after the image attend to each visual token at one decoder layer."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def allowed_attention(attention_mask: torch.Tensor | None, embeds: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, query x key. A 2-D padding mask (or None) means causal attention over the tokens that
    are not padding (ref_vla); a 4-D mask is the policy's own (pi0's prefix attends both ways), boolean or
    additive (0 where allowed, the dtype's minimum where not)."""
    batch, length = embeds.shape[:2]
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return attention_mask
        return attention_mask > torch.finfo(attention_mask.dtype).min / 2
    mask = attention_mask if attention_mask is not None else embeds.new_ones(batch, length, dtype=torch.long)
    causal = torch.ones(length, length, dtype=torch.bool, device=embeds.device).tril()
    return (causal[None] & mask[:, None, :].bool())[:, None]


def normed(norm, hidden: torch.Tensor) -> torch.Tensor:
    """A norm's output; pi0's Gemma norms return (output, gate), the gate None without adaptive conditioning."""
    output = norm(hidden)
    return output[0] if isinstance(output, tuple) else output


def visual_relevance(layer, hidden: torch.Tensor, position_embeddings, span: tuple[int, int],
                     allowed: torch.Tensor) -> torch.Tensor:
    """[B, N_visual]: attention from the tokens after the image to each visual token, at `layer` (`allowed`:
    [B, 1, T, T] from `allowed_attention`)."""
    attention = layer.self_attn
    inputs = normed(layer.input_layernorm, hidden)
    shape = (*hidden.shape[:-1], -1, attention.head_dim)
    queries = attention.q_proj(inputs).view(shape).transpose(1, 2)
    keys = attention.k_proj(inputs).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)
    start, end = span
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    scores = queries[:, :, end:] @ keys.transpose(-1, -2) * attention.scaling  # [B, H, Q_after, K_all]
    scores = scores.float().masked_fill(~allowed[:, :, end:], float("-inf"))
    weights = scores.softmax(-1).nan_to_num()  # a padding query attends to nothing
    # Padded instruction tokens do not vote: a token that is not padding may attend to itself.
    query_mask = allowed[:, 0].diagonal(dim1=-2, dim2=-1)[:, None, end:, None].float()
    votes = (weights * query_mask).sum(dim=(1, 2)) / (query_mask.sum(dim=(1, 2)) * weights.shape[1]).clamp_min(1)
    return votes[:, start:end]
