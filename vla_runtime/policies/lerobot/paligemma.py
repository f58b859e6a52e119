"""pi0 / pi0.5 with RANDOM weights, built offline: for tests and speed tables, never for success.

A real pi0 / pi0.5 checkpoint loads through `policy=lerobot policy.path=...` with none of this. Building one
from scratch here needs three things lerobot 0.6.1 fixes by name: its PaliGemma tokenizer comes from the hub
(`google/paligemma-3b-pt-224`, unreachable offline), its two Gemmas are named variants (`gemma_2b` for the
VLM, `gemma_300m` for the action expert), and its SigLIP tower, projection width and 257 k vocabulary are
hard-coded in `PaliGemmaWithExpertModel`. `random_pi` replaces those names inside lerobot's modules while the
policy is built, and puts them back. That is FRAGILE: it depends on lerobot 0.6.1's internals (module-level
`get_gemma_config` and `PaliGemmaForConditionalGenerationWithPiGemma`, `AutoTokenizer` in its tokenizer step)
and fails loudly, naming what moved, on another version.

Sizes: `full` is lerobot's own shape (PaliGemma 3B: SigLIP So400m at 224 px, 256 visual tokens per camera,
Gemma 2B; Gemma 300M expert; ~3.3 B parameters), only the tokenizer replaced; `tiny` builds in a second.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from unittest import mock


@dataclass(frozen=True)
class PiSize:
    vlm: tuple[int, int, int, int, int, int] | None  # Gemma (width, depth, mlp, heads, kv heads, head dim)
    expert: tuple[int, int, int, int, int, int] | None  # None: lerobot's named variants
    vision: dict | None  # SiglipVisionConfig fields; None: lerobot's (So400m)
    image_size: int = 224


SIZES = {
    "full": PiSize(None, None, None),
    "tiny": PiSize((64, 4, 128, 2, 1, 32), (32, 4, 64, 2, 1, 32),
                   {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                    "patch_size": 8}, image_size=32),
}


def word_tokenizer(instructions: list[str]):
    """A word-level tokenizer over the suite's instructions, with the pad token PaliGemma's step pads with."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(instructions, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<bos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   model_max_length=8192)


@contextmanager
def _lerobot_builds(size: PiSize, tokenizer):
    """Within: lerobot builds pi0 / pi0.5 at `size`, and its tokenizer step takes `tokenizer`."""
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05
    from lerobot.processor import tokenizer_processor

    class OfflineTokenizer:
        @staticmethod
        def from_pretrained(name, *args, **kwargs):
            return tokenizer

    with ExitStack() as stack:
        for module, name in ((tokenizer_processor, "AutoTokenizer"), (modeling_pi0, "get_gemma_config"),
                             (modeling_pi05, "get_gemma_config"),
                             (modeling_pi0, "PaliGemmaForConditionalGenerationWithPiGemma"),
                             (modeling_pi05, "PaliGemmaForConditionalGenerationWithPiGemma")):
            if not hasattr(module, name):
                raise RuntimeError(f"random pi0 / pi0.5 patches {module.__name__}.{name}, which this lerobot does "
                                   "not have (written for lerobot 0.6.1)")
        stack.enter_context(mock.patch.object(tokenizer_processor, "AutoTokenizer", OfflineTokenizer))
        if size.vlm is not None:
            gemma = modeling_pi0.GemmaConfig
            variants = {"gemma_2b": gemma(*size.vlm), "gemma_300m": gemma(*size.expert)}
            paligemma = modeling_pi0.PaliGemmaForConditionalGenerationWithPiGemma

            def shrunk_paligemma(config):
                for field, value in size.vision.items():
                    setattr(config.vision_config, field, value)
                config.vision_config.projection_dim = config.text_config.hidden_size
                config.text_config.vocab_size = len(tokenizer)
                return paligemma(config=config)

            for module in (modeling_pi0, modeling_pi05):
                stack.enter_context(mock.patch.object(module, "get_gemma_config", variants.__getitem__))
                stack.enter_context(mock.patch.object(module, "PaliGemmaForConditionalGenerationWithPiGemma",
                                                      shrunk_paligemma))
        yield


def random_pi(kind: str, instructions: list[str], size: str, cameras: tuple[str, ...], image_size: tuple[int, int],
              state_dim: int, action_dim: int, **config):
    """A pi0 (`kind="pi0"`) or pi0.5 (`"pi05"`) with RANDOM weights shaped for a robot, and its processors with
    identity normalisation: (policy, preprocessor, postprocessor). Its actions mean nothing."""
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import get_policy_class, make_policy_config, make_pre_post_processors

    if size not in SIZES:
        raise ValueError(f"Unknown pi0 size '{size}'; choose one of {', '.join(SIZES)}")
    shape = SIZES[size]
    inputs = {f"observation.images.{camera}": PolicyFeature(FeatureType.VISUAL, (3, *image_size)) for camera in cameras}
    inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (state_dim,))
    outputs = {"action": PolicyFeature(FeatureType.ACTION, (action_dim,))}
    policy_config = make_policy_config(kind, input_features=inputs, output_features=outputs,
                                       image_resolution=(shape.image_size, shape.image_size),
                                       **{"device": "cpu", **config})
    stats = {"observation.state": {"mean": torch.zeros(state_dim), "std": torch.ones(state_dim)},
             "action": {"mean": torch.zeros(action_dim), "std": torch.ones(action_dim)}}
    if kind == "pi05":  # pi0.5 normalises by quantiles by default; identity stats for a random policy
        for stat in stats.values():
            stat.update(q01=-torch.ones_like(stat["mean"]), q99=torch.ones_like(stat["mean"]),
                        min=-torch.ones_like(stat["mean"]), max=torch.ones_like(stat["mean"]))
    with _lerobot_builds(shape, word_tokenizer(instructions)):
        policy = get_policy_class(kind)(policy_config)
        preprocessor, postprocessor = make_pre_post_processors(policy_config, dataset_stats=stats)
    return policy, preprocessor, postprocessor

