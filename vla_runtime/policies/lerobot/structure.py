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
pi0 / pi0.5 (`lerobot/policies/pi0`, `pi05`): a PaliGemma whose Gemma runs once over the prefix (images,
instruction; pi0.5: the state as text too) and fills a KV cache, and a Gemma action expert run once per flow
step on that cache (layer i reads VLM layer i's keys / values). Not interleaved in the layers, so it declares:
- `vision_encoder` / `visual_tokens`: the multi-modal projector (SigLIP's output projected into the LM), per
  camera; `preprocess_images` runs SigLIP on the policy's resized images;
- `language_model`: the VLM's Gemma as a module (`caches_prefix`: visual_kv_reuse fills the cache;
  token_select selects before it), its layers removed together with the expert layer of the same index;
- `denoising_head`: the expert's layers as blocks, stepped through `paligemma_with_expert`'s calls without
  a prefix (as SmolVLA's).
Diffusion (`lerobot/policies/diffusion`): its ResNet's last stage as the vision encoder (action_reuse; the
first camera's where each camera has its own encoder, lerobot's default), and
its 1-D UNet as the denoising head, each residual block a cached branch (head_cache: a block not updated at
a step returns its output of the last step that was, DeepCache-style), the step read from the scheduler's
timestep. ACT declares its ResNet's last stage as the vision encoder (action_reuse). Other types declare
only their weights: methods refuse them, naming the hook point they lack.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vla_runtime.hooks import drop_layers
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
    """SmolVLA's `vlm_with_expert` and pi0's `paligemma_with_expert` run once over the prefix (VLM embeddings,
    no expert input), then once per flow step (expert input only)."""
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
        # SigLIP (the largest share of full-size SmolVLA's time), the connector, the VLM-with-expert.
        "hot_paths": (vlm.vision_model, vlm.connector, vlm_with_expert),
    }


def _before(last_stage, backbone, images: torch.Tensor) -> torch.Tensor:
    """What a CNN's `last_stage` reads: the images through every stage of `backbone` before it."""
    for stage in backbone.children():
        if stage is last_stage:
            return images
        images = stage(images)
    raise ValueError(f"{type(last_stage).__name__} is not a stage of the vision backbone")


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
        return _before(backbone.layer4, backbone, torch.cat([batch[key] for key in policy.config.image_features]))

    return {"vision_encoder": backbone.layer4, "preprocess_images": preprocess_images}


def _diffusion(wrapper) -> dict:
    policy = wrapper.policy
    model = policy.diffusion
    unet, scheduler = model.unet, model.noise_scheduler
    blocks = [HeadBlock({"res1": first, "res2": second}) for first, second, _ in unet.down_modules]
    blocks.append(HeadBlock({f"res{i + 1}": block for i, block in enumerate(unet.mid_modules)}))
    blocks += [HeadBlock({"res1": first, "res2": second}) for first, second, _ in unet.up_modules]

    def step_index(args: tuple, kwargs: dict) -> int:
        """The UNet takes the scheduler's timestep (counting down); the step is its place in the schedule."""
        return int((scheduler.timesteps == int(args[1].reshape(-1)[0])).nonzero()[0, 0])

    points = {"denoising_head": DenoisingHead(step=unet, steps=model.num_inference_steps, blocks=blocks,
                                              step_index=step_index)}
    if not policy.config.image_features:
        return points
    # One encoder for every camera, or (lerobot's default) one per camera: then the first camera's decides.
    separate = isinstance(model.rgb_encoder, torch.nn.ModuleList)
    encoder = model.rgb_encoder[0] if separate else model.rgb_encoder
    cameras = list(policy.config.image_features)[:1] if separate else list(policy.config.image_features)

    def preprocess_images(obs: Observation) -> torch.Tensor:
        batch = wrapper.preprocessor(wrapper.batch(obs))
        images = torch.cat([batch[key] for key in cameras])
        images = encoder.resize(images) if encoder.resize is not None else images
        images = encoder.center_crop(images) if encoder.do_crop else images  # as at evaluation
        return _before(encoder.backbone[-1], encoder.backbone, images)

    points.update(vision_encoder=encoder.backbone[-1], preprocess_images=preprocess_images)
    return points


def _pi(wrapper) -> dict:
    policy = wrapper.policy
    with_expert = policy.model.paligemma_with_expert
    paligemma = with_expert.paligemma.model
    lm, expert = paligemma.language_model, with_expert.gemma_expert.model
    vision = paligemma.vision_tower.config
    tokens_per_image = (vision.image_size // vision.patch_size) ** 2

    def preprocess_images(obs: Observation) -> torch.Tensor:
        """SigLIP's output for the policy's cameras, stacked on the batch axis: what the projector reads."""
        images, _ = policy._preprocess_images(wrapper.preprocessor(wrapper.batch(obs)))  # lerobot has no public one
        return paligemma.vision_tower(pixel_values=torch.cat(images)).last_hidden_state

    def remove_layers(indices: list[int]):
        if len(lm.layers) != len(expert.layers):
            raise ValueError(f"layer_prune removes a VLM layer with its expert layer; this {policy.config.type} "
                             f"has {len(expert.layers)} expert layers for {len(lm.layers)} VLM layers")
        keep = [i for i in range(len(lm.layers)) if i not in set(indices)]
        restores = [drop_layers(lm.layers, lm.config, keep), drop_layers(expert.layers, expert.config, keep)]

        def undo() -> None:
            for restore in reversed(restores):
                restore()

        return undo

    # The prefix: every camera's visual tokens (cameras the batch lacks are padded in, masked), then the text.
    cameras = len(policy.config.image_features)
    return {
        "vision_encoder": paligemma.multi_modal_projector,
        "visual_tokens": paligemma.multi_modal_projector,
        "preprocess_images": preprocess_images,
        "language_model": LanguageModel(layers=lm.layers, norm=lm.norm, config=lm.config, module=lm,
                                        rotary_emb=lm.rotary_emb, caches_prefix=True, remove_layers=remove_layers,
                                        visual_token_span=lambda: (0, cameras * tokens_per_image)),
        "denoising_head": DenoisingHead(step=with_expert, steps=policy.config.num_inference_steps,
                                        blocks=_ExpertBlocks(expert.layers), is_prefix=_is_prefix),
        "hot_paths": (paligemma.vision_tower, paligemma.multi_modal_projector, lm, with_expert),
    }


STRUCTURES = {"smolvla": _smolvla, "act": _act, "diffusion": _diffusion, "pi0": _pi, "pi05": _pi}


def structure_of(wrapper, checkpoint_dir: Path | None) -> PolicyStructure:
    points = STRUCTURES[wrapper.config.type](wrapper) if wrapper.config.type in STRUCTURES else {}
    return PolicyStructure(weights=wrapper.policy, checkpoint_dir=checkpoint_dir, **points)
