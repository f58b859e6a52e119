"""What acceleration methods may touch in a LeRobot policy (`PolicyStructure`), per policy type.

SmolVLA (`lerobot/policies/smolvla`): a SmolVLM whose first layers run over the prefix (images, instruction,
state) once per inference and fill a KV cache, and an action expert whose layers interleave with the VLM's
(expert layer i attends to VLM layer i's keys/values: self-attention every `self_attn_every_n_layers`
layers, cross-attention between) and run once per flow-matching step. It declares:
- `vision_encoder` / `visual_tokens`: the connector (pixel-shuffle + projection), whose output is a camera's
  visual tokens as they enter the LM; `preprocess_images` runs the SigLIP encoder it reads from;
  `vision_resolution` sets the size images are padded and resized to before SigLIP;
- `language_model`: the VLM's text layers and final norm, without a forward of its own (the policy drives
  the layers, interleaved with the expert), removed together with the expert layer of the same index in
  aligned groups of `self_attn_every_n_layers` (so every expert layer keeps its kind of attention);
- `denoising_head`: the expert's layers as blocks (attention output projection and MLP as branches),
  stepped through `vlm_with_expert`'s calls without a prefix.
ACT declares its ResNet's last stage as the vision encoder (action_reuse). Other types (diffusion, pi0,
pi0.5, ...) declare only their weights for now: methods refuse them, naming the hook point they lack.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vla_runtime.types import DenoisingHead, HeadBlock, LanguageModel, Observation, PolicyStructure


class _ExpertBlocks(Sequence):
    """The expert's layers as head blocks, read when asked: layer pruning may have removed some."""

    def __init__(self, expert_layers):
        self.layers = expert_layers

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        layer = self.layers[index]
        return HeadBlock({"attn": layer.self_attn.o_proj, "mlp": layer.mlp})


def _is_prefix(args: tuple, kwargs: dict) -> bool:
    """`vlm_with_expert` runs once over the prefix (VLM embeddings, no expert input), then once per flow step
    (expert input only)."""
    return kwargs["inputs_embeds"][0] is not None


def _remove_layers(vlm_with_expert, group: int):
    def remove(indices: list[int]):
        text_layers = vlm_with_expert.get_vlm_model().text_model.layers
        expert_layers = vlm_with_expert.lm_expert.layers
        if len(expert_layers) != len(text_layers):
            raise ValueError(f"layer_prune removes a VLM layer with its expert layer; this SmolVLA has "
                             f"{len(expert_layers)} expert layers for {len(text_layers)} VLM layers")
        removed = set(indices)
        broken = sorted({i - i % group for i in removed if not all(i - i % group + k in removed for k in range(group))})
        if broken:
            raise ValueError(f"SmolVLA's layers leave in aligned groups of {group} (its expert alternates self- "
                             f"and cross-attention); the groups starting at {broken} would be split")
        keep = [i for i in range(len(text_layers)) if i not in removed]
        originals = list(text_layers), list(expert_layers), vlm_with_expert.num_vlm_layers
        for layers, original in zip((text_layers, expert_layers), originals[:2], strict=True):
            del layers[:]  # in place: the VLM, the expert and the head blocks all see the shorter model
            layers.extend(original[i] for i in keep)
        vlm_with_expert.num_vlm_layers = vlm_with_expert.num_expert_layers = len(keep)

        def undo() -> None:
            for layers, original in zip((text_layers, expert_layers), originals[:2], strict=True):
                del layers[:]
                layers.extend(original)
            vlm_with_expert.num_vlm_layers = vlm_with_expert.num_expert_layers = originals[2]

        return undo

    return remove


def _smolvla(wrapper) -> dict:
    policy = wrapper.policy
    vlm_with_expert = policy.model.vlm_with_expert
    vlm = vlm_with_expert.get_vlm_model()
    text = vlm.text_model
    cross = "cross" in vlm_with_expert.attention_mode and vlm_with_expert.self_attn_every_n_layers > 0
    group = vlm_with_expert.self_attn_every_n_layers if cross else 1

    def preprocess_images(obs: Observation) -> torch.Tensor:
        """SigLIP's output for the policy's cameras (stacked on the batch axis): what the connector reads."""
        images, _ = policy.prepare_images(wrapper.preprocessor(wrapper.batch(obs)))
        pixels = torch.cat(images).to(dtype=vlm.vision_model.dtype)
        return vlm.vision_model(pixel_values=pixels).last_hidden_state

    def vision_resolution(size: int):
        """SmolVLA pads and resizes every camera image to `resize_imgs_with_padding`; SigLIP takes any size up
        to its own (positions are bucketed), the connector's pixel shuffle a whole number of blocks per side."""
        vision = vlm.vision_model.config
        block = vision.patch_size * vlm.connector.scale_factor
        if size % block or not block <= size <= vision.image_size:
            raise ValueError(f"SmolVLA's vision input must be a multiple of {block} px (patch {vision.patch_size} x "
                             f"pixel shuffle {vlm.connector.scale_factor}) up to {vision.image_size}, got {size}")
        original = policy.config.resize_imgs_with_padding
        policy.config.resize_imgs_with_padding = (size, size)

        def undo() -> None:
            policy.config.resize_imgs_with_padding = original

        return undo

    return {
        "vision_encoder": vlm.connector,
        "vision_resolution": vision_resolution,
        "visual_tokens": vlm.connector,
        "preprocess_images": preprocess_images,
        "language_model": LanguageModel(layers=text.layers, norm=text.norm, config=text.config, prune_group=group,
                                        remove_layers=_remove_layers(vlm_with_expert, group)),
        "denoising_head": DenoisingHead(step=vlm_with_expert, steps=policy.config.num_steps,
                                        blocks=_ExpertBlocks(vlm_with_expert.lm_expert.layers),
                                        is_prefix=_is_prefix),
    }


def _act(wrapper) -> dict:
    """ACT: its ResNet's last stage is the vision encoder (action_reuse compares its feature maps); the rest of
    the ResNet, on the normalised images, is what it reads. Its transformer is no language model and its
    head no denoiser, so the other methods do not apply."""
    policy = wrapper.policy
    backbone = getattr(policy.model, "backbone", None)
    if backbone is None:  # an ACT without cameras
        return {}

    def preprocess_images(obs: Observation) -> torch.Tensor:
        batch = wrapper.preprocessor(wrapper.batch(obs))
        features = torch.cat([batch[key] for key in policy.config.image_features])
        for name, stage in backbone.named_children():
            if name == "layer4":
                return features
            features = stage(features)
        raise ValueError("ACT's backbone has no layer4: not a torchvision ResNet")

    return {"vision_encoder": backbone.layer4, "preprocess_images": preprocess_images}


STRUCTURES = {"smolvla": _smolvla, "act": _act}


def structure_of(wrapper, checkpoint_dir: Path | None) -> PolicyStructure:
    points = STRUCTURES[wrapper.config.type](wrapper) if wrapper.config.type in STRUCTURES else {}
    return PolicyStructure(weights=wrapper.policy, checkpoint_dir=checkpoint_dir, **points)
