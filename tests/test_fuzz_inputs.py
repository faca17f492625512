"""Seeded fuzzing of every file nemoq reads, through the commands that read them.

Files: a GGUF model, an imatrix (GGUF and llama.cpp's legacy .dat), a safetensors shard, and a
checkpoint's config.json, tokenizer.json, tokenizer_config.json and safetensors index.

Each case damages one good file (truncation, flipped header bits, huge counts and lengths, wrong
value types, deleted or odd JSON values, ...) and runs one command on it in-process. Whatever the
damage, the command either succeeds or prints exactly one `error:` line naming the file, exits 1,
never shows a traceback, stays within a few seconds and a bounded amount of memory, and leaves
nothing in its output folder. A case is reproducible alone: `pytest -k "config-convert-7"`;
NEMOQ_FUZZ_SEED=N draws other cases.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from nemoq.calib.imatrix_file import ImportanceMatrix, write_imatrix
from nemoq.convert.config import load_config
from nemoq.convert.plan import tensor_specs
from tests.conftest import run_cli
from tests.fixtures.checkpoints import write_checkpoint
from tests.malformed import check_clean, gguf_layout, mutate_bytes, mutate_json

SEED = int(os.environ.get("NEMOQ_FUZZ_SEED", "16"))
SECONDS_PER_CASE = 5
MEMORY_GROWTH_MB = 300

# file kind -> the mutations drawn for it (repeats weight the draw)
MUTATIONS = {
    "gguf": ("truncate", "truncate_data", "flip", "field", "field", "value", "value"),
    "imatrix_gguf": ("truncate", "truncate_data", "flip", "field", "field", "value", "values"),
    "imatrix_dat": ("truncate", "flip", "dat_field", "dat_field", "values"),
    "safetensors": ("truncate", "truncate_data", "flip", "header_length", "header_json", "header_json"),
    "config": ("truncate", "flip", "delete", "odd_value", "odd_value", "odd_value", "top_level"),
    "tokenizer": ("truncate", "flip", "delete", "odd_value", "odd_value", "odd_value", "top_level"),
    "tokenizer_config": ("truncate", "flip", "delete", "odd_value", "odd_value", "top_level"),
    "index": ("truncate", "flip", "delete", "odd_value", "odd_value", "top_level"),
}
# the checkpoint's JSON files, by file kind
JSON_FILES = {"config": "config.json", "tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json",
              "index": "model.safetensors.index.json"}
# (file kind, command, cases)
TARGETS = (
    ("gguf", "info", 40), ("gguf", "quantize", 30), ("gguf", "eval", 30), ("gguf", "calibrate", 25),
    ("imatrix_gguf", "quantize_imatrix", 40), ("imatrix_dat", "quantize_imatrix", 30),
    ("safetensors", "convert", 30), ("safetensors", "quantize", 15), ("safetensors", "calibrate", 15),
    ("config", "convert", 30), ("config", "dry_run", 15), ("config", "quantize", 10), ("config", "calibrate", 15),
    ("tokenizer", "convert", 25), ("tokenizer", "calibrate", 15),
    ("tokenizer_config", "convert", 15), ("tokenizer_config", "calibrate", 15),
    ("index", "convert", 15), ("index", "quantize", 5),
)
CASES = [(kind, command, i) for kind, command, n in TARGETS for i in range(n)]
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
# the parts of a JSON file a mutation aims at (a tokenizer's vocab alone would take most draws)
FOCUS = {
    "tokenizer": ((), ("model",), ("model", "vocab"), ("model", "merges"), ("added_tokens",), ("pre_tokenizer",)),
    "tokenizer_config": ((), ("bos_token",), ("eos_token",), ("chat_template",), ("add_bos_token",)),
}


@dataclass
class Pristine:
    root: Path
    ckpt: Path
    gguf: Path
    imatrix_gguf: Path
    imatrix_dat: Path
    dat_fields: list[tuple[int, str]]      # (byte position, i32 field) of the .dat file
    dat_values: list[int]                  # byte positions of its floats
    text: Path
    max_rss_mb: float


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def legacy_dat(path: Path, entries: dict[str, np.ndarray]) -> tuple[list[tuple[int, str]], list[int]]:
    """llama.cpp's legacy imatrix layout; returns where its i32 fields and floats lie."""
    blob, fields, values = bytearray(struct.pack("<i", len(entries))), [(0, "n_entries")], []
    for name, v in entries.items():
        fields.append((len(blob), "name_length"))
        blob += struct.pack("<i", len(name)) + name.encode()
        fields += [(len(blob), "call_count"), (len(blob) + 4, "value_count")]
        blob += struct.pack("<ii", 10, v.size)
        values += [len(blob) + 4 * i for i in range(0, v.size, 7)]
        blob += v.astype("<f4").tobytes()
    path.write_bytes(bytes(blob) + struct.pack("<i", 10))
    return fields, values


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    """Good inputs of every kind, each checked to succeed through its commands before any is damaged."""
    root = tmp_path_factory.mktemp("fuzz")
    ckpt = write_checkpoint(root / "ckpt", layout="hub", dtype="float32")
    gguf_path = root / "model.gguf"
    assert run_cli("convert", ckpt, "-o", gguf_path, "--outtype", "f32").exit_code == 0
    rng = np.random.default_rng(SEED)
    specs = [s for s in tensor_specs(load_config(ckpt)) if not s.keep_f32 and len(s.shape) >= 2]
    counts = {s.name: rng.integers(1, 50, s.n_matrices).astype(np.float32) for s in specs}
    sums = {s.name: rng.random((s.n_matrices, s.row_width), dtype=np.float32) * counts[s.name][:, None]
            for s in specs}
    write_imatrix(root / "imatrix.gguf", ImportanceMatrix(sums, counts, ["fuzz"], 1, 8))
    flat = {s.name: rng.random(s.row_width, dtype=np.float32) for s in specs if s.n_matrices == 1}
    dat_fields, dat_values = legacy_dat(root / "imatrix.dat", flat)
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 40)
    p = Pristine(root, ckpt, gguf_path, root / "imatrix.gguf", root / "imatrix.dat", dat_fields, dat_values,
                 text, 0.0)
    for kind, command, _ in TARGETS:   # every command succeeds on the undamaged files
        work = root / f"good-{kind}-{command}"
        args, outputs, _ = prepare(p, kind, command, None, work)
        result = run_cli(*args)
        assert result.exit_code == 0, (kind, command, result.output)
        assert sorted(x.name for x in (work / "out").iterdir()) == sorted(outputs)
        shutil.rmtree(work)
    p.max_rss_mb = max_rss_mb()
    return p


def _mutate_file(p: Pristine, kind: str, rng: random.Random, src: Path, dst: Path) -> str:
    data = src.read_bytes()
    mutation = rng.choice(MUTATIONS[kind])
    if kind in ("gguf", "imatrix_gguf"):
        layout = gguf_layout(src)
        if mutation == "values":
            position = rng.randrange(layout.data_start, layout.size - 4) // 4 * 4
            value = rng.choice((float("nan"), float("inf"), -1.0))
            new = bytearray(data)
            struct.pack_into("<f", new, position, value)
            new, what = bytes(new), f"float at byte {position} set to {value}"
        else:
            new, what = mutate_bytes(data, rng, mutation, layout.data_start, layout)
    elif kind == "imatrix_dat":
        if mutation == "dat_field":
            position, name = rng.choice(p.dat_fields)
            value = rng.choice((-1, 0, 2**31 - 1, 2**30, 7))
            new = bytearray(data)
            struct.pack_into("<i", new, position, value)
            new, what = bytes(new), f"{name} at byte {position} set to {value}"
        elif mutation == "values":
            position = rng.choice(p.dat_values)
            value = rng.choice((float("nan"), float("-inf"), -1.0))
            new = bytearray(data)
            struct.pack_into("<f", new, position, value)
            new, what = bytes(new), f"float at byte {position} set to {value}"
        else:
            new, what = mutate_bytes(data, rng, mutation, len(data))
    elif kind == "safetensors":
        (header_len,) = struct.unpack_from("<Q", data)
        header_end = 8 + header_len
        if mutation == "header_length":
            value = rng.choice((0, 1, header_len - 1, header_len + 1, len(data), 2**63, 2**64 - 1))
            new, what = struct.pack("<Q", value) + data[8:], f"header length set to {value}"
        elif mutation == "header_json":
            header, what = mutate_json(data[8:header_end], rng, rng.choice(("delete", "odd_value", "odd_value")))
            new = struct.pack("<Q", len(header)) + header + data[header_end:]
        else:
            new, what = mutate_bytes(data, rng, mutation, header_end)
    else:
        focus = rng.choice(FOCUS.get(kind, ((),)))
        new, what = mutate_json(data, rng, mutation, focus)
    dst.write_bytes(new)
    return f"{mutation}: {what}"


def prepare(p: Pristine, kind: str, command: str, rng: random.Random | None, work: Path):
    """(CLI arguments, outputs a success writes, the damaged file) for one case in `work`.
    With rng None, nothing is damaged."""
    inputs, out = work / "in", work / "out"
    inputs.mkdir(parents=True)
    out.mkdir()
    ckpt, gguf_file, imatrix, damaged = p.ckpt, p.gguf, None, None
    if kind == "safetensors" or kind in JSON_FILES:
        ckpt = inputs / "ckpt"
        ckpt.mkdir()
        name = JSON_FILES.get(kind) or (rng.choice(SHARDS) if rng else SHARDS[0])
        for f in p.ckpt.iterdir():
            if f.name != name:
                (ckpt / f.name).symlink_to(f)
        damaged = ckpt / name
    elif kind == "gguf":
        gguf_file = damaged = inputs / "model.gguf"
    else:
        imatrix = damaged = inputs / ("imatrix.dat" if kind == "imatrix_dat" else "imatrix.gguf")
    source = gguf_file if kind == "gguf" else ckpt
    original = {"gguf": p.gguf, "imatrix_gguf": p.imatrix_gguf, "imatrix_dat": p.imatrix_dat}.get(kind) \
        or p.ckpt / damaged.name
    what = ""
    if rng is None:
        shutil.copyfile(original, damaged)
    else:
        what = _mutate_file(p, kind, rng, original, damaged)
    calib = ("--data", p.text, "--ctx", "8", "--tokens", "16", "--device", "cpu")
    commands = {
        "info": (("info", gguf_file), ()),
        "quantize": (("quantize", source, "-o", out / "q.gguf", "--recipe", "Q8_0"), ("q.gguf",)),
        "quantize_imatrix": (("quantize", source, "-o", out / "q.gguf", "--recipe", "Q4_K_M", "--imatrix", imatrix),
                             ("q.gguf",)),
        "dry_run": (("quantize", ckpt, "--dry-run", "--recipe", "Q4_K_M"), ()),
        "eval": (("eval", gguf_file, "--data", p.text, "--ctx", "8", "--chunks", "1", "--json", out / "eval.json"),
                 ("eval.json",)),
        "convert": (("convert", ckpt, "-o", out / "m.gguf", "--outtype", "f32"), ("m.gguf",)),
        "calibrate": (("calibrate", source, "-o", out / "imatrix.gguf", *calib), ("imatrix.gguf",)),
    }
    args, outputs = commands[command]
    return args, outputs, (damaged, what)


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"still running after {4 * SECONDS_PER_CASE} s")


@pytest.mark.parametrize("kind,command,i", CASES, ids=[f"{k}-{c}-{i}" for k, c, i in CASES])
def test_damaged_input_ends_in_success_or_one_clean_error(pristine, kind, command, i):
    rng = random.Random(f"{SEED}-{kind}-{command}-{i}")
    work = pristine.root / f"{kind}-{command}-{i}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        args, outputs, (damaged, what) = prepare(pristine, kind, command, rng, work)
        previous = signal.signal(signal.SIGALRM, _alarm)   # a hang fails the case instead of the run
        signal.alarm(4 * SECONDS_PER_CASE)
        start = time.perf_counter()
        try:
            result = run_cli(*args)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        seconds = time.perf_counter() - start
        # named by its path, or by its name where the error is about what it says of another file
        # ("... has shape [32, 64], but config.json implies [64, 64]", naming the shard)
        problem = check_clean(result, (str(damaged), damaged.name), work / "out", outputs)
        context = f"{damaged.name} {what}\n$ nemoq {' '.join(map(str, args))}\n{result.output[-2000:]}"
        assert problem is None, f"{problem}\n{context}"
        assert seconds < SECONDS_PER_CASE, f"took {seconds:.1f} s\n{context}"
        grown = max_rss_mb() - pristine.max_rss_mb
        assert grown < MEMORY_GROWTH_MB, f"peak memory grew by {grown:.0f} MB\n{context}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
