"""The layer walk of calibrated quantization: each matrix quantized from the inputs it sees.

The calibration tokens' hidden states go through the model one layer at a time, as in
`nemoq calibrate` (forward.py). For every matrix of a layer, H = sum over tokens of x x^T of
its input is accumulated in float64 on the device, and each matrix the recipe quantizes is
handed with its H to nemoq.quant.compensate, which returns its blocks.

Whose inputs (`FEEDS`): "full-precision", the full-precision model's, as `nemoq calibrate`
sees them; every layer is fed the full-precision layer's output. "sequential": the quantized
model's. A layer's matrices then go in stages (`STAGES`): a stage's inputs are computed with the
matrices of the earlier stages already quantized (attention output sees the quantized q, k and
v), the next layer gets the quantized layer's output, and the first layer the embeddings as the
file stores them. "asymmetric": both streams side by side; each matrix is rounded for the
quantized stream's inputs x~ with the full-precision outputs W x as its target
(nemoq/quant/asymmetric.py), so it also corrects what the layers below got wrong. FEED is the
default, by measurement.

Routed experts (walk_experts.py) are done one at a time, so one expert's H is alive at a time: the router runs
once over every token (it stays F32), then each expert gathers its tokens from the layer's
input, accumulates H_up, quantizes up, computes down's input (with the quantized up when
sequential), accumulates H_down, quantizes down, and adds its output to the layer's. Experts
without tokens go last and are rounded with the mean importance of the layer's other experts
(as `--imatrix` does).

Memory: one layer's weights, the hidden states (twice during an MoE layer: its input and its
output; a LatentMoE layer adds two or three arrays of the latent width, walk_experts.py), one
stage's H matrices and the quantized bytes of one layer (until they are written).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from nemoq.calib import blocks, compensate_torch
from nemoq.calib.embedding import NAME as EMBEDDINGS, embedding_hessian
from nemoq.calib.routers import WriterMetrics, coupled_compensated
from nemoq.calib.forward import HiddenStates, Progress, batches
from nemoq.calib.imatrix_file import ImportanceMatrix
from nemoq.calib.walk_experts import SHARED, MoESteps
from nemoq.calib.walk_mtp import MTPSteps
from nemoq.calib.walk_types import (  # noqa: F401 (MatrixReport and Target: calibrated.py's)
    Gram, MatrixReport, Quantized, Recorder, StageRecorded, Target, report_of,
)
from nemoq.calib.weights import LayerLoader, Weights
from nemoq.convert.config import ModelConfig
from nemoq.convert.plan import Plan
from nemoq.errors import NemoqError
from nemoq.quant.asymmetric import asymmetric_target_torch
from nemoq.quant.compensate import DAMPING, Compensated, column_order, compensated_quantize
from nemoq.quant.encodings import BLOCK_ENCODINGS
from nemoq.quant.tensor_scale import calibrated_scale

FEEDS = ("full-precision", "sequential", "asymmetric")
# Measured on both trained models (bench/calibrated.py --feeds, docs/quantize.md): KLD vs F32 on
# 11.5k held-out tokens, 65536 calibration tokens. Full-precision over sequential inputs:
# 0.91-0.94 for Q4_K_M, IQ4_NL, NQ4 and NQ5, 0.99-1.02 for the others (bundled model).
# Asymmetric over full-precision: 0.86-0.99 on the bundled model, 0.85-0.96 on w256, for
# Q4_K_M, IQ4_NL, NQ4, NVFP4 and MXFP4_MOE; Q8_0 1.08 +- 0.15 and 0.82 +- 0.08.
FEED = "asymmetric"
# compensate.py's damping (lambda = 1% of mean diag H) was the best tried on the same model:
# IQ4_NL KLD over --imatrix's 0.87 / 0.82 / 0.91 / 0.84 at 0.001 / 0.01 / 0.1 / 0.3.

# Matrices per layer kind, in stages: a stage's inputs depend only on earlier stages' matrices.
STAGES = {
    "mamba": (("ssm_in.weight",), ("ssm_out.weight",)),
    "attention": (("attn_q.weight", "attn_k.weight", "attn_v.weight"), ("attn_output.weight",)),
    "moe": SHARED,   # then the routed experts, one at a time (walk_experts.py)
}
HEAD = "output.weight"


# Residual writers rounded under the row metric of the routers after them (routers.py), or,
# False, each row on its own
ROUTER_AWARE = True

# The rounding: compensate_torch (the fast path, on the walk's device) or, False, the numpy
# reference it is tested against (nemoq.quant.compensate; ~10x slower at Nano's widths).
FAST = True

# compensate.py's linear algebra is many small factorisations and products: with OpenBLAS's
# threads (beside torch's) a 320 x 320 Cholesky took 25 ms on 2 cores instead of 0.7 ms.
BLAS_THREADS = 1


class LayerWalk(MoESteps, MTPSteps):
    """Quantizes the targets layer by layer, on demand: `result(name)` walks on until the step
    (layer, the output head, or the MTP block after it: walk_mtp.py) that holds `name` is done.
    Results of earlier steps are dropped, so ask in the file's order."""

    def __init__(self, plan: Plan, cfg: ModelConfig, sequences: np.ndarray, targets: dict[str, Target], *,
                 device: torch.device, feeds: str = FEED,
                 stored_embeddings: Callable[[np.ndarray], np.ndarray] | None = None,
                 damping: float = DAMPING, on_progress: Callable[[Progress], None] | None = None):
        self.cfg, self.sequences, self.targets = cfg, sequences, targets
        if feeds not in FEEDS:
            raise ValueError(f"feeds: one of {', '.join(FEEDS)}, not {feeds!r}")
        self.device, self.feeds = device, feeds
        self.stored_embeddings, self.damping = stored_embeddings, damping
        self.on_progress = on_progress
        self.loader = LayerLoader(plan, device)
        self.mtp_layers = plan.mtp_layers               # the MTP block llama.cpp appends, walked after the head
        self.parts = batches(*sequences.shape)
        self.hidden: HiddenStates | None = None         # the quantized model's, but with full-precision feeds
        self.reference: HiddenStates | None = None      # the full-precision model's, with asymmetric feeds
        self.step = 0                                   # next step: layers 0..n-1, then the head
        self.results: dict[str, Quantized] = {}         # the last step's
        self.reports: list[MatrixReport] = []
        self.sums: dict[str, np.ndarray] = {}           # imatrix statistics: sum x^2 per column
        self.counts: dict[str, np.ndarray] = {}
        self.embedding_values: np.ndarray | None = None    # the calibration tokens' rows of token_embd as compensated
        # the residual writers' row metric, from what every later router reads (routers.py)
        self.writer_metric = WriterMetrics(plan, cfg.layer_kinds) if ROUTER_AWARE else lambda name: None
        self.start = time.perf_counter()

    @property
    def sequential(self) -> bool:
        """The walk feeds (also) the quantized model's activations."""
        return self.feeds != "full-precision"

    @property
    def asymmetric(self) -> bool:
        return self.feeds == "asymmetric"

    @property
    def steps(self) -> int:
        return self.cfg.n_layers + 1 + self.mtp_layers

    @property
    def tokens(self) -> int:
        return int(self.sequences.size)

    def result(self, name: str) -> Quantized:
        if name == EMBEDDINGS:
            return self._embeddings()
        step = step_of(name, self.cfg.n_layers)
        while self.step <= step:
            self.advance()
        if name not in self.results:
            raise RuntimeError(f"{name}: asked for after its layer was left, or not a calibrated tensor")
        return self.results[name]

    def finish(self) -> None:
        """Walk the remaining steps (their statistics are wanted, if not their bytes)."""
        while self.step < self.steps:
            self.advance()

    def close(self) -> None:
        for states in (self.hidden, self.reference):
            if states is not None:
                states.close()
        self.hidden = self.reference = None

    def imatrix(self, datasets: list[str]) -> ImportanceMatrix:
        n, ctx = self.sequences.shape
        return ImportanceMatrix(dict(self.sums), dict(self.counts), datasets, n, ctx)

    # --- steps -----------------------------------------------------------------------------

    def advance(self) -> None:
        self.results = {}
        with torch.no_grad():
            if self.hidden is None:
                self._embed()
            if self.step < self.cfg.n_layers:
                weights = self.loader.layer(self.step)
                kind = self.cfg.layer_kinds[self.step]
                if kind == "moe":
                    self._moe(weights)
                else:
                    self._staged(kind, weights)
                del weights
            elif self.step == self.cfg.n_layers:
                self._head()
            else:
                self._mtp(self.loader.layer(self.cfg.n_layers))
        self.step += 1
        if self.on_progress is not None:
            self.on_progress(Progress(self.step, self.steps, self.tokens, time.perf_counter() - self.start))

    def _embeddings(self) -> Quantized:
        """token_embd, asked for before the first layer: rounded through layer 0's input matrices
        (embedding.py), so its H needs weights only."""
        target = self.targets[EMBEDDINGS]
        w = self.loader.globals(EMBEDDINGS)[EMBEDDINGS].float().cpu().numpy()
        h = embedding_hessian(self.loader.layer(0), self.cfg.layer_kinds[0],
                              self.cfg.experts_used_of(0) / self.cfg.n_experts)
        c = self._round(target.type, w, h, None, None, None)
        self.reports.append(report_of(EMBEDDINGS, target.type, c, 0))
        if self.sequential:   # the calibration tokens' rows only (the table is 1.4 GB at Nano's size)
            ids = np.unique(self.sequences)
            self.embedding_values = BLOCK_ENCODINGS[target.type].dequantize(c.blocks[ids]).reshape(len(ids), -1)
        return Quantized(c.blocks, None)

    def _embed(self) -> None:
        n, ctx = self.sequences.shape
        self.hidden = HiddenStates((n, ctx, self.cfg.hidden))
        where, full, stored = self._embedding_rows()
        if self.asymmetric:
            self.reference = HiddenStates((n, ctx, self.cfg.hidden))
            for part in self.parts:
                self.reference.data[part] = full[where[part]]
        rows = stored if self.sequential else full
        for part in self.parts:
            self.hidden.data[part] = rows[where[part]]

    def _embedding_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(where, full, stored): each calibration token's row in the other two, the rows of the
        tokens used as the checkpoint has them, and (sequential feeds) as the quantized file has them."""
        ids, where = np.unique(self.sequences, return_inverse=True)
        embd = self.loader.globals("token_embd.weight")["token_embd.weight"]
        full = embd[torch.from_numpy(ids.astype(np.int64)).to(embd.device)].float().cpu().numpy()
        del embd
        stored = None
        if self.sequential and self.embedding_values is not None:
            stored = self.embedding_values
        elif self.sequential:
            stored = self.stored_embeddings(full) if self.stored_embeddings is not None else full
        return where.reshape(self.sequences.shape), full, stored

    def _staged(self, kind: str, w: Weights) -> None:
        def layer(x, record, part, weights):
            return blocks.layer(x, kind, weights, self.cfg, record)
        if self.asymmetric:   # stage by stage, both streams; each stream's layer output
            quantized = Weights(w.prefix, dict(w))
            for stage in STAGES[kind]:
                names = [w.name(short) for short in stage]
                self._quantize_stage(w, stage, self._pass_pair(layer, names, w, quantized), quantized)
            self._pass_pair(layer, [], w, quantized, outputs=True, statistics=True)
        elif self.sequential:   # stage by stage on the quantized matrices, then the quantized layer's output
            for stage in STAGES[kind]:
                self._quantize_stage(w, stage, self._pass(layer, [w.name(short) for short in stage], w), w)
            self._pass(layer, [], w, into=self.hidden)
        else:                 # one pass: every input and the full-precision output
            stage = sum(STAGES[kind], ())
            self._quantize_stage(w, stage, self._pass(layer, [w.name(short) for short in stage], w, into=self.hidden))

    def _head(self) -> None:
        norm = self.loader.globals("output_norm.weight")["output_norm.weight"]

        def head_input(x, record, part, weights):
            x = blocks.rms_norm(x, norm, self.cfg.norm_eps)
            record(HEAD, x, None)
            return x
        mtp = self.mtp_layers > 0   # the MTP block reads the normed states: they replace the hidden ones
        if self.asymmetric:
            grams = self._pass_pair(head_input, [HEAD], None, None, outputs=mtp, statistics=True)
        else:
            grams = self._pass(head_input, [HEAD], None, into=self.hidden if mtp else None)
        if HEAD in self.targets:
            self._quantize_stage(self.loader.globals(HEAD), (HEAD,), grams)
        if not mtp:
            self.close()

    def _pass(self, forward: Callable, names: list[str], weights: Weights | None,
              into: HiddenStates | None = None) -> dict[str, Gram]:
        """Every batch through `forward(x, record, part, weights)`: H of each named input. With
        `into`, the forward's outputs are stored there (it may be the input); without, the
        forward is cut short once the named inputs are recorded."""
        grams: dict[str, Gram] = {}
        for part in self.parts:
            record = Recorder(names, grams, self.device, cut=into is None)
            self._forward_part(forward, self.hidden, part, record, weights, into)
        for name in names:
            self._count(name, None, grams[name])
        return grams

    def _pass_pair(self, forward: Callable, names: list[str], full: Weights | None, quantized: Weights | None,
                   outputs: bool = False, statistics: bool = False) -> dict[str, Gram]:
        """The asymmetric feeds' pass: every batch through the full-precision weights on the
        full-precision stream, then through the quantized weights on the quantized stream. H of
        each named input on the quantized stream, with its shift from the full-precision one.
        With `outputs`, each stream's outputs replace its inputs; with `statistics`, the
        full-precision inputs the forward records are the imatrix's (`_statistic`)."""
        grams: dict[str, Gram] = {}
        for part in self.parts:
            reference = Recorder(names, {}, self.device, cut=not outputs, keep=True,
                                  statistics=self._statistic if statistics else None)
            self._forward_part(forward, self.reference, part, reference, full, self.reference if outputs else None)
            record = Recorder(names, grams, self.device, cut=not outputs, references=reference.kept)
            self._forward_part(forward, self.hidden, part, record, quantized, self.hidden if outputs else None)
        for name in names:
            self._count(name, None, grams[name])
        return grams

    def _forward_part(self, forward: Callable, states: HiddenStates, part: slice, record: Callable,
                      weights: Weights | None, into: HiddenStates | None) -> None:
        """One batch of `states` through `forward(x, record, part, weights)`; its output stored in
        `into` (which may be `states`), unless the record cut the forward short."""
        x = torch.from_numpy(np.asarray(states.data[part])).to(self.device)
        try:
            y = forward(x, record, part, weights)
        except StageRecorded:
            return
        if into is not None:
            into.data[part] = y.cpu().numpy()

    # The imatrix (--imatrix-out) describes the full-precision model, as `nemoq calibrate` and
    # llama-imatrix do. With full-precision or sequential feeds it is each Gram's diagonal
    # (_count); with asymmetric feeds the Grams are the quantized stream's, so the statistics are
    # summed from the full-precision stream's forward (_statistic), routing included.

    def _count(self, name: str, expert: int | None, gram: Gram) -> None:
        """The imatrix's statistics from a Gram: diag H (sum x^2 per column) and the tokens."""
        if self.asymmetric:
            return
        sums, counts = self._statistics_of(name, expert, gram.h.shape[0])
        sums[expert or 0] = gram.diag.cpu().numpy()
        counts[expert or 0] = gram.tokens

    def _statistic(self, name: str, x: torch.Tensor, expert: int | None) -> None:
        """A `record` of the full-precision stream: x's sum of squares and tokens added to name's."""
        x = x.reshape(-1, x.shape[-1])
        sums, counts = self._statistics_of(name, expert, x.shape[-1])
        sums[expert or 0] += x.double().square().sum(0).cpu().numpy()
        counts[expert or 0] += x.shape[0]

    def _statistics_of(self, name: str, expert: int | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            n_mat = self.cfg.n_experts if expert is not None else 1
            self.sums[name] = np.zeros((n_mat, n), np.float64)
            self.counts[name] = np.zeros(n_mat, np.float64)
        return self.sums[name], self.counts[name]

    # --- quantizing ------------------------------------------------------------------------------

    def _quantize_stage(self, w: Weights, stage: tuple[str, ...], grams: dict[str, Gram],
                        quantized: Weights | None = None) -> None:
        """Quantize the targets among w's `stage` matrices; their values as stored go into
        `quantized`, where later inputs are to see them."""
        for short in stage:
            name = w.name(short)
            if name not in self.targets:
                continue
            c, scale, values = self.quantize_matrix(name, w[short], grams[name])
            self.results[name] = Quantized(c.blocks, None if scale is None else np.array([scale], np.float32))
            self.reports.append(report_of(name, self.targets[name].type, c, grams[name].tokens))
            if quantized is not None:
                quantized[short] = values

    def quantize_matrix(self, name: str, matrix: torch.Tensor, gram: Gram, importance: np.ndarray | None = None,
                        inputs: torch.Tensor | None = None):
        """(report with blocks, the `.scale` or None, the values as stored on the device); inputs:
        the tokens H sums, where at hand (an expert's: the fast path measures errors through them).
        Every matrix the walk quantizes goes through here: a subclass that measures instead of
        rounding (profile.ProfileWalk) overrides it."""
        target = self.targets[name]
        w, h = matrix.float().cpu().numpy(), gram.numpy()
        if not np.isfinite(h).all() or not np.isfinite(w).all():
            raise NemoqError(f"{name}: NaN/Inf in the weights or in the calibration inputs that reach them")
        if gram.shift is not None:
            w = asymmetric_target_torch(w, gram.h, gram.shift, self.damping, gram.tokens)
        scale = None
        if target.scaled:
            scale = float(calibrated_scale(target.type, w, h, gram.tokens, importance))
            w = w / np.float32(scale)
        metric = self.writer_metric(name)
        if metric is None:
            c = self._round(target.type, w, h, importance, gram.tokens, inputs)
        else:
            factors: dict = {}   # H's factor, made once for the matrix's row groups
            c = coupled_compensated(target.type, w, h, metric, lambda rows: self._round(
                target.type, rows, h, importance, gram.tokens, inputs, factors))
        values = BLOCK_ENCODINGS[target.type].dequantize(c.blocks).reshape(w.shape)
        if scale is not None:
            values = values * np.float32(scale)
        return c, scale, torch.from_numpy(values).to(self.device)

    def _round(self, type_name: str, w: np.ndarray, h: np.ndarray, importance, tokens, inputs,
               factors: dict | None = None) -> Compensated:
        with threadpool_limits(BLAS_THREADS, user_api="blas"):
            if FAST:
                return compensate_torch.compensated_quantize(
                    type_name, w, h, damping=self.damping, importance=importance, tokens=tokens,
                    inputs=inputs, device=self.device, act_order=column_order(type_name), factors=factors)
            return compensated_quantize(type_name, w, h, damping=self.damping, importance=importance, tokens=tokens,
                                        act_order=column_order(type_name))


def step_of(name: str, n_layers: int) -> int:
    """The walk's step that quantizes `name`: its layer, n_layers for the output head, or
    n_layers + 1 for the MTP block (GGUF layer n_layers, after output.weight in the file)."""
    if name.startswith("blk."):
        layer = int(name.split(".")[1])
        return layer if layer < n_layers else layer + 1
    return n_layers

