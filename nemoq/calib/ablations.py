"""What a file that rounds some tensors costs in KLD, measured as streams of the layer-streamed forward.

A mix (tensor -> type, every other tensor at the source's full precision) is one more stream of
hidden states beside the full-precision one: it starts as a copy of the full-precision stream
at the first step that holds one of its tensors (the embeddings, a layer, the output head), runs
every later layer with its tensors replaced by their plainly rounded values (type_errors.
plain_values, per expert where a format takes a per-matrix scale, as the file holds them), and
at the head its log-probs are compared with the full-precision model's, token by token. So a
profile of the real model needs no F32 file per ablation (126 GB each at Nano's size), only
one layer's weights and a hidden state per stream (1,024 tokens x 2,688 x 4 bytes = 11 MB).

Routing is the stream's own: a rounding upstream of a router sends tokens to other experts,
which is most of the KLD there (docs/benchmarks.md "Routing flips"). The MTP block is not run:
llama.cpp's forward skips it, so its tensors cost the main logits nothing.

A rounded matrix also rounds its inputs as llama.cpp's CPU backend does before the product
(ACTIVATIONS: q8_0 blocks of 32 for the 32-blocks formats, q8_K blocks of 256 for the
k-quants, float16 for F16). Without it a Q8_0 tensor's KLD came out at 0.03-0.6x llama.cpp's on
the bundled model (the activations' rounding is as large as the weights'); 4-bit ones agreed
within a few percent either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from nemoq.calib import blocks
from nemoq.calib.forward import HiddenStates, batches
from nemoq.calib.hparams import config_of
from nemoq.calib.sensitivity import chunks
from nemoq.calib.weights import LayerLoader, Weights
from nemoq.convert.pipeline import Source
from nemoq.quant.tensor_scale import takes_scale
from nemoq.quant.type_errors import plain_rounding, plain_values, stored_values

EMBEDDINGS, HEAD, NORM = "token_embd.weight", "output.weight", "output_norm.weight"
HEAD_TOKENS = 256   # positions per head product: their float64 log-probs over a 131k vocabulary are 268 MB
# The streams' hidden states of one pass (492 ablations of a Nano profile on 1,024 tokens: 5.4 GB);
# more streams go in further passes over the weights, each with its own full-precision stream
STREAM_BYTES = 2 << 30


def plain_sequences(source: Source, text: str, ctx: int, tokens: int) -> np.ndarray:
    """sensitivity.text_sequences with the source's own tokenizer (the same ids: tested)."""
    from nemoq.calib.sequences import model_text
    model = model_text(source)
    bos = model.bos[1] if model.add_bos else None
    return chunks(np.asarray(model.encode(text), dtype=np.int32), ctx, tokens, bos)


@dataclass
class Stream:
    types: dict[str, str]            # the mix's tensors that reach the main logits
    start: int                       # first step it differs at: -1 embeddings, a layer, n_layers the head
    states: HiddenStates | None = None
    kld: float = 0.0                 # summed over scored positions


def step_of(name: str, n_layers: int) -> int | None:
    """The step whose output a tensor changes: -1 the embeddings, a layer, n_layers the head;
    None for what the main logits never see (the MTP block, GGUF layers >= n_layers)."""
    if name == EMBEDDINGS:
        return -1
    if name == HEAD:
        return n_layers
    if name.startswith("blk."):
        layer = int(name.split(".")[1])
        return layer if layer < n_layers else None
    raise ValueError(f"{name}: not a tensor a mix can round")


# --- llama.cpp's rounding of a quantized matmul's inputs (ggml-cpu's vec_dot_type) ----------


def q8_0_activations(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_0 and back: per 32 values d = amax / 127 (stored as float16), codes
    round(x / d) half away from zero."""
    b = x.reshape(*x.shape[:-1], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    v = b * inverse
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return (q * d.half().float()).reshape(x.shape)


def q8_k_activations(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_K and back: per 256 values, the signed largest magnitude m, codes
    min(127, round(-127 x / m)) (to even), values codes / (-127 / m) in float32."""
    b = x.reshape(*x.shape[:-1], -1, 256)
    m = b.gather(-1, b.abs().argmax(-1, keepdim=True))
    iscale = torch.where(m != 0, -127 / m, torch.zeros_like(m))
    q = torch.round(iscale * b).clamp(max=127)
    return torch.where(m != 0, q * (1 / iscale), torch.zeros_like(b)).reshape(x.shape)


def f16_activations(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


ACTIVATIONS = {
    "f16": f16_activations,
    **dict.fromkeys(("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "mxfp4", "nvfp4"), q8_0_activations),
    **dict.fromkeys(("q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "iq4_xs"), q8_k_activations),
}


@dataclass
class FileWeight:
    """A weight as a file of `type_name` holds it, multiplied as llama.cpp multiplies it: its
    inputs rounded first (ACTIVATIONS)."""
    values: torch.Tensor
    type_name: str

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.type_name](x) @ self.values.T


@dataclass
class FileStack:
    """An expert stack as a file holds it: each expert's stored bytes and scale, its values made
    when the expert is indexed (a Nano stack's float32 values would be 2.5 GB; its 4-bit bytes
    are 0.7 GB)."""
    experts: list[tuple[np.ndarray, np.float32]]
    shape: tuple[int, int]
    type_name: str
    device: torch.device

    def __getitem__(self, e: int) -> FileWeight:
        values = stored_values(self.type_name, *self.experts[e], self.shape)
        return FileWeight(torch.from_numpy(values).to(self.device), self.type_name)


def rounded(spec, type_name: str, w: torch.Tensor) -> FileWeight | FileStack:
    """The tensor as a file of `type_name` holds it (plain rounding, no importance; an expert
    stack with one scale per expert)."""
    scaled = takes_scale(spec, type_name)
    if w.ndim == 3:   # an expert at a time: no float32 copy of the stack
        return FileStack([plain_rounding(type_name, m.float().cpu().numpy(), scaled) for m in w],
                         tuple(w.shape[1:]), type_name, w.device)
    return FileWeight(torch.from_numpy(plain_values(type_name, w.float().cpu().numpy(), scaled)).to(w.device),
                      type_name)


class StreamedKLD:
    """Mean KLD per mix against the full-precision model on `sequences` (positions from `first`
    to the last but one, as nemoq.eval scores a chunk), one layer's weights at a time."""

    def __init__(self, source: Source, mixes: list[dict[str, str]], sequences: np.ndarray, *,
                 device: torch.device, first: int = 0):
        self.cfg = config_of(source)
        self.specs = {t.spec.name: t.spec for t in source.plan.tensors}
        for mix in mixes:
            for name, type_name in mix.items():
                if name not in self.specs:
                    raise ValueError(f"{name}: not a tensor of {source.path}")
        n_layers = self.cfg.n_layers
        self.streams = []
        for mix in mixes:
            types = {n: t for n, t in mix.items() if step_of(n, n_layers) is not None}
            start = min((step_of(n, n_layers) for n in types), default=None)
            self.streams.append(Stream(types, start if start is not None else n_layers + 1))
        self.sequences, self.device, self.first = sequences, device, first
        self.loader = LayerLoader(source.plan, device)
        self.parts = batches(*sequences.shape)

    @property
    def scored(self) -> int:
        n, ctx = self.sequences.shape
        return n * max(0, ctx - 1 - self.first)

    def run(self, on_progress: Callable[[int, int], None] | None = None) -> list[float]:
        steps = self.cfg.n_layers + 1
        with torch.no_grad():
            base = self._embed()
            for index, kind in enumerate(self.cfg.layer_kinds):
                self._layer(index, kind, base)
                if on_progress is not None:
                    on_progress(index + 1, steps)
            self._head(base)
            if on_progress is not None:
                on_progress(steps, steps)
        base.close()
        scored = max(self.scored, 1)
        return [s.kld / scored for s in self.streams]

    def _embed(self) -> HiddenStates:
        ids, where = np.unique(self.sequences, return_inverse=True)
        where = where.reshape(self.sequences.shape)
        table = self.loader.globals(EMBEDDINGS)[EMBEDDINGS]
        rows = table[torch.from_numpy(ids.astype(np.int64)).to(table.device)]
        del table
        base = self._states(rows.float().cpu().numpy(), where)
        cache: dict[str, np.ndarray] = {}
        for s in self.streams:
            if s.start == -1:
                t = s.types[EMBEDDINGS]   # rows round on their own: the used rows are the table's
                if t not in cache:
                    cache[t] = rounded(self.specs[EMBEDDINGS], t, rows).values.cpu().numpy()
                s.states = self._states(cache[t], where)
        return base

    def _states(self, rows: np.ndarray, where: np.ndarray) -> HiddenStates:
        states = HiddenStates((*self.sequences.shape, self.cfg.hidden))
        for part in self.parts:
            states.data[part] = rows[where[part]]
        return states

    def _layer(self, index: int, kind: str, base: HiddenStates) -> None:
        weights = self.loader.layer(index)
        for s in self.streams:   # streams that start here begin as the full-precision input
            if s.start == index:
                s.states = HiddenStates(base.data.shape)
                s.states.data[:] = base.data
        live = sorted(((self._overrides(s, weights), i) for i, s in enumerate(self.streams) if s.states is not None))
        signature, layer_weights = None, weights
        for mine, i in live:
            s = self.streams[i]
            if mine != signature:   # streams with the same rounding of this layer share its values
                layer_weights = Weights(weights.prefix, dict(weights))
                for name, type_name in mine:
                    short = name[len(weights.prefix):]
                    layer_weights[short] = rounded(self.specs[name], type_name, weights[short])
                signature = mine
            self._through(s.states, kind, layer_weights)
        del layer_weights
        self._through(base, kind, weights)

    @staticmethod
    def _overrides(s: Stream, weights: Weights) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((n, t) for n, t in s.types.items() if n.startswith(weights.prefix)))

    def _through(self, states: HiddenStates, kind: str, weights: Weights) -> None:
        for part in self.parts:
            x = torch.from_numpy(np.asarray(states.data[part])).to(self.device)
            states.data[part] = blocks.layer(x, kind, weights, self.cfg, _ignore).cpu().numpy()

    def _head(self, base: HiddenStates) -> None:
        """Each stream's KLD, the streams grouped by how they round the head: one rounded head
        (131072 x 2688 float32: 1.4 GB at Nano's size) alive at a time, the full-precision
        log-probs made again for each group."""
        g = self.loader.globals(NORM, HEAD)
        norm, head = g[NORM], g[HEAD].float()   # widened once, not at every product
        del g
        groups: dict[str | None, list[Stream]] = {}
        for s in self.streams:
            if s.start <= self.cfg.n_layers:
                groups.setdefault(s.types.get(HEAD), []).append(s)
        for type_name, streams in groups.items():
            weight = head if type_name is None else rounded(self.specs[HEAD], type_name, head)
            self._score(base, norm, head, weight, streams)
            del weight
        for s in self.streams:
            if s.states is not None:
                s.states.close()
                s.states = None

    def _score(self, base: HiddenStates, norm: torch.Tensor, head: torch.Tensor, weight, streams: list[Stream]) -> None:
        """Adds to each of `streams` its summed KLD through the head `weight` against the
        full-precision model (through `head`)."""
        n, ctx = self.sequences.shape
        positions = slice(self.first, ctx - 1)
        for i in range(n):
            normed = blocks.rms_norm(self._row(base, i), norm, self.cfg.norm_eps)
            for p0 in range(positions.start, positions.stop, HEAD_TOKENS):
                p = slice(p0, min(p0 + HEAD_TOKENS, positions.stop))
                reference = log_probs(normed[p], head)
                probs = reference.exp()   # once for the group's streams
                for s in streams:
                    x = normed[p] if s.states is None else \
                        blocks.rms_norm(self._row(s, i)[p], norm, self.cfg.norm_eps)
                    s.kld += float(kl_sum(probs, reference, log_probs(x, weight)))

    def _row(self, states, i: int) -> torch.Tensor:
        data = states.states.data if isinstance(states, Stream) else states.data
        return torch.from_numpy(np.asarray(data[i])).to(self.device)


def _ignore(name, x, expert) -> None:
    """A forward's record that keeps nothing."""


def log_probs(x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Log-softmax of the logits in float64 where the device has it (KLDs of 1e-6 are summed)."""
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    return torch.log_softmax(blocks.linear(x, head).to(wide), dim=-1)


def kl_sum(probs: torch.Tensor, reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """sum over rows of KL(P || Q) from P's probabilities and log-probs and Q's log-probs (as
    nemoq.eval.metrics.kl_rows)."""
    return (probs * (reference - other)).sum()


def streamed_klds(source: Source, mixes: list[dict[str, str]], text: str, *, tokens: int, ctx: int, first: int,
                  device: torch.device, on_progress: Callable[[int, int], None] | None = None
                  ) -> tuple[list[float], int]:
    """Per mix, its mean KLD on the first `tokens` tokens of `text` in sequences of ctx; and the
    positions scored. As many streams a pass as STREAM_BYTES holds; on_progress(done, total) in
    steps of all passes."""
    sequences = plain_sequences(source, text, ctx, tokens)
    per_pass = max(1, STREAM_BYTES // (sequences.size * config_of(source).hidden * 4))
    passes = [mixes[i:i + per_pass] for i in range(0, len(mixes), per_pass)] or [[]]
    klds, scored = [], 0
    for i, group in enumerate(passes):
        run = StreamedKLD(source, group, sequences, device=device, first=first)
        steps = run.cfg.n_layers + 1
        klds += run.run(None if on_progress is None else
                        lambda done, _, i=i: on_progress(i * steps + done, len(passes) * steps))
        scored = run.scored
    return klds, scored

