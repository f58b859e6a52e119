"""The reference VLAs: conv stem + ViT -> projector -> Llama decoder -> DiT head (flow matching) or
autoregressive action tokens. Hugging Face `transformers` modules, built from configs, trained here.

LM input, left to right: visual tokens (camera after camera) | instruction tokens (right-padded, masked) |
proprio token | one special token (DiT: the cognition token whose output conditions the DiT; AR:
begin-of-actions, followed by the action tokens). Causal attention, so instruction tokens attend to the image.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel, ViTConfig, ViTModel

from vla_runtime.policies.ref_vla.configuration_ref_vla import RefVLAConfig
from vla_runtime.transformers_compat import CACHE_ARG, output_cache


class ConvStem(nn.Module):
    """Stride-2 conv stages; a ViT from scratch learns much faster on these features than on raw
    patches (a convolution's locality prior, for free)."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        layers, previous = [], 3
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.GELU()]
            previous = width
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class VisionEncoder(nn.Module):
    def __init__(self, config: RefVLAConfig):
        super().__init__()
        self.stem = ConvStem(config.stem_channels)
        self.vit = ViTModel(ViTConfig(
            hidden_size=config.vit_hidden, num_hidden_layers=config.vit_layers,
            num_attention_heads=config.vit_heads, intermediate_size=4 * config.vit_hidden,
            image_size=config.feature_map_size, patch_size=config.vit_patch_size,
            num_channels=config.stem_channels[-1], attn_implementation="sdpa",
        ), add_pooling_layer=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, K, 3, H, W] in [-1, 1], K cameras -> visual tokens [B, K * N, vit_hidden] (CLS dropped),
        camera after camera."""
        batch, cameras = images.shape[:2]
        tokens = self.vit(pixel_values=self.stem(images.flatten(0, 1))).last_hidden_state[:, 1:]
        return tokens.reshape(batch, cameras * tokens.shape[1], tokens.shape[2])


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(batch, tokens, dim))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning. `attn` and `mlp` are separate modules so an
    action-head cache can reuse either one's output across denoising steps."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaln[1].weight)
        nn.init.zeros_(self.adaln[1].bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(condition).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    frequencies = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t[:, None].float() * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class DiTActionHead(nn.Module):
    """`forward` predicts the flow-matching velocity of a noisy action chunk (one denoising step);
    `sample` is the denoising loop (Euler, from noise at t=0 to actions at t=1)."""

    def __init__(self, config: RefVLAConfig):
        super().__init__()
        dim = config.dit_hidden
        self.config = config
        self.action_in = nn.Linear(config.action_dim, dim)
        self.position = nn.Parameter(torch.randn(1, config.chunk_size, dim) * 0.02)
        # Training-time RTC: added to the positions whose actions are given clean (the executed prefix).
        self.given = nn.Parameter(torch.zeros(1, 1, dim)) if config.rtc_max_delay else None
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.condition_in = nn.Linear(config.lm_hidden, dim)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, config.dit_heads, config.dit_mlp_ratio) for _ in range(config.dit_layers))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.action_out = nn.Linear(dim, config.action_dim)
        for layer in (self.final_adaln[1], self.action_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, t: torch.Tensor, cognition: torch.Tensor) -> torch.Tensor:
        """What every block's adaLN reads: the denoising time and the LM's cognition feature."""
        return self.time_mlp(timestep_embedding(t, self.config.dit_hidden)) + self.condition_in(cognition)

    def forward(self, noisy_actions: torch.Tensor, t: torch.Tensor, cognition: torch.Tensor,
                given: torch.Tensor | None = None) -> torch.Tensor:
        """`given` [B, H] (a head trained with `rtc_max_delay`): 1 where the position holds a clean action."""
        condition = self.condition(t, cognition)
        x = self.action_in(noisy_actions) + self.position
        if given is not None:
            x = x + given[..., None] * self.given
        for block in self.blocks:
            x = block(x, condition)
        shift, scale = self.final_adaln(condition).chunk(2, dim=-1)
        return self.action_out(modulate(self.final_norm(x), shift, scale))

    def sample(self, cognition: torch.Tensor, generator: torch.Generator | None = None,
               steps: int | None = None, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """`prefix` [B, d, A] (normalised; a head trained with `rtc_max_delay` >= d): the chunk's first d actions,
        given: held clean at every step and flagged to the head, which continues them."""
        steps = steps or self.config.denoising_steps
        shape = (cognition.shape[0], self.config.chunk_size, self.config.action_dim)
        # Drawn where the generator lives (the policy's CPU generator), then moved: the same noise on every device.
        x = torch.randn(shape, generator=generator, device=generator.device if generator is not None else
                        cognition.device).to(cognition.device)
        given, extra = None, ()
        if prefix is not None and prefix.shape[1]:
            if self.given is None or prefix.shape[1] > self.config.rtc_max_delay:
                raise ValueError(f"a prefix of {prefix.shape[1]} given actions, but this head was trained with at "
                                 f"most {self.config.rtc_max_delay} (rtc_max_delay)")
            given = torch.arange(shape[1], device=x.device)[None] < prefix.shape[1]  # [1, H]
            clean = torch.zeros_like(x)
            clean[:, : prefix.shape[1]] = prefix.to(x)
            extra = (given.float().expand(shape[0], -1),)
        for step in range(steps):
            if given is not None:
                x = torch.where(given[..., None], clean, x)
            t = torch.full((shape[0],), step / steps, device=cognition.device)
            x = x + self(x, t, cognition, *extra) / steps
        return x if given is None else torch.where(given[..., None], clean, x)

    def loss(self, cognition: torch.Tensor, actions: torch.Tensor, is_pad: torch.Tensor,
             repeats: int) -> torch.Tensor:
        """Flow matching: x_t = (1 - t) noise + t actions, target velocity actions - noise. Several
        noise draws per LM pass make the (cheap) head learn faster than the backbone costs."""
        cognition = cognition.repeat_interleave(repeats, 0)
        actions = actions.repeat_interleave(repeats, 0)
        keep = (~is_pad).repeat_interleave(repeats, 0).float()[..., None]
        noise = torch.randn_like(actions)
        t = torch.rand(actions.shape[0], device=actions.device)
        noisy = (1 - t[:, None, None]) * noise + t[:, None, None] * actions
        extra = ()
        if self.given is not None:  # training-time RTC: a clean prefix of random length, no loss on it
            delay = torch.randint(0, self.config.rtc_max_delay + 1, (actions.shape[0], 1), device=actions.device)
            given = torch.arange(actions.shape[1], device=actions.device)[None] < delay  # [N, H]
            noisy = torch.where(given[..., None], actions, noisy)
            keep = keep * (~given)[..., None]
            extra = (given.float(),)
        error = (self(noisy, t, cognition, *extra) - (actions - noise)) ** 2
        return (error * keep).sum() / (keep.sum() * actions.shape[-1]).clamp_min(1)


class ARDecodeLoop(nn.Module):
    """Greedy decoding of the action tokens, one LM step per token over a KV cache. A module (with no
    parameters) so acceleration hooks can replace its forward, e.g. by Jacobi decoding."""

    def __init__(self, model: RefVLA):
        super().__init__()
        self._model = weakref.ref(model)  # not a child module: the model owns this loop, not the reverse

    @property
    def model(self) -> RefVLA:
        return self._model()

    def forward(self, prefix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        model = self.model
        hidden, cache = model.lm_step(prefix, mask, None)
        tokens = [model.action_logits(hidden[:, -1]).argmax(-1)]
        for _ in range(model.config.num_action_tokens - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            hidden, cache = model.lm_step(model.embed_action_tokens(tokens[-1][:, None]), mask, cache)
            tokens.append(model.action_logits(hidden[:, -1]).argmax(-1))
        return torch.stack(tokens, dim=1)


class RefVLA(nn.Module):
    def __init__(self, config: RefVLAConfig):
        super().__init__()
        if config.text_vocab_size < 2:
            raise ValueError("RefVLAConfig.text_vocab_size must come from a tokenizer (got "
                             f"{config.text_vocab_size})")
        self.config = config
        # One special token after the text vocabulary (cognition / begin-of-actions), then the bins.
        self.special_id = config.text_vocab_size
        self.first_bin_id = config.text_vocab_size + 1
        vocab = self.first_bin_id + (config.action_bins if config.head == "ar" else 0)
        self.vision = VisionEncoder(config)
        self.projector = nn.Sequential(nn.Linear(config.vit_hidden, config.lm_hidden), nn.GELU(),
                                       nn.Linear(config.lm_hidden, config.lm_hidden))
        self.proprio = nn.Linear(config.state_dim, config.lm_hidden)
        self.lm = LlamaModel(LlamaConfig(
            vocab_size=vocab, hidden_size=config.lm_hidden, intermediate_size=config.lm_intermediate,
            num_hidden_layers=config.lm_layers, num_attention_heads=config.lm_heads,
            num_key_value_heads=config.lm_kv_heads, max_position_embeddings=256,
            attn_implementation="sdpa", pad_token_id=0,
        ))
        if config.head == "dit":
            self.dit = DiTActionHead(config)
        else:
            self.action_logits = nn.Linear(config.lm_hidden, config.action_bins)
            self.decode_loop = ARDecodeLoop(self)

    @property
    def visual_token_span(self) -> tuple[int, int]:
        return 0, len(self.config.cameras) * self.config.num_visual_tokens

    def embed_prefix(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                     state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.projector(self.vision(images))
        batch = visual.shape[0]
        special = self.lm.embed_tokens(torch.full((batch, 1), self.special_id, device=visual.device))
        embeds = torch.cat([visual, self.lm.embed_tokens(text_ids), self.proprio(state)[:, None], special], 1)
        ones = text_mask.new_ones(batch, visual.shape[1])
        mask = torch.cat([ones, text_mask, text_mask.new_ones(batch, 2)], dim=1)
        return embeds, mask

    # --- actions <-> tokens (AR) ----------------------------------------------------------------
    def lm_step(self, embeds: torch.Tensor, mask: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
        """The LM over `embeds` after what `cache` holds (None: nothing) -> (hidden states, the grown cache)."""
        output = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **{CACHE_ARG: cache})
        return output.last_hidden_state, output_cache(output)

    def embed_action_tokens(self, bins: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(bins + self.first_bin_id)

    def actions_to_bins(self, actions: torch.Tensor) -> torch.Tensor:
        bins = self.config.action_bins
        return ((actions.clamp(-1, 1) + 1) / 2 * bins).long().clamp(0, bins - 1)

    def bins_to_actions(self, bins: torch.Tensor) -> torch.Tensor:
        return (bins.float() + 0.5) / self.config.action_bins * 2 - 1

    # --- training and inference -----------------------------------------------------------------
    def loss(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
             state: torch.Tensor, actions: torch.Tensor, is_pad: torch.Tensor,
             diffusion_repeats: int = 4) -> torch.Tensor:
        """`actions` normalised to [-1, 1], [B, H, A]; `is_pad` [B, H] marks steps past the episode end."""
        prefix, mask = self.embed_prefix(images, text_ids, text_mask, state)
        if self.config.head == "dit":
            cognition = self.lm(inputs_embeds=prefix, attention_mask=mask).last_hidden_state[:, -1]
            return self.dit.loss(cognition, actions, is_pad, diffusion_repeats)
        targets = self.actions_to_bins(actions).flatten(1)  # [B, H*A], time-major
        inputs = self.lm.embed_tokens(targets[:, :-1] + self.first_bin_id)
        embeds = torch.cat([prefix, inputs], dim=1)
        mask = torch.cat([mask, mask.new_ones(inputs.shape[:2])], dim=1)
        hidden = self.lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        logits = self.action_logits(hidden[:, prefix.shape[1] - 1:])
        targets = targets.masked_fill(is_pad.repeat_interleave(self.config.action_dim, dim=1), -100)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    def predict(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                state: torch.Tensor, generator: torch.Generator | None = None,
                given_actions: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised actions [B, H, A]; `given_actions` [B, d, A]: the chunk's first d, given (training-time RTC)."""
        prefix, mask = self.embed_prefix(images, text_ids, text_mask, state)
        if self.config.head == "dit":
            cognition = self.lm(inputs_embeds=prefix, attention_mask=mask).last_hidden_state[:, -1]
            return self.dit.sample(cognition, generator, prefix=given_actions)
        bins = self.decode_loop(prefix, mask)
        return self.bins_to_actions(bins).view(-1, self.config.chunk_size, self.config.action_dim)
