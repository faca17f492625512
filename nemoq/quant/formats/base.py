"""What every block format shares: the Format interface and choosing the best of candidate encodings.

A format turns float32 rows into ggml blocks and back. Quantizers may take an importance
vector (llama.cpp's imatrix: one non-negative weight per column) and then minimise
sum_i w_i (x_i - dequantized_i)^2 instead of the plain squared error.

Every block is scale fields plus one code per value, and value i = a_i * code_values[code_i] + b_i
where a and b follow from the scale fields alone (`grid`). Rounding algorithms that choose each
value's code themselves (nemoq/quant/compensate.py) read a block's grid, write codes with
`with_codes` and scale fields with `with_fields`; each format declares where both live and how
they pack, and its own quantizer and dequantizer use the same helpers.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# Rows are quantized a chunk at a time so temporaries stay small (and in cache) for any tensor size.
CHUNK_VALUES = 1 << 18


class Format:
    ggml_type: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    code_values: ClassVar[np.ndarray]  # float32: the level of each code
    code_bytes: ClassVar[slice]  # where a block keeps its codes
    field_bytes: ClassVar[slice]  # ... and its scale fields

    def __init_subclass__(cls, ggml_type: GGMLQuantizationType, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.ggml_type = ggml_type
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[ggml_type]

    @property
    def name(self) -> str:
        return self.ggml_type.name.lower()

    def __repr__(self) -> str:
        return f"<format {self.name}: {self.block_size} values in {self.type_size} bytes>"

    def written_levels(self) -> tuple[np.ndarray, np.ndarray]:
        """The levels a quantizer may write, sorted, and a code for each (-0 maps to +0)."""
        return np.unique(self.code_values, return_index=True)

    def quantize(self, x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """float32 rows (..., n) -> uint8 rows (..., n / block_size * type_size)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[-1]
        if n % self.block_size:
            raise ValueError(f"{self.name}: row length {n} is not a multiple of the block size {self.block_size}")
        if importance is not None:
            importance = np.ascontiguousarray(importance, dtype=np.float32)
            if importance.shape != (n,):
                raise ValueError(f"{self.name}: importance has shape {importance.shape}, expected ({n},)")
            if not (np.isfinite(importance).all() and (importance >= 0).all()):
                raise ValueError(f"{self.name}: importance must be finite and non-negative")
        rows = x.reshape(-1, n)
        out = np.empty((rows.shape[0], n // self.block_size * self.type_size), dtype=np.uint8)
        step = max(1, CHUNK_VALUES // n)
        for r in range(0, rows.shape[0], step):
            out[r:r + step] = self.quantize_rows(rows[r:r + step], importance)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def dequantize(self, data: np.ndarray) -> np.ndarray:
        """uint8 rows (..., nbytes) -> float32 rows (..., nbytes / type_size * block_size)."""
        data = np.ascontiguousarray(data, dtype=np.uint8)
        if data.shape[-1] % self.type_size:
            raise ValueError(f"{self.name}: {data.shape[-1]} bytes per row is not a multiple of {self.type_size}")
        values = self.dequantize_blocks(data.reshape(-1, self.type_size))
        return values.reshape(*data.shape[:-1], data.shape[-1] // self.type_size * self.block_size)

    # Each format implements ggml_rows, search_rows (or quantize_rows) and dequantize_blocks.
    def quantize_rows(self, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        """float32 (rows, n) -> uint8 (rows, n / block_size * type_size): per block the better of
        ggml's encoding and nemoq's own search (ggml's on ties)."""
        w = metric_weights(x, importance)
        return self.best_of(x, w, self.ggml_rows(x, importance), self.search_rows(x, importance))

    def search_rows(self, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        """nemoq's own search alone: the encoding with the lowest weighted squared error it finds,
        without ggml's as a candidate (tests/test_format_searches.py measures it against ggml's)."""
        raise NotImplementedError

    def ggml_rows(self, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        """What ggml's quantizer (ggml_quantize_chunk) makes of these rows, ported to numpy: ggml's
        bytes exactly (tests/test_formats.py), every float32 operation in ggml's order. (MXFP4's
        exponent is the exact floor of log2, where ggml's log2f may round up: mxfp4.py.)
        quantize_rows never does worse than this.
        """
        raise NotImplementedError

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """uint8 (n_blocks, type_size) -> float32 (n_blocks, block_size)."""
        raise NotImplementedError

    # Each format also declares its anatomy: the layout of codes and scale fields, and the grid.
    def pack_codes(self, q: np.ndarray) -> np.ndarray:
        """Codes uint8 (..., block_size) -> the bytes at code_bytes (..., n)."""
        raise NotImplementedError

    def unpack_codes(self, b: np.ndarray) -> np.ndarray:
        """The bytes at code_bytes (..., n) -> codes uint8 (..., block_size)."""
        raise NotImplementedError

    def pack_fields(self, *fields: np.ndarray) -> np.ndarray:
        """Scale fields, each (..., [k]) -> the bytes at field_bytes (..., n)."""
        raise NotImplementedError

    def unpack_fields(self, b: np.ndarray) -> tuple[np.ndarray, ...]:
        """The bytes at field_bytes (n_blocks, n) -> the scale fields, each (n_blocks, [k])."""
        raise NotImplementedError

    def grid_of(self, *fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scale fields -> (a, b), each float32 (n_blocks, block_size): value = a * code_values[code] + b,
        in the same float32 operations as dequantize_blocks."""
        raise NotImplementedError

    def codes(self, blocks: np.ndarray) -> np.ndarray:
        """uint8 (n_blocks, type_size) -> each value's code (n_blocks, block_size)."""
        return self.unpack_codes(blocks[:, self.code_bytes])

    def with_codes(self, blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
        """A copy of blocks with codes q (n_blocks, block_size), scale fields kept."""
        out = blocks.copy()
        out[:, self.code_bytes] = self.pack_codes(np.asarray(q, dtype=np.uint8))
        return out

    def fields(self, blocks: np.ndarray) -> tuple[np.ndarray, ...]:
        return self.unpack_fields(blocks[:, self.field_bytes])

    def with_fields(self, blocks: np.ndarray, *fields: np.ndarray) -> np.ndarray:
        """A copy of blocks with new scale fields, codes kept."""
        out = blocks.copy()
        out[:, self.field_bytes] = self.pack_fields(*fields)
        return out

    def grid(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) of each value of the blocks; see grid_of."""
        return self.grid_of(*self.fields(blocks))

    def best_of(self, x: np.ndarray, w: np.ndarray, *candidates: np.ndarray) -> np.ndarray:
        """Per block, the candidate encoding with the lowest weighted squared error (the first on ties).

        x: (rows, n) float32; w: weights of shape (rows or 1, n) or (rows or 1, ..., block) with
        the same n values per row; candidates: (rows, n_blocks * type_size) uint8.
        """
        rows, n = x.shape
        xb = x.reshape(rows, -1, self.block_size)
        wb = np.broadcast_to(w.reshape(w.shape[0], -1, self.block_size), xb.shape)
        errors = []
        for c in candidates:
            diff = xb - self.dequantize_blocks(c.reshape(-1, self.type_size)).reshape(xb.shape)
            errors.append((wb * diff * diff).sum(axis=-1))  # numpy's pairwise sum, whatever the platform
        pick = np.argmin(np.stack(errors), axis=0)  # (rows, n_blocks)
        stacked = np.stack([c.reshape(rows, -1, self.type_size) for c in candidates])
        best = np.take_along_axis(stacked, pick[None, :, :, None], axis=0)[0]
        return best.reshape(rows, -1)


def metric_weights(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """The weights of the error we minimise: the importance per column, or 1 without one."""
    return np.ones((1, x.shape[-1]), np.float32) if importance is None else importance[None, :]


def f16_bytes(d: np.ndarray) -> np.ndarray:
    """float32 (...) -> its IEEE half bits as uint8 (..., 2), rounded to nearest even like ggml."""
    return np.ascontiguousarray(d, dtype=np.float32).astype(np.float16)[..., None].view(np.uint8)


def f16_round(d: np.ndarray) -> np.ndarray:
    """The float32 value a scale has after being stored as half."""
    return np.asarray(d, dtype=np.float32).astype(np.float16).astype(np.float32)


def read_f16(b: np.ndarray) -> np.ndarray:
    """uint8 (..., 2) -> float32 (...)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0x0F) | (hi.astype(np.uint8) << 4)


def unpack_nibbles(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return b & 0x0F, b >> 4


def pack_halves(q: np.ndarray) -> np.ndarray:
    """4-bit codes (..., 2h) -> (..., h) bytes: byte j holds code j (low nibble) and code j + h (high)."""
    h = q.shape[-1] // 2
    return pack_nibbles(q[..., :h], q[..., h:])


def unpack_halves(b: np.ndarray) -> np.ndarray:
    return np.concatenate(unpack_nibbles(b), axis=-1)


def pack_five_bits(q: np.ndarray) -> np.ndarray:
    """5-bit codes (..., 32) -> 4 bytes of fifth bits (bit j: code j's, little-endian) then the
    low nibbles as pack_halves (Q5_0, Q5_1)."""
    qh = np.packbits(q >> 4, axis=-1, bitorder="little")
    return np.concatenate([qh, pack_halves(q & 0x0F)], axis=-1)


def unpack_five_bits(b: np.ndarray) -> np.ndarray:
    high = np.unpackbits(b[..., :4], axis=-1, bitorder="little")
    return unpack_halves(b[..., 4:]) | (high << 4)


class OneScale:
    """Blocks that start with one f16 scale d, value = d * level (Q8_0, Q4_0, Q5_0, IQ4_NL)."""

    def pack_fields(self, d):
        return f16_bytes(d)

    def unpack_fields(self, b):
        return (read_f16(b),)

    def grid_of(self, d):
        n = self.block_size
        return per_value(d[:, None], n), np.zeros((d.shape[0], n), np.float32)


class NibbleCodes:
    """4-bit codes, byte j holding code j and code j + 16 (Q4_0, IQ4_NL)."""

    def pack_codes(self, q):
        return pack_halves(q)

    def unpack_codes(self, b):
        return unpack_halves(b)


def per_value(a: np.ndarray, n: int) -> np.ndarray:
    """Per-group values (n_blocks, groups) -> per value (n_blocks, groups * n), each repeated n times."""
    return np.repeat(np.asarray(a, dtype=np.float32), n, axis=-1)
