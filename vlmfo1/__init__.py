"""vlmfo1 — fast CPU inference for the VLM-FO1 vision-language model (C core, thin Python layer).

The Qwen2.5 language decoder is available as LanguageModel; the tokenizer as Tokenizer.
torch and transformers are never imported here.
"""
from .decoder import DecoderConfig, LanguageModel, Session  # noqa: F401

try:
    from .tokenizer import Tokenizer  # noqa: F401
except ImportError:  # pragma: no cover - tokenizer module is optional until present
    pass

__version__ = "0.1.0"
