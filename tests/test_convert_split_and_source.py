"""Split output, `nemoq info`, and hub repo ids resolved from the local cache."""

from __future__ import annotations

import shutil

import numpy as np

from nemoq.gguf_file import read_gguf
from tests.conftest import convert, run_cli
from tests.oracles import llama_logits


def test_split_output_loads_and_equals_unsplit(random_hub, random_hub_gguf, tmp_path):
    result = run_cli("convert", random_hub, "-o", tmp_path / "split.gguf", "--outtype", "f32",
                     "--split-max-size", "300K")
    assert result.exit_code == 0, result.output
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(parts) >= 3 and not (tmp_path / "split.gguf").exists()
    assert parts[0].name == f"split-00001-of-{len(parts):05d}.gguf"

    whole, split = read_gguf(random_hub_gguf), read_gguf(parts[0])
    assert split.files == parts
    assert split.metadata["split.count"] == len(parts)
    assert [t.name for t in split.tensors] == [t.name for t in whole.tensors]
    for t in whole.tensors:
        np.testing.assert_array_equal(np.asarray(split.tensor_data(t.name).data),
                                      np.asarray(whole.tensor_data(t.name).data))
    ids = list(range(3, 67))
    np.testing.assert_array_equal(llama_logits(parts[0], ids), llama_logits(random_hub_gguf, ids))


def test_info_shows_metadata_and_tensors_of_a_split_set(random_hub, tmp_path):
    convert(random_hub, tmp_path / "s.gguf", "--split-max-size", "300K")
    first = sorted(tmp_path.glob("s-*.gguf"))[0]
    result = run_cli("info", first)
    assert result.exit_code == 0, result.output
    for text in ("nemotron_h_moe.block_count", "blk.0.ssm_in.weight", "token_embd.weight", "bits/weight",
                 "s-00002-of-"):
        assert text in result.output


def test_info_rejects_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    result = run_cli("info", bad)
    assert result.exit_code == 1 and "bad.gguf" in result.output


def test_hub_repo_id_resolves_from_the_offline_cache(random_hub, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-nemotron" / "snapshots" / ("0" * 40)
    shutil.copytree(random_hub, snapshot)
    (cache / "models--acme--tiny-nemotron" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-nemotron" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    out = convert("acme/tiny-nemotron", tmp_path / "hub.gguf")
    assert read_gguf(out).metadata["general.architecture"] == "nemotron_h_moe"

    result = run_cli("convert", "acme/not-cached", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 1 and "could not fetch from the hub" in result.output
    assert not (tmp_path / "x.gguf").exists()
