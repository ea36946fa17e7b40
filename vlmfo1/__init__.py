"""vlmfo1 — fast CPU inference for the VLM-FO1 vision-language model (C core, thin Python layer).

FO1 (VLM-FO1: detection and region understanding over proposal boxes), QwenVL (plain Qwen2.5-VL),
LanguageModel (the Qwen2.5 decoder) and Tokenizer. torch and transformers are never imported here.
"""
from .decoder import DecoderConfig, LanguageModel, Session  # noqa: F401
from .fo1 import FO1  # noqa: F401
from .fo1_prompt import FO1Result  # noqa: F401
from .qwen_vl import QwenVL  # noqa: F401

from .tokenizer import Tokenizer  # noqa: F401

__version__ = "0.1.0"
