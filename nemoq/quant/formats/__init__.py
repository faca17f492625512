"""ggml block formats as readable numpy: quantize and dequantize in ggml's exact byte layouts.

    from nemoq.quant.formats import FORMATS
    fmt = FORMATS["q4_k"]
    blocks = fmt.quantize(x, importance)   # float32 (rows, n) -> uint8 (rows, n / block_size * type_size)
    y = fmt.dequantize(blocks)             # -> float32 (rows, n), bit-identical to ggml and gguf-py

`importance` is llama.cpp's imatrix for the tensor (one non-negative weight per column) or None.
Quantizers minimise sum_i importance_i (x_i - y_i)^2 (plain squared error without importance)
and never do worse than ggml's own quantizer on that measure: each computes ggml's result and
its own search and keeps the better per block. Q8_0 is ggml's bit for bit. Each module's
docstring describes its block layout.
"""

from __future__ import annotations

from nemoq.quant.formats.base import Format
from nemoq.quant.formats.iq4_nl import IQ4_NL
from nemoq.quant.formats.mxfp4 import MXFP4
from nemoq.quant.formats.nvfp4 import NVFP4
from nemoq.quant.formats.q4_0 import Q4_0
from nemoq.quant.formats.q4_k import Q4_K
from nemoq.quant.formats.q5_0 import Q5_0
from nemoq.quant.formats.q5_1 import Q5_1
from nemoq.quant.formats.q5_k import Q5_K
from nemoq.quant.formats.q6_k import Q6_K
from nemoq.quant.formats.q8_0 import Q8_0

FORMATS: dict[str, Format] = {f.name: f for f in (
    Q8_0(), Q5_1(), Q5_0(), Q4_0(), IQ4_NL(), Q4_K(), Q5_K(), Q6_K(), MXFP4(), NVFP4(),
)}

__all__ = ["FORMATS", "Format"]
