"""What llama.cpp's converter writes for the family fixtures (tests/fixtures/family.py), and the
comparison of a nemoq file against it.

tests/data/family_reference.json holds, per fixture, llama.cpp's model keys and every tensor's
shape, type and SHA-256 of its F32 data, taken from running llama.cpp's converter once
(`python -m tests.family_reference` writes it again; tests/llama_converter.py says where the
converter comes from). Two differences are by design and undone before comparing:
* llama.cpp permutes the rows of attn_q / attn_k as for Llama's RoPE; this model applies no RoPE,
  so Q and K get the same permutation and the outputs do not change. nemoq writes them unpermuted.
* ssm_a = -exp(A_log): llama.cpp's torch.exp may be 1 ulp off the correctly rounded value nemoq
  writes (computed in Python's decimal so that it is the same on every CPU): compared to 1 ulp.
nemoq also leaves out rope.freq_base (no RoPE is applied; see docs/convert.md).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import gguf
import numpy as np

from tests.fixtures.family import write_lightning, write_puzzle, write_super

REFERENCE = Path(__file__).parent / "data" / "family_reference.json"
WRITERS = {"super": write_super, "lightning": write_lightning, "puzzle": write_puzzle}
NOT_WRITTEN_BY_NEMOQ = {"nemotron_h_moe.rope.freq_base"}
ULP_COMPARED = ("ssm_a",)


def read_file(path: Path) -> dict:
    """{"keys": model keys (not general.*, tokenizer.*), "tensors": {name: (shape, type, data)}}."""
    reader = gguf.GGUFReader(path)
    keys = {f.name: f.contents() for f in reader.fields.values()
            if not f.name.startswith(("GGUF.", "general.", "tokenizer."))}
    tensors = {t.name: ([int(n) for n in t.shape], t.tensor_type.name, np.array(t.data)) for t in reader.tensors}
    return {"keys": keys, "tensors": tensors}


def _digest(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data, dtype="<f4").tobytes()).hexdigest()


def summary(path: Path) -> dict:
    """A file as the reference JSON records it."""
    contents = read_file(path)
    tensors = {}
    for name, (shape, ggml_type, data) in sorted(contents["tensors"].items()):
        entry = {"shape": shape, "type": ggml_type, "sha256": _digest(data)}
        if name.endswith(ULP_COMPARED):
            entry["values"] = [float(v) for v in data.ravel()]
        tensors[name] = entry
    return {"keys": dict(sorted(contents["keys"].items())), "tensors": tensors}


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (LlamaModel.permute) on an (out, in) matrix."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def differences(ours: Path, reference: dict, config: dict) -> list[str]:
    """Everything in which nemoq's file differs from llama.cpp's (beyond the documented choices)."""
    contents = read_file(ours)
    problems = []
    want_keys = {k: v for k, v in reference["keys"].items() if k not in NOT_WRITTEN_BY_NEMOQ}
    if contents["keys"] != want_keys:
        diff = {k: (want_keys.get(k), contents["keys"].get(k)) for k in set(want_keys) | set(contents["keys"])
                if want_keys.get(k) != contents["keys"].get(k)}
        problems.append(f"keys (llama.cpp, nemoq): {diff}")
    want, have = reference["tensors"], contents["tensors"]
    if set(want) != set(have):
        problems.append(f"tensors only in llama.cpp's: {sorted(set(want) - set(have))}, "
                        f"only in nemoq's: {sorted(set(have) - set(want))}")
    heads = {"attn_q.weight": config["num_attention_heads"], "attn_k.weight": config["num_key_value_heads"]}
    for name in sorted(set(want) & set(have)):
        shape, ggml_type, data = have[name]
        if [shape, ggml_type] != [want[name]["shape"], want[name]["type"]]:
            problems.append(f"{name}: {shape} {ggml_type}, llama.cpp {want[name]['shape']} {want[name]['type']}")
            continue
        n_head = next((n for suffix, n in heads.items() if name.endswith(suffix)), None)
        if n_head is not None:
            data = llama_permute(data, n_head)
        if "values" in want[name]:
            try:
                np.testing.assert_array_max_ulp(data.ravel(), np.array(want[name]["values"], np.float32), maxulp=1)
            except AssertionError:
                problems.append(f"{name}: values more than 1 ulp from llama.cpp's")
        elif _digest(data) != want[name]["sha256"]:
            problems.append(f"{name}: values differ from llama.cpp's")
    return problems


def regenerate(work: Path) -> dict:
    from tests.llama_converter import run_llama_converter
    out = {}
    for name, write in WRITERS.items():
        checkpoint = write(work / name)
        out[name] = summary(run_llama_converter(checkpoint, work / f"{name}-llama.gguf"))
    return out


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        data = regenerate(Path(tmp))
    REFERENCE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {REFERENCE}", file=sys.stderr)
