"""Damaging files on purpose: where a GGUF header keeps its counts and lengths, seeded mutations
of binary and JSON files, and the check that a command met bad input with one clean error."""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf

HUGE = (2**60, 2**63, 2**64 - 1, 2**32, 2**31 - 1)


@dataclass
class GGUFLayout:
    """Byte positions of the fields of one GGUF header a mutation may overwrite, by kind."""
    size: int
    data_start: int
    positions: dict[str, list[int]] = field(default_factory=dict)

    def add(self, kind: str, position: int) -> None:
        self.positions.setdefault(kind, []).append(position)


def gguf_layout(path: Path) -> GGUFLayout:
    """Where gguf-py found each count, length, type code and offset of a good file."""
    reader = gguf.GGUFReader(path)
    layout = GGUFLayout(path.stat().st_size, int(reader.data_offset))
    layout.add("version", 4)
    layout.add("tensor_count", 8)
    layout.add("kv_count", 16)
    for f in reader.fields.values():
        if f.name.startswith("GGUF."):
            continue
        starts, pos = [], f.offset
        for part in f.parts:
            starts.append(pos)
            pos += part.nbytes
        layout.add("key_length", starts[0])
        layout.add("value_type", starts[2])
        if f.types[-1] in SCALAR_KINDS:   # a scalar, or the first items of an array of scalars
            first = 3 if len(f.types) == 1 else 5
            for i in range(first, min(len(starts), first + 8)):
                layout.add(SCALAR_KINDS[f.types[-1]], starts[i])
        if f.types[0] == gguf.GGUFValueType.STRING:
            layout.add("string_length", starts[3])
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            layout.add("array_item_type", starts[3])
            layout.add("array_length", starts[4])
            if f.types[-1] == gguf.GGUFValueType.STRING:   # (length, bytes) per item
                for i in range(5, min(len(starts), 5 + 2 * 64), 2):
                    layout.add("string_length", starts[i])
    for t in reader.tensors:
        starts, pos = [], t.field.offset
        for part in t.field.parts:
            starts.append(pos)
            pos += part.nbytes
        for kind, start in zip(("name_length", "n_dims", "dims", "tensor_type", "tensor_offset"),
                               (starts[0], starts[2], starts[3], starts[4], starts[5])):
            layout.add(kind, start)
    return layout


V = gguf.GGUFValueType
SCALAR_KINDS = {V.UINT32: "u32_value", V.INT32: "i32_value", V.FLOAT32: "f32_value", V.BOOL: "bool_value",
                V.UINT64: "u64_value"}
# metadata values a mutation writes (what llama.cpp and nemoq read from them)
GGUF_VALUES = {
    "u32_value": ("<I", (0, 1, 3, 7, 1000, 2**31, 2**32 - 1)),
    "i32_value": ("<i", (-1, 0, 3, 2**31 - 1)),
    "f32_value": ("<f", (float("nan"), float("inf"), -1.0, 0.0)),
    "bool_value": ("<B", (2, 255)),
    "u64_value": ("<Q", (0, 2**63)),
}
# kind of field -> struct code of its value and the values a mutation writes there
GGUF_FIELD_VALUES = {
    "version": ("<I", (0, 1, 4, 2**31, 0xFFFF)),
    "tensor_count": ("<Q", HUGE),
    "kv_count": ("<Q", HUGE),
    "key_length": ("<Q", HUGE + (0,)),
    "string_length": ("<Q", HUGE),
    "array_length": ("<Q", HUGE),
    "name_length": ("<Q", HUGE + (0,)),
    "value_type": ("<I", (9, 8, 13, 255, 2**31)),
    "array_item_type": ("<I", (9, 8, 13, 2**32 - 1)),
    "n_dims": ("<I", (0, 5, 2**31)),
    "dims": ("<Q", (0, 3, 2**62, 2**64 - 1)),
    "tensor_type": ("<I", (4, 5, 31, 39, 1000, 2**32 - 1)),
    "tensor_offset": ("<Q", (1, 2**60, 2**64 - 32)),
}


def mutate_bytes(data: bytes, rng: random.Random, kind: str, header_end: int,
                 layout: GGUFLayout | None = None) -> tuple[bytes, str]:
    """One seeded mutation of a binary file; returns the new bytes and what was done."""
    b = bytearray(data)
    if kind == "truncate":
        n = rng.randrange(len(b))
        return bytes(b[:n]), f"truncated to {n} bytes"
    if kind == "truncate_data":
        n = rng.randrange(min(header_end, len(b) - 1), len(b))
        return bytes(b[:n]), f"truncated in the data, to {n} bytes"
    if kind == "flip":
        spots = [rng.randrange(header_end) for _ in range(rng.randint(1, 8))]
        for i in spots:
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"bits flipped at {spots}"
    if kind in ("field", "value"):
        table = GGUF_FIELD_VALUES if kind == "field" else GGUF_VALUES
        name = rng.choice(sorted(k for k in layout.positions if k in table))
        position = rng.choice(layout.positions[name])
        code, values = table[name]
        value = rng.choice(values)
        struct.pack_into(code, b, position, value)
        return bytes(b), f"{name} at byte {position} set to {value}"
    raise ValueError(kind)


JSON_ODD_VALUES = (None, -1, 0, 2**31, 2**63, 10**400, 1e308, 1.5, float("nan"), float("inf"), True, "7",
                   [], [1, 2], {}, {"a": 1}, "")


def json_paths(obj, prefix=(), depth: int = 3, limit: int = 40, rng: random.Random | None = None) -> list[tuple]:
    """Paths (tuples of keys/indexes) into a JSON value, a few per container."""
    out = []
    if depth == 0:
        return out
    if isinstance(obj, dict):
        keys = list(obj)
    elif isinstance(obj, list):
        keys = list(range(len(obj)))
    else:
        return out
    if rng is not None and len(keys) > limit:
        keys = rng.sample(keys, limit)
    for k in keys[:limit]:
        out.append(prefix + (k,))
        out += json_paths(obj[k], prefix + (k,), depth - 1, limit, rng)
    return out


def mutate_json(data: bytes, rng: random.Random, kind: str, focus: tuple = ()) -> tuple[bytes, str]:
    """One seeded mutation of a JSON file: damaged bytes, or a key deleted or given an odd value.
    `focus` prefers the key paths under it (e.g. ("model",) for tokenizer.json)."""
    if kind in ("truncate", "flip"):
        return mutate_bytes(data, rng, kind, len(data))
    obj = json.loads(data)
    if kind == "top_level":
        value = rng.choice([[], "x", 1, None, [obj]])
        return json.dumps(value).encode(), f"top level replaced by {json.dumps(value)[:30]}"
    paths = json_paths(obj, rng=rng)
    paths = [p for p in paths if p[:len(focus)] == focus] or paths
    path = rng.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if kind == "delete":
        del parent[path[-1]]
        return json.dumps(obj).encode(), f"deleted {list(path)}"
    if kind == "odd_value":
        value = rng.choice(JSON_ODD_VALUES)
        parent[path[-1]] = value
        return json.dumps(obj).encode(), f"{list(path)} set to {json.dumps(value)[:30]}"
    raise ValueError(kind)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip().startswith("error:")]


def check_clean(result, names: tuple[str, ...], out_dir: Path | None, expect_outputs=()) -> str | None:
    """Why `result` is not a clean outcome of bad input, or None when it is: exit 0, or exit 1
    with one `error:` line naming the file, no traceback; and no stray file in out_dir."""
    problems = []
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        problems.append(f"raised {type(result.exception).__name__}: {result.exception}")
    if "Traceback" in result.output:
        problems.append("traceback in the output")
    if result.exit_code != 0:
        lines = error_lines(result.output)
        if result.exit_code != 1:
            problems.append(f"exit code {result.exit_code}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} error lines")
        elif not any(n in lines[0] for n in names):
            problems.append(f"the error does not name {' or '.join(names)}")
    if out_dir is not None:
        left = sorted(p.name for p in out_dir.iterdir())
        allowed = set(expect_outputs) if result.exit_code == 0 else set()
        if set(left) - allowed:
            problems.append(f"left in the output folder: {left}")
    return "; ".join(problems) or None
