"""ModelOpt NVFP4 and FP8 weights as float32, in numpy, from the format definition alone.

The oracle the family's ModelOpt tests check nemoq against. It shares no code with nemoq's
converter nor with the fixture's torch quantizer (tests/fixtures/modelopt.py): it parses the
safetensors bytes itself and decodes every float8 bit pattern by hand.
* E4M3 (float8_e4m3fn): sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
  subnormal (m/8 x 2^-6); S.1111.111 is NaN; no infinities.
* E2M1 code: sign << 3 | magnitude index into 0, 0.5, 1, 1.5, 2, 3, 4, 6.
* NVFP4 `<m>.weight` uint8 (out, in/2), element 2i in the low nibble, 2i+1 in the high one;
  value = e2m1 x e4m3(weight_scale) x weight_scale_2, left to right in float32, 16 values a group.
* FP8 value = e4m3(weight) x weight_scale (a scalar, or one per output row).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
E2M1_CODES = np.concatenate([E2M1, -E2M1])
GROUP = 16
# safetensors dtype -> numpy dtype of its bytes (float8 kept as raw bits, bf16 as uint16)
STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F8_E4M3": np.uint8, "U8": np.uint8,
           "I64": np.int64}
NOT_COPIED = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")
COMPANIONS = (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")


def e4m3(bits: np.ndarray) -> np.ndarray:
    b = bits.astype(np.int64)
    e, m = (b >> 3) & 0xF, b & 7
    magnitude = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * np.exp2(e - 7))
    magnitude = np.where((e == 15) & (m == 7), np.nan, magnitude)
    return np.where(b & 0x80, -magnitude, magnitude).astype(np.float32)


def nvfp4(packed: np.ndarray, scale_bits: np.ndarray, scale_2: np.ndarray) -> np.ndarray:
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    groups = E2M1_CODES[codes].reshape(*codes.shape[:-1], -1, GROUP)
    values = groups * e4m3(scale_bits)[..., None] * np.float32(scale_2.reshape(()))
    return values.reshape(codes.shape).astype(np.float32)


def fp8(bits: np.ndarray, scale: np.ndarray) -> np.ndarray:
    scale = scale.astype(np.float32)
    return e4m3(bits) * (scale.reshape(-1, 1) if scale.size > 1 else scale.reshape(()))


def read_shard(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """{name: (safetensors dtype, array of its stored bytes)} of one file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        data = np.frombuffer(raw, STORAGE[info["dtype"]], offset=8 + n + start,
                             count=(end - start) // np.dtype(STORAGE[info["dtype"]]).itemsize)
        out[name] = (info["dtype"], data.reshape(info["shape"]))
    return out


def as_float32(dtype: str, data: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32)


def dequantized_state(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a hub-layout ModelOpt checkpoint as float32 values, scales consumed."""
    stored = {}
    for shard in sorted(Path(model_dir).glob("model*.safetensors")):
        stored.update(read_shard(shard))
    out = {}
    for name, (dtype, data) in stored.items():
        if name.endswith(COMPANIONS):
            continue
        module = name.removesuffix(".weight")
        scale = stored.get(module + ".weight_scale")
        if scale is None:
            out[name] = as_float32(dtype, data)
        elif dtype == "U8":
            out[name] = nvfp4(data, scale[1], stored[module + ".weight_scale_2"][1])
        else:
            out[name] = fp8(data, as_float32(*scale))
    return out


def write_float_checkpoint(model_dir: Path, out_dir: Path) -> Path:
    """The float32 checkpoint of a ModelOpt checkpoint's values, for transformers and nemoq's float path."""
    from safetensors.numpy import save_file
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in model_dir.iterdir():   # tokenizer and generation config
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in NOT_COPIED:
            shutil.copyfile(extra, out_dir / extra.name)
    save_file(dequantized_state(model_dir), str(out_dir / "model.safetensors"))
    return out_dir


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest even) -> float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)
