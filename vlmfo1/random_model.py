"""Old home of the random Qwen2 checkpoint writer, kept for the imports written before the move.

The writer lives in vlmfo1.testing.qwen2 now (`from vlmfo1.testing import write_random_qwen2`); this module only
re-exports it. The runtime never imports it.
"""
from .testing.qwen2 import QWEN25_3B, TINY, _random_tensor, qwen2_shapes, write_random_qwen2  # noqa: F401
