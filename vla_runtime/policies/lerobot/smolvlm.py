"""SmolVLA's VLM backbone, offline: a local folder with a `SmolVLMConfig`, a tokenizer that defines SmolVLM's
special tokens, and a `SmolVLMProcessor`, which is all `SmolVLAConfig(vlm_model_name=<folder>,
load_vlm_weights=False)` reads. No hub is reachable here, so the VLM weights are random (trained from scratch
with the rest of the policy, or random for speed tables); the tokenizer is word-level over the suites'
instructions (SmolVLM's own is a 49 k BPE that cannot be downloaded).

Sizes: `full` is SmolVLM2-500M's shape as SmolVLA uses it (text: Llama, hidden 960, 32 layers of which
SmolVLA keeps 16, 15 heads / 5 KV heads, vocab 49280; vision: SigLIP 768 wide, 12 layers, 512 px, patch 16;
pixel shuffle 4: 64 visual tokens per camera). `small` is what we train here (64 visual tokens from 128 px),
`tiny` builds in a second for tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                  "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}


@dataclass(frozen=True)
class SmolVLMSize:
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int | None  # None: the tokenizer's
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    scale_factor: int

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


SIZES = {
    "full": SmolVLMSize(960, 32, 15, 5, 2560, 49280, 768, 12, 12, 3072, 512, 16, 4),
    "small": SmolVLMSize(256, 8, 4, 2, 768, None, 192, 4, 3, 768, 128, 8, 2),
    "tiny": SmolVLMSize(64, 4, 2, 1, 128, None, 32, 1, 2, 64, 32, 8, 2),
}


def write_smolvlm(folder: str | Path, instructions: list[str], size: str = "small") -> Path:
    """Writes the SmolVLM config, tokenizer and processor for `size` (one of SIZES) into `folder`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    if size not in SIZES:
        raise ValueError(f"Unknown SmolVLM size '{size}'; choose one of {', '.join(SIZES)}")
    shape = SIZES[size]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<|im_start|>", *SPECIAL_TOKENS.values()]
    words.train_from_iterator(instructions, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                        extra_special_tokens=SPECIAL_TOKENS, model_max_length=8192)
    vocab_size = shape.vocab_size or len(tokenizer)
    config = SmolVLMConfig(
        text_config={"model_type": "llama", "hidden_size": shape.text_hidden, "num_hidden_layers": shape.text_layers,
                     "num_attention_heads": shape.text_heads, "num_key_value_heads": shape.text_kv_heads,
                     "intermediate_size": shape.text_intermediate, "vocab_size": vocab_size,
                     "head_dim": shape.text_hidden // shape.text_heads, "max_position_embeddings": 8192,
                     "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "pad_token_id": tokenizer.pad_token_id,
                     "tie_word_embeddings": False},
        vision_config={"hidden_size": shape.vision_hidden, "num_hidden_layers": shape.vision_layers,
                       "num_attention_heads": shape.vision_heads, "intermediate_size": shape.vision_intermediate,
                       "image_size": shape.image_size, "patch_size": shape.patch_size},
        scale_factor=shape.scale_factor, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id, vocab_size=vocab_size,
    )
    config.save_pretrained(folder)
    resolution = {"longest_edge": shape.image_size}
    processor = SmolVLMProcessor(
        SmolVLMImageProcessor(size=resolution, max_image_size=resolution, do_image_splitting=False),
        tokenizer, SmolVLMVideoProcessor(size=resolution, max_image_size=resolution),
        image_seq_len=shape.visual_tokens)
    processor.save_pretrained(folder)
    (folder / "vla_runtime_smolvlm.json").write_text(json.dumps({"size": size, **asdict(shape)}, indent=1) + "\n")
    return folder


# SmolVLA keeps the first 16 of SmolVLM2's 32 text layers; the smaller backbones keep all of theirs.
VLM_LAYERS = {"full": 16, "small": 8, "tiny": 4}


def smolvla_options(folder: str | Path, size: str) -> dict:
    """`SmolVLAConfig` fields for a VLM written by `write_smolvlm(folder, ..., size)`: its random weights are
    trained with the rest (SmolVLA's defaults freeze a pretrained VLM), images padded to its resolution."""
    shape = SIZES[size]
    return {"vlm_model_name": str(folder), "load_vlm_weights": False, "num_vlm_layers": VLM_LAYERS[size],
            "resize_imgs_with_padding": (shape.image_size, shape.image_size),
            "train_expert_only": False, "freeze_vision_encoder": False}


def random_smolvla(folder: str | Path, instructions: list[str], size: str, cameras: tuple[str, ...],
                   image_size: tuple[int, int], state_dim: int, action_dim: int, **config):
    """A SmolVLA with RANDOM weights shaped for a robot, and its processors with identity normalisation:
    (policy, preprocessor, postprocessor). For speed measurements and tests; its actions mean nothing."""
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    write_smolvlm(folder, instructions, size)
    inputs = {f"observation.images.{camera}": PolicyFeature(FeatureType.VISUAL, (3, *image_size)) for camera in cameras}
    inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (state_dim,))
    outputs = {"action": PolicyFeature(FeatureType.ACTION, (action_dim,))}
    policy_config = SmolVLAConfig(input_features=inputs, output_features=outputs,
                                  **{"device": "cpu", **smolvla_options(folder, size), **config})
    policy = SmolVLAPolicy(policy_config)
    stats = {"observation.state": {"mean": torch.zeros(state_dim), "std": torch.ones(state_dim)},
             "action": {"mean": torch.zeros(action_dim), "std": torch.ones(action_dim)}}
    preprocessor, postprocessor = make_pre_post_processors(policy_config, dataset_stats=stats)
    return policy, preprocessor, postprocessor
