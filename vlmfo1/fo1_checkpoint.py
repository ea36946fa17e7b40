"""Old home of the random VLM-FO1 checkpoint writer, kept for the imports written before the move.

The writer, its tensor-shape tables and side files live in vlmfo1.testing.fo1 now (`from vlmfo1.testing import
write_random_fo1`); the token ids, placeholders and DaViT widths in vlmfo1.constants. This module only re-exports
them under their old names. The runtime never imports it.
"""
from .constants import DAVIT_LARGE, DEFAULT_TIKTOKEN, QWEN25_VOCAB_END  # noqa: F401
from .constants import IMAGE_INDEX as IMAGE_TOKEN_INDEX, MAX_BOXES as MAX_REGIONS  # noqa: F401
from .constants import REGION_INDEX as REGION_TOKEN_INDEX  # noqa: F401
from .testing.fo1 import (AUX_REGION_DIM, GENERATION_CONFIG, PREPROCESSOR_CONFIG, SIMPLE_FPN_DIM,  # noqa: F401
                          SIMPLE_FPN_OUT, count_params, davit_depths, davit_shapes, fo1_added_tokens, fo1_config,
                          fo1_shapes, fo1_token_ids, random_tensor, simple_fpn_shapes, vision_shapes,
                          write_fo1_tokenizer, write_random_fo1)
