"""Q8_0 now lives in nemoq.quant.formats (FORMATS["q8_0"]); this module keeps the old import path."""

from __future__ import annotations

from nemoq.quant.formats import FORMATS
from nemoq.quant.formats.q8_0 import round_half_away

BLOCK = FORMATS["q8_0"].block_size
BLOCK_BYTES = FORMATS["q8_0"].type_size
quantize = FORMATS["q8_0"].quantize
dequantize = FORMATS["q8_0"].dequantize

__all__ = ["BLOCK", "BLOCK_BYTES", "dequantize", "quantize", "round_half_away"]
