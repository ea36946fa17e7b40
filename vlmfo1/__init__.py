"""vlmfo1 — fast CPU inference for the VLM-FO1 vision-language model (C core, thin Python layer).

VLMFO1 (VLM-FO1: detection and region understanding over proposal boxes; FO1 is its older name), QwenVL (plain
Qwen2.5-VL), LanguageModel (the Qwen2.5 decoder) and Tokenizer; FO1Result and the proposal helpers; EncodedImage
(VLMFO1.encode: one image, many questions), Conversation and ImageCache. torch and
transformers are never imported here.
"""
from .context import Conversation, EncodedImage, ImageCache  # noqa: F401
from .decoder import DecoderConfig, LanguageModel, Session  # noqa: F401
from .fo1 import FO1, TASKS, VLMFO1  # noqa: F401
from .proposals import (BOX_FORMATS, CallableProposals, CocoJsonlProposals, CocoResultsProposals,  # noqa: F401
                        FO1EvalProposals, Proposals, ProposalSource, as_boxes, filter_proposals)
from .qwen_vl import QwenVL  # noqa: F401
from .results import COCO_CATEGORIES, COCO_CATEGORY_IDS, Detection, FO1Result, coco_results  # noqa: F401
from .tokenizer import Tokenizer  # noqa: F401
from .upn import UPN  # noqa: F401

__version__ = "0.2.0"
