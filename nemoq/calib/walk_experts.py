"""The MoE layer of the calibrated walk (walk.py): the shared expert and the routing, then the
routed experts one at a time, so one expert's H is alive at a time. LayerWalk takes these steps
as a mixin; they use its passes (_pass), quantizers (_quantize_stage, quantize_matrix) and statistics.

LatentMoE (Nemotron 3 Super): ffn_latent_down reads the normed layer input, as the shared expert's
up projection does, and is quantized in its stage; the routed experts then read its output, the
latent x (one float32 array of the tokens' latent x, beside the hidden states). Their weighted
outputs are summed per token in a second latent array; ffn_latent_up's input is complete only
once every expert ran, so one more pass builds its H, and after it is quantized a last pass
adds its output to the layer's.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from nemoq.calib import blocks
from nemoq.calib.forward import HiddenStates
from nemoq.calib.walk_types import Gram, Quantized, report_of
from nemoq.calib.weights import Weights
from nemoq.quant.compensate import Compensated, stack

LATENT_DOWN, LATENT_UP = "ffn_latent_down.weight", "ffn_latent_up.weight"
# stages, as walk.STAGES; ffn_latent_down reads the shared expert's input (LatentMoE layers only)
SHARED = (("ffn_up_shexp.weight", LATENT_DOWN), ("ffn_down_shexp.weight",))
EXPERTS = ("ffn_up_exps.weight", "ffn_down_exps.weight")
# The layer adds g * expert(x), so an expert's rounding error reaches it times its gate g: H sums
# g^2 x x^T over the expert's tokens (MoEQuant's affinity-weighted Hessian). Against unweighted
# H on the w256 model: Q4_K_M 0.998 +- 0.011, IQ4_NL 0.990 +- 0.007 (KLD ratio, same bytes).
GATE_WEIGHTED = True


class MoESteps:
    """LayerWalk's MoE layer: `_moe` replaces the walk's hidden states with the layer's output."""

    def _moe(self, w: Weights) -> None:
        n, ctx, _ = self.hidden.data.shape
        out = HiddenStates(self.hidden.data.shape)
        latent = [HiddenStates((n, ctx, w[LATENT_DOWN].shape[0])) for _ in range(2 + self.asymmetric)] \
            if LATENT_DOWN in w else []      # the experts' input, their summed outputs, and the former's reference
        try:
            ids, gates = self._shared_expert_and_routing(w, out, latent[0] if latent else None)
            if latent:
                latent[1].data[...] = 0.0
                self._routed_experts(w, latent[1], ids, gates, *self._latent_inputs(w, latent))
                self._latent_up(w, latent[1], out)
            else:
                self._routed_experts(w, out, ids, gates, *self._normed_inputs(w))
        except BaseException:
            out.close()
            raise
        finally:
            for states in latent:
                states.close()
        if self.asymmetric and not latent:   # the full-precision stream: the whole layer as it is
            for part in self.parts:
                self._full_precision_layer(w, part, self._statistic)
        self.hidden.close()
        self.hidden = out

    def _full_precision_layer(self, w: Weights, part: slice, record) -> None:
        """Asymmetric feeds: one batch of the full-precision stream through the whole layer as it is."""
        def layer(x, record, part, weights):
            return blocks.layer(x, "moe", weights, self.cfg, record)
        self._forward_part(layer, self.reference, part, record, w, self.reference)

    def _normed(self, x: torch.Tensor, w: Weights) -> torch.Tensor:
        return blocks.rms_norm(x, w["attn_norm.weight"], self.cfg.norm_eps)

    def _shared_expert_and_routing(self, w: Weights, out: HiddenStates,
                                   latent: HiddenStates | None) -> tuple[np.ndarray, np.ndarray]:
        """The shared expert (and ffn_latent_down) quantized; into `out`, the layer's output but for
        the routed experts; into `latent`, the experts' latent input; returned, every token's
        experts and routing weights."""
        n, ctx, hidden = self.hidden.data.shape
        top_k = self.cfg.experts_used_of(int(w.prefix.split(".")[1]))   # Puzzle: the layer's own
        ids = np.empty((n * ctx, top_k), np.int64)
        gates = np.empty(ids.shape, np.float32)
        stages = tuple(tuple(short for short in stage if short in w) for stage in SHARED)

        def shared(x, record, part, weights):
            xn = self._normed(x, weights)
            if LATENT_DOWN in weights:
                record(weights.name(LATENT_DOWN), xn, None)
            return blocks.shared_expert(xn, weights, record)

        def routed_and_shared(x, record, part, weights):
            xn = self._normed(x, weights)
            e, g = blocks.route(xn.reshape(-1, hidden), weights, self.cfg)
            rows = slice(part.start * ctx, part.stop * ctx)
            ids[rows], gates[rows] = e.cpu().numpy(), g.cpu().numpy()
            if latent is not None:
                record(weights.name(LATENT_DOWN), xn, None)
                latent.data[part] = blocks.linear(xn, weights[LATENT_DOWN]).cpu().numpy()
            return x + blocks.shared_expert(xn, weights, record)

        if self.sequential:
            quantized = Weights(w.prefix, dict(w)) if self.asymmetric else w
            for stage in stages:
                names = [w.name(short) for short in stage]
                grams = (self._pass_pair(shared, names, w, quantized) if self.asymmetric
                         else self._pass(shared, names, w))
                self._quantize_stage(w, stage, grams, quantized)
            self._pass(routed_and_shared, [], quantized, into=out)
        else:
            stage = sum(stages, ())
            grams = self._pass(routed_and_shared, [w.name(short) for short in stage], w, into=out)
            self._quantize_stage(w, stage, grams)
        return ids, gates

    def _normed_inputs(self, w: Weights) -> tuple[Callable, Callable | None]:
        """(tokens -> the experts' input, the same on the full-precision stream or None): the normed
        layer input, gathered per expert."""
        hidden = self.hidden.data.shape[-1]
        flat_in = self.hidden.data.reshape(-1, hidden)
        reference_in = self.reference.data.reshape(-1, hidden) if self.asymmetric else None

        def inputs(token):
            return self._normed(torch.from_numpy(np.asarray(flat_in[token])).to(self.device), w)

        def references(token):   # the same tokens in the full-precision model
            return self._normed(torch.from_numpy(np.asarray(reference_in[token])).to(self.device), w)
        return inputs, references if reference_in is not None else None

    def _latent_inputs(self, w: Weights, latent: list[HiddenStates]) -> tuple[Callable, Callable | None]:
        """As _normed_inputs, from the latent x the routing pass stored (and, asymmetric, the
        full-precision stream's latent x, computed here with the full-precision ffn_latent_down)."""
        width = latent[0].data.shape[-1]
        if self.asymmetric:
            for part in self.parts:
                x = torch.from_numpy(np.asarray(self.reference.data[part])).to(self.device)
                latent[2].data[part] = blocks.linear(self._normed(x, w), w[LATENT_DOWN]).cpu().numpy()
        flat = [states.data.reshape(-1, width) for states in latent]

        def gather(i):
            return lambda token: torch.from_numpy(np.asarray(flat[i][token])).to(self.device)
        return gather(0), gather(2) if self.asymmetric else None

    def _routed_experts(self, w: Weights, out: HiddenStates, ids: np.ndarray, gates: np.ndarray,
                        inputs: Callable, references: Callable | None) -> None:
        """One expert at a time, those without tokens last: quantized, their outputs added to `out`
        (the layer's output, or the latent sums)."""
        n_experts = w[EXPERTS[0]].shape[0]
        flat_out = out.data.reshape(-1, out.data.shape[-1])
        tokens = np.bincount(ids.reshape(-1), minlength=n_experts)
        order = sorted(range(n_experts), key=lambda e: tokens[e] == 0)
        up, down = (ExpertStack(w.name(short), short, n_experts, w[short].shape[-1]) for short in EXPERTS)
        for e in order:
            token, slot = np.nonzero(ids == e)
            x = inputs(token)
            x_full = h_full = None
            if references is not None:   # the same tokens in the full-precision model
                x_full = references(token)
                h_full = blocks.relu2(blocks.linear(x_full, w[up.short][e]))
            gate = torch.from_numpy(gates[token, slot]).to(self.device)
            weight = gate if GATE_WEIGHTED else None
            up_e = self._quantize_expert(up, e, w, x, x_full, weight)
            h = blocks.relu2(blocks.linear(x, up_e))
            down_e = self._quantize_expert(down, e, w, h, h_full, weight)
            y = blocks.linear(h, down_e) * gate[:, None]
            flat_out[token] += y.cpu().numpy()
        for s in (up, down):
            self._finish_stack(s)

    def _latent_up(self, w: Weights, sums: HiddenStates, out: HiddenStates) -> None:
        """ffn_latent_up from the experts' summed outputs: a pass for its H (asymmetric: the
        full-precision stream goes through the whole layer there, which gives the reference
        input and that stream's output), then it is quantized, then its output is added to `out`."""
        name = w.name(LATENT_UP)
        gram = Gram(sums.data.shape[-1], self.device)
        for part in self.parts:
            reference = None
            if self.asymmetric:
                kept = {}

                def keep(n, x, e):
                    self._statistic(n, x, e)
                    if n == name:
                        kept[n] = x
                self._full_precision_layer(w, part, keep)
                reference = kept[name]
            gram.add(torch.from_numpy(np.asarray(sums.data[part])).to(self.device), reference)
        self._count(name, None, gram)
        quantized = Weights(w.prefix, {LATENT_UP: w[LATENT_UP]})
        self._quantize_stage(w, (LATENT_UP,), {name: gram}, quantized if self.sequential else None)
        for part in self.parts:
            y = blocks.linear(torch.from_numpy(np.asarray(sums.data[part])).to(self.device), quantized[LATENT_UP])
            out.data[part] += y.cpu().numpy()

    def _quantize_expert(self, s: "ExpertStack", e: int, w: Weights, x: torch.Tensor,
                         reference: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """H of expert e's input x (the quantized model's, with `reference` the full-precision
        model's for the same tokens; `weight`, each token's gate), the expert quantized; the
        weights its next step should use."""
        gram = Gram(x.shape[-1], self.device)
        if x.shape[0]:
            gram.add(x, reference, weight)
        self._count(s.name, e, gram)
        matrix = w[s.short][e]
        if s.name not in self.targets:
            return matrix
        inputs = x if weight is None else x * weight[:, None]
        c, scale, values = self.quantize_matrix(s.name, matrix, gram, None if gram.tokens else s.mean_importance(), inputs)
        s.add(e, c, scale, gram)
        return values if self.sequential else matrix

    def _finish_stack(self, s: "ExpertStack") -> None:
        if s.name not in self.targets:
            return
        c = stack(s.reports)
        scales = np.array(s.scales, np.float32) if self.targets[s.name].scaled else None
        self.results[s.name] = Quantized(c.blocks, scales)
        self.reports.append(report_of(s.name, self.targets[s.name].type, c, int(sum(s.tokens))))
class ExpertStack:
    """One stacked expert tensor being quantized an expert at a time."""

    def __init__(self, name: str, short: str, n_experts: int, n: int):
        self.name, self.short = name, short
        self.reports: list[Compensated | None] = [None] * n_experts
        self.scales = [1.0] * n_experts
        self.tokens = [0] * n_experts
        self.importance_sum, self.seen = np.zeros(n, np.float64), 0

    def add(self, e: int, c: Compensated, scale: float | None, gram: Gram) -> None:
        self.reports[e], self.tokens[e] = c, gram.tokens
        self.scales[e] = 1.0 if scale is None else scale
        if gram.tokens:
            self.importance_sum += gram.diag.cpu().numpy() / gram.tokens
            self.seen += 1

    def mean_importance(self) -> np.ndarray | None:
        """For an expert that saw no token: the mean importance of the experts that did."""
        return (self.importance_sum / self.seen).astype(np.float32) if self.seen else None
