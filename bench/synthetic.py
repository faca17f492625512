"""The full-width synthetic Nemotron 3 Nano checkpoint the benchmarks run on.

`ensure_checkpoint(cache_dir, pattern)` builds once, under the cache folder, a hub-layout
checkpoint with the real Nemotron 3 Nano widths (hidden 2688, vocab 131072, 128 experts x 1856,
...) but only the layers of `pattern` (`ME*`: one Mamba, one MoE, one attention layer, ~4.1 GB in
BF16), and reuses it afterwards. Tensors are random but realistic (N(0, 0.02) matrices,
A_log = log(1..H), unit norms), written shard by shard in the safetensors format with one tensor
per expert, plus a small byte-level BPE tokenizer with the tekken pre-tokenizer.

Not part of the test suite. Uses only what the venv already has.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

GENERATOR_VERSION = 2          # bump when the synthetic checkpoint changes: the cache is rebuilt
SHARD_BYTES = 2_000_000_000    # hub checkpoints use ~5 GB shards; ~2 GB keeps several shards here
CHUNK_ELEMS = 8 * 1024 * 1024  # values generated at a time (16 MB of bf16)
MANIFEST = "bench_manifest.json"

# The published config.json of NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 (the copy the tests plan
# against), less its 52-layer pattern, which --pattern replaces.
REAL_CONFIG = {k: v for k, v in json.loads(
    (Path(__file__).resolve().parent.parent / "tests" / "data" / "nemotron-3-nano" / "config.json").read_text()).items()
    if k not in ("hybrid_override_pattern", "num_hidden_layers")}


@dataclass(frozen=True)
class Spec:
    """One source tensor: its hub name, safetensors dtype, shape and how to fill it."""
    name: str
    dtype: str                  # "BF16" or "F32"
    shape: tuple[int, ...]
    fill: str                   # key of FILLS
    scale: float = 0.02

    @property
    def n(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.n * (2 if self.dtype == "BF16" else 4)


def tensor_specs(cfg: dict) -> list[Spec]:
    """The exact tensor list of a hub-layout checkpoint for `cfg` (mapping.py's rows)."""
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    heads, head_dim = cfg["mamba_num_heads"], cfg["mamba_head_dim"]
    d_inner = heads * head_dim
    conv_dim = d_inner + 2 * cfg["n_groups"] * cfg["ssm_state_size"]
    in_proj = d_inner + conv_dim + heads
    q_dim, kv_dim = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    n_exp, exp_ff, sh_ff = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["moe_shared_expert_intermediate_size"]
    expert_io = cfg.get("moe_latent_size") or hidden   # LatentMoE (Super): experts in the latent width

    specs = [Spec("backbone.embeddings.weight", "BF16", (vocab, hidden), "normal")]
    for i, kind in enumerate(cfg["hybrid_override_pattern"]):
        p = f"backbone.layers.{i}."
        specs.append(Spec(p + "norm.weight", "BF16", (hidden,), "ones"))
        m = p + "mixer."
        if kind == "M":
            specs += [
                Spec(m + "in_proj.weight", "BF16", (in_proj, hidden), "normal"),
                Spec(m + "conv1d.weight", "BF16", (conv_dim, 1, cfg["conv_kernel"]), "normal", 0.1),
                Spec(m + "conv1d.bias", "BF16", (conv_dim,), "normal"),
                Spec(m + "A_log", "BF16", (heads,), "a_log"),
                Spec(m + "D", "BF16", (heads,), "ones"),
                Spec(m + "dt_bias", "BF16", (heads,), "dt_bias"),
                Spec(m + "norm.weight", "BF16", (d_inner,), "ones"),
                Spec(m + "out_proj.weight", "BF16", (hidden, d_inner), "normal"),
            ]
        elif kind == "*":
            specs += [
                Spec(m + "q_proj.weight", "BF16", (q_dim, hidden), "normal"),
                Spec(m + "k_proj.weight", "BF16", (kv_dim, hidden), "normal"),
                Spec(m + "v_proj.weight", "BF16", (kv_dim, hidden), "normal"),
                Spec(m + "o_proj.weight", "BF16", (hidden, q_dim), "normal"),
            ]
        elif kind == "E":
            specs += [
                # transformers keeps the router in float32 (_keep_in_fp32_modules_strict), so a
                # checkpoint can hold these two as F32 among BF16 tensors: exercise that path
                Spec(m + "gate.weight", "F32", (n_exp, hidden), "normal"),
                Spec(m + "gate.e_score_correction_bias", "F32", (n_exp,), "normal", 0.01),
            ]
            for x in range(n_exp):
                specs += [
                    Spec(m + f"experts.{x}.up_proj.weight", "BF16", (exp_ff, expert_io), "normal"),
                    Spec(m + f"experts.{x}.down_proj.weight", "BF16", (expert_io, exp_ff), "normal"),
                ]
            if expert_io != hidden:
                specs += [Spec(m + "fc1_latent_proj.weight", "BF16", (expert_io, hidden), "normal"),
                          Spec(m + "fc2_latent_proj.weight", "BF16", (hidden, expert_io), "normal")]
            specs += [
                Spec(m + "shared_experts.up_proj.weight", "BF16", (sh_ff, hidden), "normal"),
                Spec(m + "shared_experts.down_proj.weight", "BF16", (hidden, sh_ff), "normal"),
            ]
        else:
            raise SystemExit(f"--pattern: layer kind {kind!r} is not M, E or *")
    specs += [
        Spec("backbone.norm_f.weight", "BF16", (hidden,), "ones"),
        Spec("lm_head.weight", "BF16", (vocab, hidden), "normal"),
    ]
    return specs


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, round to nearest even (values here are finite)."""
    b = np.asarray(x, np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


class Filler:
    """Random values fast enough for gigabytes: a bf16 normal is a 16-bit uniform looked up in
    a 65536-entry inverse-CDF table (~10x faster than drawing float32 normals)."""

    def __init__(self, seed: int):
        self.rng = np.random.Generator(np.random.Philox(seed))
        quantiles = [NormalDist().inv_cdf((i + 0.5) / 65536) for i in range(65536)]
        self.unit_normal = np.array(quantiles, np.float32)
        self.tables: dict[float, np.ndarray] = {}

    def normal_bf16(self, n: int, scale: float) -> np.ndarray:
        if scale not in self.tables:
            self.tables[scale] = bf16_bits(self.unit_normal * scale)
        return self.tables[scale][self.rng.integers(0, 1 << 16, size=n, dtype=np.uint16)]

    def chunks(self, spec: Spec):
        """The tensor's bytes, in order, a chunk at a time."""
        if spec.fill == "normal" and spec.dtype == "BF16":
            for start in range(0, spec.n, CHUNK_ELEMS):
                yield self.normal_bf16(min(CHUNK_ELEMS, spec.n - start), spec.scale)
            return
        if spec.fill == "normal":
            x = self.rng.standard_normal(spec.n, dtype=np.float32) * spec.scale
        elif spec.fill == "ones":
            x = np.ones(spec.n, np.float32)
        elif spec.fill == "a_log":      # Mamba-2 init: A = -(1..H)
            x = np.log(np.arange(1, spec.n + 1, dtype=np.float32))
        elif spec.fill == "dt_bias":    # softplus^-1 of dt, log-uniform in [time_step_min, max]
            dt = np.exp(self.rng.uniform(math.log(1e-3), math.log(1e-1), spec.n))
            x = (dt + np.log(-np.expm1(-dt))).astype(np.float32)
        else:
            raise ValueError(spec.fill)
        yield bf16_bits(x) if spec.dtype == "BF16" else x.astype("<f4")


def assign_shards(specs: list[Spec]) -> list[list[Spec]]:
    """Consecutive tensors into shards of at most SHARD_BYTES (as save_pretrained does)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_safetensors(path: Path, specs: list[Spec], filler: Filler) -> None:
    """The safetensors format, streamed: u64 header length, JSON header, raw little-endian data.

    Writing it directly keeps memory at one chunk (safetensors' save_file wants every tensor
    of the shard in memory); the result is checked with the safetensors library afterwards.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the library writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for s in specs:
            written = 0
            for chunk in filler.chunks(s):
                f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
                written += chunk.nbytes
            assert written == s.nbytes, s.name


def check_with_safetensors(path: Path, specs: list[Spec]) -> None:
    """Open a written shard with the safetensors library and read a few tensors back as torch."""
    import torch
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert keys == {s.name for s in specs}, f"{path}: tensor list differs"
        for s in specs[:: max(1, len(specs) // 4)]:
            if s.nbytes > 64 * 1024 * 1024:
                continue
            t = f.get_tensor(s.name)
            assert t.dtype == (torch.bfloat16 if s.dtype == "BF16" else torch.float32), s.name
            assert tuple(t.shape) == s.shape and bool(torch.isfinite(t).all()), s.name


TRAINING_TEXT_MODULES = ("json", "os", "pathlib", "collections", "textwrap", "argparse", "statistics",
                         "subprocess", "shutil", "string", "typing", "dataclasses", "csv", "re", "math")


def write_tokenizer(folder: Path) -> int:
    """A small byte-level BPE with Nemotron's (tekken) pre-tokenizer; returns its vocab size."""
    import importlib

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from nemoq.convert.tokenizer import PRE_TOKENIZERS
    tekken = next(regexes for regexes, name in PRE_TOKENIZERS.items() if name == "tekken")[0]

    text = [importlib.import_module(m).__doc__ or "" for m in TRAINING_TEXT_MODULES]
    specials = ["<unk>", "<s>", "</s>", "<SPECIAL_3>", "<SPECIAL_4>"]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tekken), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<SPECIAL_3>{{ m['role'] }}\n{{ m['content'] }}<SPECIAL_4>\n"
                "{% endfor %}{% if add_generation_prompt %}<SPECIAL_3>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 262144, "chat_template": template}, indent=2))
    return tok.get_vocab_size()


def ensure_checkpoint(cache_dir: Path, pattern: str, seed: int = 0, base: dict | None = None,
                      model: str = "nano") -> Path:
    """The synthetic checkpoint for `pattern`, built on first use (atomically) and reused; `base`:
    another model's config.json (`model` names it in the folder name), Nano's by default."""
    name = f"nemotron3-{model}-synth-" + pattern.replace("*", "A") + f"-v{GENERATOR_VERSION}"
    folder = cache_dir / name
    if (folder / MANIFEST).is_file():
        return folder
    cfg = dict(base or REAL_CONFIG, hybrid_override_pattern=pattern, num_hidden_layers=len(pattern))
    specs = tensor_specs(cfg)
    total = sum(s.nbytes for s in specs)
    need = total + 256 * 1024 * 1024
    cache_dir.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(cache_dir).free < need:
        raise SystemExit(f"not enough disk under {cache_dir} for the {total / 1e9:.1f} GB checkpoint")
    tmp = cache_dir / (name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    print(f"building {folder} ({len(specs)} tensors, {total / 1e9:.2f} GB BF16, pattern {pattern}) ...",
          flush=True)
    start = time.perf_counter()
    filler = Filler(seed)
    shards = assign_shards(specs)
    weight_map = {}
    for i, shard in enumerate(shards):
        shard_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / shard_name, shard, filler)
        check_with_safetensors(tmp / shard_name, shard)
        weight_map.update({s.name: shard_name for s in shard})
        print(f"  {shard_name}: {len(shard)} tensors, {sum(s.nbytes for s in shard) / 1e9:.2f} GB, "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    n_tokens = write_tokenizer(tmp)
    (tmp / MANIFEST).write_text(json.dumps({
        "generator_version": GENERATOR_VERSION, "pattern": pattern, "seed": seed, "tensors": len(specs),
        "bytes": total, "shards": len(shards), "tokenizer_tokens": n_tokens,
        "build_seconds": round(time.perf_counter() - start, 1)}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    print(f"built in {time.perf_counter() - start:.1f} s", flush=True)
    return folder


def shards_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))
