"""`quantize --fit MEM --fit-ctx N`: the byte budget for the weights is the device's memory minus
what llama.cpp allocates beside them to run the model at that context.

llama.cpp (as llama-cpp-python 0.3.36 calls it: n_ubatch 512, one sequence, f16 K/V, flash
attention off) allocates for a nemotron_h_moe model, besides the weights:

  KV cache      n_ctx' x attention layers x (n_kv_heads x head_dim x (bytes(K) + bytes(V)))
                only the attention layers (llama-memory-hybrid filters the rest out); n_ctx' is
                n_ctx rounded up to a multiple of 256 (llama-context.cpp pads it so).
  Mamba state   sequences x Mamba layers x 4 x ((d_conv - 1) x conv_dim + d_state x d_inner)
                (llama-memory-recurrent: the conv window and the SSM state, f32, one cell per
                sequence; conv_dim = d_inner + 2 x groups x d_state), whatever the context.
  compute       4 x n_ubatch x (scores + n_vocab + 2 x in_proj + hidden)   (an estimate)
                the graph's worst-case activations for one ubatch: without flash attention the
                attention scores (f32, n_ctx' x n_heads) and the mask (f32, n_ctx') per token
                dominate at long contexts; with it (which a quantized V cache needs) only the
                mask remains (f16). The other terms bound the logits and the widest Mamba
                activations. Above every compute buffer llama.cpp reported for the bundled model
                (contexts 256-16384, n_ubatch 128-2048, with and without flash attention), by
                3-24% from 4096 tokens on.
  output        sequences x n_vocab x 4 (the last token's logits)
  margin        512 MiB + 2% of the memory: the CUDA/Metal context, cuBLAS workspaces and
                the backend's own scratch pools, which llama.cpp's log does not count.

The weights' budget counts the whole file (llama.cpp keeps the token embeddings on the CPU and
the file's header is not loaded, so a GPU has a little more room than this says).
"""

from __future__ import annotations

from dataclasses import dataclass

from nemoq.errors import NemoqError

CTX_PAD = 256                     # llama-context.cpp: n_ctx = GGML_PAD(n_ctx, 256)
UBATCH = 512                      # llama-cpp-python's n_ubatch (and n_batch) default
F32 = 4
MARGIN_FIXED = 512 * 2**20
MARGIN_SHARE = 0.02

# --kv-type: bytes per element of K and V (ggml's block sizes), and whether llama.cpp then runs
# flash attention (a quantized V cache needs it; llama-cpp-python leaves it off otherwise)
KV_TYPES = {
    "f16": (2.0, False),
    "q8_0": (34 / 32, True),
}
# per token and cached position, the f32 values the attention's compute holds: scores per head
# and the mask without flash attention, the f16 mask (half a value) with it
SCORES = {
    False: lambda config: config.n_heads + 1,
    True: lambda config: 0.5,
}


@dataclass(frozen=True)
class Fit:
    """What the user has and how llama.cpp will run the file."""
    memory: int                    # bytes of device memory
    ctx: int                       # tokens of context
    kv_type: str = "f16"
    ubatch: int = UBATCH
    sequences: int = 1

    @property
    def n_ctx(self) -> int:
        return -(-self.ctx // CTX_PAD) * CTX_PAD

    @property
    def kv_bytes(self) -> float:
        return KV_TYPES[self.kv_type][0]

    @property
    def flash_attn(self) -> bool:
        return KV_TYPES[self.kv_type][1]


def kv_cache(config, fit: Fit) -> int:
    per_layer = 2 * config.n_kv_heads * config.head_dim * fit.kv_bytes
    return int(fit.n_ctx * len(config.layers_of("attention")) * per_layer)


def mamba_state(config, fit: Fit) -> int:
    conv = (config.conv_kernel - 1) * config.conv_dim
    ssm = config.ssm_state * config.d_inner
    return fit.sequences * len(config.layers_of("mamba")) * F32 * (conv + ssm)


def compute_buffer(config, fit: Fit) -> int:
    scores = fit.n_ctx * SCORES[fit.flash_attn](config)
    return int(F32 * fit.ubatch * (scores + config.vocab + 2 * config.in_proj_dim + config.hidden))


def output_buffer(config, fit: Fit) -> int:
    return fit.sequences * config.vocab * F32


def margin(config, fit: Fit) -> int:
    return MARGIN_FIXED + int(MARGIN_SHARE * fit.memory)


# what llama.cpp needs beside the weights, in the order the plan prints it
TERMS = (
    ("KV cache", kv_cache),
    ("Mamba state", mamba_state),
    ("compute buffer (estimate)", compute_buffer),
    ("logits", output_buffer),
    ("margin", margin),
)


@dataclass(frozen=True)
class FitBudget:
    fit: Fit
    needs: tuple[tuple[str, int], ...]   # (term, bytes) as TERMS

    @property
    def runtime(self) -> int:
        return sum(n for _, n in self.needs)

    @property
    def weights(self) -> int:
        """Bytes left for the GGUF file."""
        return self.fit.memory - self.runtime


def fit_budget(config, fit: Fit) -> FitBudget:
    """The breakdown for `config` (a convert.config.ModelConfig); refuses memory that llama.cpp's
    own needs already fill."""
    if fit.kv_type not in KV_TYPES:
        raise NemoqError(f"unknown --kv-type {fit.kv_type!r}; known: {', '.join(KV_TYPES)}")
    budget = FitBudget(fit, tuple((name, term(config, fit)) for name, term in TERMS))
    if budget.weights <= 0:
        parts = ", ".join(f"{name} {n / 2**30:.2f} GiB" for name, n in budget.needs)
        raise NemoqError(f"--fit {fit.memory:,} bytes is less than llama.cpp needs beside the weights at a context "
                         f"of {fit.ctx:,} tokens: {budget.runtime:,} bytes ({parts})")
    return budget
