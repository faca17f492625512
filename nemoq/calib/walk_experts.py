"""The MoE layer of the calibrated walk (walk.py): the shared expert and the routing, then the
routed experts one at a time, so one expert's H is alive at a time. LayerWalk takes these steps
as a mixin; they use its passes (_pass), quantizers (_quantize_stage, _quantize) and statistics.
"""

from __future__ import annotations

import numpy as np
import torch

from nemoq.calib import blocks
from nemoq.calib.forward import HiddenStates
from nemoq.calib.walk_types import Gram, Quantized, report_of
from nemoq.calib.weights import Weights
from nemoq.quant.compensate import Compensated, stack

SHARED = (("ffn_up_shexp.weight",), ("ffn_down_shexp.weight",))   # stages, as walk.STAGES
EXPERTS = ("ffn_up_exps.weight", "ffn_down_exps.weight")


class MoESteps:
    """LayerWalk's MoE layer: `_moe` replaces the walk's hidden states with the layer's output."""

    def _moe(self, w: Weights) -> None:
        out = HiddenStates(self.hidden.data.shape)
        try:
            ids, gates = self._shared_expert_and_routing(w, out)
            self._routed_experts(w, out, ids, gates)
        except BaseException:
            out.close()
            raise
        self.hidden.close()
        self.hidden = out
        if self.asymmetric:   # the full-precision stream: the whole layer as it is
            for part in self.parts:
                x = torch.from_numpy(np.asarray(self.reference.data[part])).to(self.device)
                self.reference.data[part] = blocks.layer(x, "moe", w, self.cfg, _ignore).cpu().numpy()

    def _normed(self, x: torch.Tensor, w: Weights) -> torch.Tensor:
        return blocks.rms_norm(x, w["attn_norm.weight"], self.cfg.norm_eps)

    def _shared_expert_and_routing(self, w: Weights, out: HiddenStates) -> tuple[np.ndarray, np.ndarray]:
        """The shared expert quantized; into `out`, the layer's output but for the routed experts;
        returned, every token's experts and routing weights."""
        n, ctx, hidden = self.hidden.data.shape
        ids = np.empty((n * ctx, self.cfg.n_experts_used), np.int64)
        gates = np.empty(ids.shape, np.float32)

        def shared(x, record, part, weights):
            return blocks.shared_expert(self._normed(x, weights), weights, record)

        def routed_and_shared(x, record, part, weights):
            xn = self._normed(x, weights)
            e, g = blocks.route(xn.reshape(-1, hidden), weights, self.cfg)
            rows = slice(part.start * ctx, part.stop * ctx)
            ids[rows], gates[rows] = e.cpu().numpy(), g.cpu().numpy()
            return x + blocks.shared_expert(xn, weights, record)

        if self.sequential:
            quantized = Weights(w.prefix, dict(w)) if self.asymmetric else w
            for stage in SHARED:
                names = [w.name(short) for short in stage]
                grams = (self._pass_pair(shared, names, w, quantized) if self.asymmetric
                         else self._pass(shared, names, w))
                self._quantize_stage(w, stage, grams, quantized)
            self._pass(routed_and_shared, [], quantized, into=out)
        else:
            stage = sum(SHARED, ())
            self._quantize_stage(w, stage, self._pass(routed_and_shared, [w.name(short) for short in stage], w, into=out))
        return ids, gates

    def _routed_experts(self, w: Weights, out: HiddenStates, ids: np.ndarray, gates: np.ndarray) -> None:
        """One expert at a time, those without tokens last: quantized, their outputs added to `out`."""
        hidden = out.data.shape[-1]
        flat_in, flat_out = self.hidden.data.reshape(-1, hidden), out.data.reshape(-1, hidden)
        tokens = np.bincount(ids.reshape(-1), minlength=self.cfg.n_experts)
        order = sorted(range(self.cfg.n_experts), key=lambda e: tokens[e] == 0)
        up, down = (ExpertStack(w.name(short), short, self.cfg.n_experts, w[short].shape[-1]) for short in EXPERTS)
        reference_in = self.reference.data.reshape(-1, hidden) if self.asymmetric else None
        for e in order:
            token, slot = np.nonzero(ids == e)
            x = self._normed(torch.from_numpy(np.asarray(flat_in[token])).to(self.device), w)
            x_full = h_full = None
            if reference_in is not None:   # the same tokens in the full-precision model
                x_full = self._normed(torch.from_numpy(np.asarray(reference_in[token])).to(self.device), w)
                h_full = blocks.relu2(blocks.linear(x_full, w[up.short][e]))
            up_e = self._quantize_expert(up, e, w, x, x_full)
            h = blocks.relu2(blocks.linear(x, up_e))
            down_e = self._quantize_expert(down, e, w, h, h_full)
            y = blocks.linear(h, down_e) * torch.from_numpy(gates[token, slot, None]).to(self.device)
            flat_out[token] += y.cpu().numpy()
        for s in (up, down):
            self._finish_stack(s)

    def _quantize_expert(self, s: "ExpertStack", e: int, w: Weights, x: torch.Tensor,
                         reference: torch.Tensor | None = None) -> torch.Tensor:
        """H of expert e's input x (the quantized model's, with `reference` the full-precision
        model's for the same tokens), the expert quantized; the weights its next step should use."""
        gram = Gram(x.shape[-1], self.device)
        if x.shape[0]:
            gram.add(x, reference)
        self._count(s.name, e, gram)
        matrix = w[s.short][e]
        if s.name not in self.targets:
            return matrix
        c, scale, values = self._quantize(s.name, matrix, gram, None if gram.tokens else s.mean_importance(), x)
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


def _ignore(name: str, x: torch.Tensor, expert) -> None:
    pass
