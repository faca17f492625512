"""The multi-token-prediction block of the calibrated walk (walk.py), as llama.cpp's nemotron_h_moe
MTP graph runs it: for position t, the embedding of token t+1 and the trunk's final hidden state
at t (after output_norm, as llama.cpp hands it over), each RMS-normed (nextn.enorm, nextn.hnorm),
concatenated and fused by nextn.eh_proj; then an attention sub-layer (attn_norm) and an MoE
sub-layer whose input norm is post_attention_norm. Its head (nextn.shared_head_norm, then the
model's output.weight) holds no matrix of its own to quantize, so the walk stops before it.

The calibration sequences give ctx - 1 such positions each (the last token has no successor).
LayerWalk takes this step as a mixin, after the output head, whose pass leaves the normed trunk
states in the walk's hidden states for it.
"""

from __future__ import annotations

import numpy as np
import torch

from nemoq.calib import blocks
from nemoq.calib.forward import HiddenStates
from nemoq.calib.walk_types import Gram
from nemoq.calib.weights import Weights

EH_PROJ = "nextn.eh_proj.weight"
NORMS = ("nextn.enorm.weight", "nextn.hnorm.weight")


class MTPSteps:
    """LayerWalk's MTP step: eh_proj, then the block's attention and MoE sub-layers as the
    walk's own layers of those kinds."""

    def _mtp(self, w: Weights) -> None:
        self._fuse(w)
        self._staged("attention", w)
        # the MoE sub-layer reads post_attention_norm where a trunk MoE layer reads attn_norm
        self._moe(Weights(w.prefix, {**w, "attn_norm.weight": w["post_attention_norm.weight"]}))
        self.close()

    def _fuse(self, w: Weights) -> None:
        """eh_proj quantized from the fused inputs of its stream(s); the walk's hidden states
        become its outputs, ctx - 1 positions per sequence."""
        where, full, stored = self._embedding_rows()
        n, ctx, hidden = self.hidden.data.shape
        streams = [(self.hidden, stored if self.sequential else full)]
        if self.asymmetric:
            streams.append((self.reference, full))

        def fused(states: HiddenStates, rows: np.ndarray, part: slice) -> torch.Tensor:
            e = torch.from_numpy(rows[where[part, 1:]]).to(self.device)
            h = torch.from_numpy(np.asarray(states.data[part, :-1])).to(self.device)
            return torch.cat([blocks.rms_norm(x, w[norm], self.cfg.norm_eps)
                              for x, norm in ((e, NORMS[0]), (h, NORMS[1]))], dim=-1)

        name = w.name(EH_PROJ)
        gram = Gram(2 * hidden, self.device)
        for part in self.parts:
            x = [fused(states, rows, part) for states, rows in streams]
            gram.add(x[0], x[1] if self.asymmetric else None)
            if self.asymmetric:
                self._statistic(name, x[1], None)
        self._count(name, None, gram)
        quantized = Weights(w.prefix, {EH_PROJ: w[EH_PROJ]})
        self._quantize_stage(w, (EH_PROJ,), {name: gram}, quantized if self.sequential else None)

        outputs = [HiddenStates((n, ctx - 1, hidden)) for _ in streams]
        for part in self.parts:
            for (states, rows), out, eh in zip(streams, outputs, (quantized[EH_PROJ], w[EH_PROJ])):
                out.data[part] = blocks.linear(fused(states, rows, part), eh).cpu().numpy()
        self.close()
        self.hidden = outputs[0]
        self.reference = outputs[1] if self.asymmetric else None
