"""Specific malformed inputs, each met with one error line naming the file, exit code 1 and an
empty output folder (the seeded fuzzing in test_fuzz_inputs.py covers the rest)."""

from __future__ import annotations

import json
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from nemoq.calib.imatrix_file import ImportanceMatrix, write_imatrix
from nemoq.convert.config import load_config
from nemoq.convert.plan import tensor_specs
from tests.conftest import run_cli
from tests.malformed import check_clean, error_lines, gguf_layout


def assert_fails(result, path: Path, out_dir: Path | None, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    problem = check_clean(result, (str(path),), out_dir)
    assert problem is None, f"{problem}\n{result.output}"
    line = error_lines(result.output)[0]
    for fragment in fragments:
        assert fragment in line, line
    return line


def patched(src: Path, dst: Path, code: str, position: int, value) -> Path:
    data = bytearray(src.read_bytes())
    struct.pack_into(code, data, position, value)
    dst.write_bytes(bytes(data))
    return dst


def with_metadata_u32(src: Path, dst: Path, key: str, value: int) -> Path:
    """A copy of src whose uint32 metadata value `key` is `value` (in place: same layout)."""
    import gguf
    field = gguf.GGUFReader(src).fields[key]
    return patched(src, dst, "<I", field.offset + sum(p.nbytes for p in field.parts[:3]), value)


@pytest.fixture
def out_dir(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_gguf_claiming_2_60_tensors_fails_at_once_without_allocating(random_hub_gguf, tmp_path, out_dir):
    bad = patched(random_hub_gguf, tmp_path / "bad.gguf", "<Q", 8, 2**60)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = run_cli("info", bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB"
    assert_fails(result, bad, None, "tensor count is 1152921504606846976")
    assert_fails(run_cli("quantize", bad, "-o", out_dir / "q.gguf", "--recipe", "Q8_0"), bad, out_dir, "tensor count")


@pytest.mark.parametrize("field", ["key_length", "string_length", "array_length"])
def test_gguf_claiming_2_63_bytes_of_string_or_array_fails(random_hub_gguf, tmp_path, field):
    position = gguf_layout(random_hub_gguf).positions[field][0]
    bad = patched(random_hub_gguf, tmp_path / "bad.gguf", "<Q", position, 2**63)
    assert_fails(run_cli("info", bad), bad, None, "corrupt GGUF header", str(2**63))


def test_gguf_truncated_in_its_data_section(random_hub_gguf, tmp_path, out_dir):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(random_hub_gguf.read_bytes()[: gguf_layout(random_hub_gguf).data_start + 1000])
    assert_fails(run_cli("info", bad), bad, None, "truncated: tensor", "incomplete download")
    result = run_cli("quantize", bad, "-o", out_dir / "q.gguf", "--recipe", "Q8_0")
    assert_fails(result, bad, out_dir, "truncated")


def test_gguf_with_misaligned_tensor_offset(random_hub_gguf, tmp_path, out_dir):
    position = gguf_layout(random_hub_gguf).positions["tensor_offset"][0]
    bad = patched(random_hub_gguf, tmp_path / "bad.gguf", "<Q", position, 1)
    assert_fails(run_cli("info", bad), bad, None, "offset 1 is not a multiple of the alignment 32")
    text = tmp_path / "text.txt"
    text.write_text("words " * 200)
    result = run_cli("eval", bad, "--data", text, "--ctx", "8", "--json", out_dir / "eval.json")
    assert_fails(result, bad, out_dir, "alignment")


@pytest.mark.parametrize("code", [4, 31, 1000, 2**32 - 1])   # 4 and 31: types ggml removed
def test_gguf_with_unknown_tensor_type(random_hub_gguf, tmp_path, code):
    position = gguf_layout(random_hub_gguf).positions["tensor_type"][0]
    bad = patched(random_hub_gguf, tmp_path / "bad.gguf", "<I", position, code)
    assert_fails(run_cli("info", bad), bad, None, f"unknown type {code}")


def test_gguf_whose_expert_count_would_abort_llama_cpp(random_hub_gguf, tmp_path, out_dir):
    bad = with_metadata_u32(random_hub_gguf, tmp_path / "bad.gguf", "nemotron_h_moe.expert_used_count", 9)
    text = tmp_path / "text.txt"
    text.write_text("words " * 200)
    result = run_cli("eval", bad, "--data", text, "--ctx", "8", "--json", out_dir / "eval.json")
    assert_fails(result, bad, out_dir, "expert_used_count is 9")
    result = run_cli("calibrate", bad, "-o", out_dir / "im.gguf", "--data", text, "--ctx", "8", "--tokens", "16",
                     "--device", "cpu")
    assert_fails(result, bad, out_dir, "expert_used_count is 9")


def test_calibrate_refuses_gguf_whose_metadata_contradicts_its_tensors(random_hub_gguf, tmp_path, out_dir):
    bad = with_metadata_u32(random_hub_gguf, tmp_path / "bad.gguf", "nemotron_h_moe.embedding_length", 48)
    text = tmp_path / "text.txt"
    text.write_text("words " * 200)
    result = run_cli("calibrate", bad, "-o", out_dir / "im.gguf", "--data", text, "--ctx", "8", "--tokens", "16",
                     "--device", "cpu")
    assert_fails(result, bad, out_dir, "tensor token_embd.weight has shape", "metadata implies")


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("key,value,fragment", [
    ("max_position_embeddings", 2**32, "max_position_embeddings is 4294967296"),   # struct.error in a uint32
    ("num_attention_heads", 0, "num_attention_heads is 0"),                          # a division by zero
    ("hidden_size", "64", 'hidden_size must be an integer, not "64"'),
    ("layer_norm_epsilon", float("nan"), "layer_norm_epsilon must be a number"),
    ("n_routed_experts", 4096, "n_routed_experts is 4096"),
    ("num_experts_per_tok", 9, "num_experts_per_tok is 9"),
    ("hybrid_override_pattern", ["M", "E"], "hybrid_override_pattern must be a string"),
])
def test_convert_rejects_out_of_range_config_value(random_hub, tmp_path, out_dir, key, value, fragment):
    ckpt = copy_checkpoint(random_hub, tmp_path / "ckpt")
    edit_json(ckpt / "config.json", lambda c: c.update({key: value}))
    result = run_cli("convert", ckpt, "-o", out_dir / "m.gguf", "--outtype", "f16")
    assert_fails(result, ckpt / "config.json", out_dir, fragment)


@pytest.mark.parametrize("damage,fragment", [
    (lambda p: p.write_text(p.read_text()[:100]), "not valid JSON"),
    (lambda p: p.write_text("[]"), "expected a JSON object"),
    (lambda p: edit_json(p, lambda t: t["model"]["vocab"].update({"x": "7"})), "model.vocab must map tokens to ids"),
    (lambda p: edit_json(p, lambda t: t["model"].update({"merges": [1, 2]})), "model.merges"),
    (lambda p: edit_json(p, lambda t: t["added_tokens"][0].pop("id")), "added_tokens"),
    (lambda p: edit_json(p, lambda t: t.update({"pre_tokenizer": [1]})), "pre_tokenizer"),
])
def test_convert_and_calibrate_reject_invalid_tokenizer_json(random_hub, tmp_path, out_dir, damage, fragment):
    ckpt = copy_checkpoint(random_hub, tmp_path / "ckpt")
    damage(ckpt / "tokenizer.json")
    result = run_cli("convert", ckpt, "-o", out_dir / "m.gguf", "--outtype", "f16")
    assert_fails(result, ckpt / "tokenizer.json", out_dir, fragment)
    text = tmp_path / "text.txt"
    text.write_text("words " * 200)
    result = run_cli("calibrate", ckpt, "-o", out_dir / "im.gguf", "--data", text, "--ctx", "8", "--tokens", "16",
                     "--device", "cpu")
    assert_fails(result, ckpt / "tokenizer.json", out_dir, fragment)


@pytest.mark.parametrize("entry,fragment", [
    ({"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}, "unsupported dtype F4"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "has shape [-2]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "data_offsets [8, 0]"),
    ({"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}, "ends at byte"),
    ("F32", "is not an object"),
])
def test_convert_rejects_malformed_safetensors_header(random_hub, tmp_path, out_dir, entry, fragment):
    ckpt = copy_checkpoint(random_hub, tmp_path / "ckpt")
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + n])
    header[next(k for k in header if k != "__metadata__")] = entry
    new = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])
    result = run_cli("convert", ckpt, "-o", out_dir / "m.gguf", "--outtype", "f16")
    assert_fails(result, shard, out_dir, fragment)


def test_safetensors_index_with_a_path_for_a_shard(random_hub, tmp_path, out_dir):
    ckpt = copy_checkpoint(random_hub, tmp_path / "ckpt")
    index = ckpt / "model.safetensors.index.json"
    edit_json(index, lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "../elsewhere.safetensors"}))
    result = run_cli("convert", ckpt, "-o", out_dir / "m.gguf", "--outtype", "f16")
    assert_fails(result, index, out_dir, "not a shard file name")


@pytest.fixture(scope="module")
def good_imatrix(tmp_path_factory, random_hub) -> ImportanceMatrix:
    rng = np.random.default_rng(0)
    specs = [s for s in tensor_specs(load_config(random_hub)) if not s.keep_f32 and len(s.shape) >= 2]
    counts = {s.name: rng.integers(1, 50, s.n_matrices).astype(np.float32) for s in specs}
    sums = {s.name: rng.random((s.n_matrices, s.row_width), dtype=np.float32) for s in specs}
    return ImportanceMatrix(sums, counts, ["test"], 1, 8)


@pytest.mark.parametrize("value,fragment", [(np.nan, "non-finite sums of squares"),
                                            (-1.0, "negative sums of squares")])
def test_quantize_rejects_imatrix_with_bad_values(random_hub, good_imatrix, tmp_path, out_dir, value, fragment):
    name = next(iter(good_imatrix.sums))
    good_imatrix.sums[name] = good_imatrix.sums[name].copy()
    good_imatrix.sums[name][0, 3] = value
    path = tmp_path / "im.gguf"
    write_imatrix(path, good_imatrix)
    result = run_cli("quantize", random_hub, "-o", out_dir / "q.gguf", "--recipe", "Q4_K_M", "--imatrix", path)
    assert_fails(result, path, out_dir, name, fragment)


def test_quantize_rejects_imatrix_whose_counts_do_not_match_its_sums(random_hub, good_imatrix, tmp_path, out_dir):
    name = next(n for n, s in good_imatrix.sums.items() if s.shape[0] > 1)
    good_imatrix.counts[name] = good_imatrix.counts[name][:-1]
    path = tmp_path / "im.gguf"
    write_imatrix(path, good_imatrix)
    result = run_cli("quantize", random_hub, "-o", out_dir / "q.gguf", "--recipe", "Q4_K_M", "--imatrix", path)
    assert_fails(result, path, out_dir, name, "counts")


@pytest.mark.parametrize("n_values,fragment", [(2**31 - 1, "value count 2147483647"), (-1, "value count -1")])
def test_quantize_rejects_legacy_imatrix_with_impossible_length(random_hub, tmp_path, out_dir, n_values, fragment):
    name = b"blk.0.ssm_in.weight"
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 10, n_values)
    path = tmp_path / "im.dat"
    path.write_bytes(blob + b"\0" * 64)
    result = run_cli("quantize", random_hub, "-o", out_dir / "q.gguf", "--recipe", "Q4_K_M", "--imatrix", path)
    assert_fails(result, path, out_dir, fragment)


@pytest.mark.parametrize("file,damage,fragment", [
    ("tokenizer_config.json", lambda p: edit_json(p, lambda c: c.update({"chat_template": [1, 2]})),
     "chat_template must be a string or a list"),
    ("chat_template.jinja", lambda p: p.write_bytes(b"\xff{{ messages }}"), "not UTF-8"),
])
def test_convert_and_calibrate_reject_a_malformed_chat_template(random_hub, tmp_path, out_dir, file, damage, fragment):
    ckpt = copy_checkpoint(random_hub, tmp_path / "ckpt")
    damage(ckpt / file)
    result = run_cli("convert", ckpt, "-o", out_dir / "m.gguf", "--outtype", "f16")   # a TypeError when writing
    assert_fails(result, ckpt / file, out_dir, fragment)
    text = tmp_path / "text.txt"
    text.write_text("words " * 200)
    result = run_cli("calibrate", ckpt, "-o", out_dir / "im.gguf", "--data", text, "--ctx", "8", "--tokens", "16",
                     "--device", "cpu")
    assert_fails(result, ckpt / file, out_dir, fragment)
