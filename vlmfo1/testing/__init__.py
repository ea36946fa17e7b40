"""Random-weight checkpoints for tests, demos and benchmarks; the runtime never imports this package.

    from vlmfo1.testing import write_random_qwen2, write_random_fo1, write_random_upn
    write_random_qwen2("/tmp/qwen-tiny")                    # a Qwen2 decoder (vlmfo1.testing.qwen2)
    write_random_fo1("/tmp/VLM-FO1_Qwen2.5-VL-3B-tiny")     # a VLM-FO1 checkpoint in the official layout (.fo1)
    write_random_upn("/tmp/upn-tiny.safetensors")           # UPN (ChatRex proposals), official state-dict names (.upn)

No trained weights are reachable on the test machines, so tests run on random weights in exactly the layout of the
real checkpoints. Only the standard library, NumPy and vlmfo1 modules are imported.
"""
from .fo1 import fo1_config, fo1_shapes, random_tensor, write_fo1_tokenizer, write_random_fo1  # noqa: F401
from .qwen2 import QWEN25_3B, TINY, qwen2_shapes, write_random_qwen2  # noqa: F401
from .upn import (random_tensor as upn_random_tensor, upn_config, upn_shapes,  # noqa: F401
                  write_random_upn)
