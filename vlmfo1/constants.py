"""The fixed numbers and strings of the models, each defined once; every other module imports them from here.

Qwen2.5 token ids (the added-token table the tokenizer builds on, and the ids named after it), the ChatML default
system prompt, VLM-FO1's prompt placeholders and box limit, the Qwen2.5-VL patch size used when a config does not
name one, and the DaViT variants of the official code. Only the standard library is imported.
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

# ------------------------------------------------------------------------------------------------------------------
# Qwen2 / Qwen2.5 vocabulary

QWEN2_BASE_VOCAB_SIZE = 151643      # the byte-level BPE ranks; the added tokens follow

# Qwen2.5 added tokens: (content, id, special). The last eight are non-special added tokens in Qwen2.5's config.
QWEN2_ADDED_TOKENS: Tuple[Tuple[str, int, bool], ...] = (
    ("<|endoftext|>", 151643, True),
    ("<|im_start|>", 151644, True),
    ("<|im_end|>", 151645, True),
    ("<|object_ref_start|>", 151646, True),
    ("<|object_ref_end|>", 151647, True),
    ("<|box_start|>", 151648, True),
    ("<|box_end|>", 151649, True),
    ("<|quad_start|>", 151650, True),
    ("<|quad_end|>", 151651, True),
    ("<|vision_start|>", 151652, True),
    ("<|vision_end|>", 151653, True),
    ("<|vision_pad|>", 151654, True),
    ("<|image_pad|>", 151655, True),
    ("<|video_pad|>", 151656, True),
    ("<tool_call>", 151657, False),
    ("</tool_call>", 151658, False),
    ("<|fim_prefix|>", 151659, False),
    ("<|fim_middle|>", 151660, False),
    ("<|fim_suffix|>", 151661, False),
    ("<|fim_pad|>", 151662, False),
    ("<|repo_name|>", 151663, False),
    ("<|file_sep|>", 151664, False),
)
QWEN25_VOCAB_END = QWEN2_BASE_VOCAB_SIZE + len(QWEN2_ADDED_TOKENS)   # first id after Qwen2.5's added tokens
QWEN25_VOCAB_SIZE = 151936          # vocab_size of the Qwen2.5(-VL) checkpoints (embedding rows, padded)

_ADDED_ID: Dict[str, int] = {content: i for content, i, _ in QWEN2_ADDED_TOKENS}
ENDOFTEXT_ID = _ADDED_ID["<|endoftext|>"]       # bos and pad of the Qwen2.5 checkpoints
IM_START_ID = _ADDED_ID["<|im_start|>"]
IM_END_ID = _ADDED_ID["<|im_end|>"]             # eos of the chat checkpoints
VISION_START_ID = _ADDED_ID["<|vision_start|>"]
VISION_END_ID = _ADDED_ID["<|vision_end|>"]     # the token after the image placeholder in every FO1 prompt
VISION_PAD_ID = _ADDED_ID["<|vision_pad|>"]
IMAGE_PAD_ID = _ADDED_ID["<|image_pad|>"]       # the image token, when config.json does not name image_token_id
VIDEO_PAD_ID = _ADDED_ID["<|video_pad|>"]

# ChatML: the system turn Qwen2/2.5(-VL) chat templates and VLM-FO1's prompt builder add when none is given
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ------------------------------------------------------------------------------------------------------------------
# VLM-FO1 prompts

IMAGE_INDEX = -200     # "<image>" placeholder in FO1 prompt ids (never embedded: the image tokens go there)
REGION_INDEX = -300    # "<regionfeat>" placeholder (never embedded: one region token goes there)
MAX_BOXES = 100        # FO1's region tokens <region0> .. <region99>: the most proposal boxes one prompt can name

# ------------------------------------------------------------------------------------------------------------------
# vision

QWEN_PATCH_SIZE = 14   # Qwen2.5-VL ViT patch side in pixels, when config.json / preprocessor_config.json do not say

# The official DaViT `configs.py` variants (architecture numbers only). davit-large is VLM-FO1's auxiliary encoder;
# its stage widths are hard-coded in the official region encoder (omchat_arch.py: 256 + 512 + 1024 + 2048 = 3840).
DAVIT_CONFIGS: Dict[str, Dict] = {
    "davit-base": dict(depths=(1, 1, 9, 1), dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32),
                       num_groups=(4, 8, 16, 32), patch_size=(7, 3, 3, 3), patch_stride=(4, 2, 2, 2),
                       patch_padding=(3, 1, 1, 1), patch_prenorm=(False, True, True, True), window_size=12),
    "davit-large": dict(depths=(1, 1, 9, 1), dims=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64),
                        num_groups=(8, 16, 32, 64), patch_size=(7, 3, 3, 3), patch_stride=(4, 2, 2, 2),
                        patch_padding=(3, 1, 1, 1), patch_prenorm=(False, True, True, True), window_size=12),
}
DAVIT_LARGE = DAVIT_CONFIGS["davit-large"]

# ------------------------------------------------------------------------------------------------------------------
# files

# The Qwen BPE ranks shipped with the project (../shared/data next to a source checkout); the CLI's demo and the
# random-checkpoint writers look here when no path is given.
DEFAULT_TIKTOKEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                "tokenizer", "qwen.tiktoken")
