"""Bad input: one clear line naming the file and the problem, exit code 1, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.conftest import run_cli

INDEX = "model.safetensors.index.json"


def shard_of(ckpt: Path, tensor: str) -> Path:
    return ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][tensor]


def edit_shard(ckpt: Path, tensor: str, edit) -> Path:
    """Rewrite the shard holding `tensor` with edit(dict of arrays), keeping the index right."""
    shard = shard_of(ckpt, tensor)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    (ckpt / INDEX).write_text(json.dumps(index))
    return shard


def edit_config(ckpt: Path, **changes) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))


def assert_fails(ckpt: Path, tmp_path: Path, *fragments: str, extra=()) -> str:
    out = tmp_path / "out.gguf"
    result = run_cli("convert", ckpt, "-o", out, "--outtype", "f16", *extra)
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.gguf")], "temporary files left behind"
    return result.output


def test_convert_rejects_unsupported_architecture(fresh_checkpoint, tmp_path):
    edit_config(fresh_checkpoint, architectures=["LlamaForCausalLM"])
    assert_fails(fresh_checkpoint, tmp_path, "config.json", "unsupported architecture", "NemotronHForCausalLM")


def test_convert_rejects_missing_tensor(fresh_checkpoint, tmp_path):
    name = "backbone.layers.0.mixer.D"
    edit_shard(fresh_checkpoint, name, lambda t: t.pop(name))
    assert_fails(fresh_checkpoint, tmp_path, "missing 1 tensor", name)


def test_convert_rejects_unexpected_tensor(fresh_checkpoint, tmp_path):
    name = "backbone.layers.0.mixer.D"
    edit_shard(fresh_checkpoint, name, lambda t: t.update({"backbone.layers.0.mixer.extra": np.zeros(3, np.float32)}))
    assert_fails(fresh_checkpoint, tmp_path, "does not explain", "backbone.layers.0.mixer.extra")


def test_convert_rejects_shape_that_disagrees_with_config(fresh_checkpoint, tmp_path):
    config = json.loads((fresh_checkpoint / "config.json").read_text())
    edit_config(fresh_checkpoint, moe_intermediate_size=config["moe_intermediate_size"] + 64)
    assert_fails(fresh_checkpoint, tmp_path, "has shape", "expert_ff")


def test_convert_rejects_truncated_shard(fresh_checkpoint, tmp_path):
    shard = shard_of(fresh_checkpoint, "lm_head.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    assert_fails(fresh_checkpoint, tmp_path, shard.name, "truncated")


def test_convert_rejects_corrupt_shard_header(fresh_checkpoint, tmp_path):
    shard = shard_of(fresh_checkpoint, "lm_head.weight")
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32
    shard.write_bytes(bytes(data))
    assert_fails(fresh_checkpoint, tmp_path, shard.name, "corrupt")


def test_convert_rejects_missing_shard(fresh_checkpoint, tmp_path):
    shard = shard_of(fresh_checkpoint, "lm_head.weight")
    shard.unlink()
    assert_fails(fresh_checkpoint, tmp_path, shard.name, "missing")


def test_convert_rejects_missing_tokenizer(fresh_checkpoint, tmp_path):
    (fresh_checkpoint / "tokenizer.json").unlink()
    assert_fails(fresh_checkpoint, tmp_path, "tokenizer.json not found")


def test_convert_rejects_unknown_pre_tokenizer_and_accepts_pre_option(fresh_checkpoint, tmp_path):
    tok_path = fresh_checkpoint / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+|\p{N}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    tok_path.write_text(json.dumps(tok))
    assert_fails(fresh_checkpoint, tmp_path, "unknown pre-tokenizer", r"\\p{L}+|\\p{N}", "--pre")
    result = run_cli("convert", fresh_checkpoint, "-o", tmp_path / "ok.gguf", "--pre", "tekken")
    assert result.exit_code == 0, result.output


def poison(ckpt: Path, name: str, value: float, at=(0, 0)) -> None:
    def edit(t):
        t[name] = t[name].copy()
        t[name][at] = value
    edit_shard(ckpt, name, edit)


def test_convert_warns_on_nan_and_strict_refuses(fresh_checkpoint, tmp_path):
    poison(fresh_checkpoint, "backbone.layers.0.mixer.out_proj.weight", np.nan)
    result = run_cli("convert", fresh_checkpoint, "-o", tmp_path / "warn.gguf")
    assert result.exit_code == 0, result.output
    assert "blk.0.ssm_out.weight" in result.output and "NaN" in result.output
    assert_fails(fresh_checkpoint, tmp_path, "NaN", "blk.0.ssm_out.weight", "--strict", extra=("--strict",))


def test_convert_refuses_to_clobber_without_force(random_hub, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    result = run_cli("convert", random_hub, "-o", out)
    assert result.exit_code == 1 and "--force" in result.output
    assert out.read_bytes() == b"precious"
    assert run_cli("convert", random_hub, "-o", out, "--force").exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_convert_rejects_nonexistent_source(tmp_path):
    result = run_cli("convert", tmp_path / "nowhere", "-o", tmp_path / "out.gguf")
    assert result.exit_code == 1 and "no such folder" in result.output


def test_convert_leaves_nothing_when_interrupted(random_hub, tmp_path, monkeypatch):
    from nemoq.convert import pipeline

    original = pipeline.count_non_finite
    calls = {"n": 0}

    def interrupt_midway(*args):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return original(*args)
    monkeypatch.setattr(pipeline, "count_non_finite", interrupt_midway)
    result = run_cli("convert", random_hub, "-o", tmp_path / "out.gguf")
    assert result.exit_code == 130, result.output
    assert list(tmp_path.iterdir()) == []


def test_convert_checks_free_disk_space(random_hub, tmp_path, monkeypatch):
    from nemoq import files
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    assert_fails(random_hub, tmp_path, "not enough free disk space")


def test_convert_never_modifies_inputs(random_hub, tmp_path):
    before = {p.name: p.read_bytes() for p in random_hub.iterdir()}
    assert run_cli("convert", random_hub, "-o", tmp_path / "out.gguf").exit_code == 0
    assert {p.name: p.read_bytes() for p in random_hub.iterdir()} == before


def test_nan_is_found_on_the_byte_copy_path_too(fresh_checkpoint, tmp_path):
    poison(fresh_checkpoint, "backbone.layers.0.mixer.out_proj.weight", np.inf, at=(3, 1))
    assert_fails(fresh_checkpoint, tmp_path, "NaN/Inf", "blk.0.ssm_out.weight", extra=("--outtype", "f32", "--strict"))


def test_copy_without_copy_file_range_gives_the_same_file(random_hub, random_hub_gguf, tmp_path, monkeypatch):
    from nemoq.convert import output

    def unsupported(*args):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(output.os, "copy_file_range", unsupported, raising=False)
    monkeypatch.setattr(output.copy_range, "unsupported", False, raising=False)
    out = tmp_path / "o.gguf"
    assert run_cli("convert", random_hub, "-o", out, "--outtype", "f32").exit_code == 0
    assert out.read_bytes() == random_hub_gguf.read_bytes()
