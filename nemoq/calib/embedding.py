"""Error-compensated rounding of token_embd, through the matrices that read it.

The embeddings are a row lookup, not a matmul: they have no inputs whose statistics could weigh
their rounding. A row's error d enters the residual stream, and the first thing that reads the
stream is layer 0: its RMSNorm (weight g) and its input matrices W (Mamba's in_proj; attention's
q, k, v; an MoE layer's shared expert and routed experts' up projections). To first order their
outputs move by W diag(g) d / rms(e), so ||W diag(g) d||^2 = d^T H d with

    H = diag(g) (sum over W of W^T W) diag(g)

is the output error a row's rounding costs there (the 1 / rms(e)^2 of each row scales its whole
error and does not change which codes are best). compensate.py rounds every row through this H.
"""

from __future__ import annotations

import numpy as np
import torch

from nemoq.calib.weights import Weights

NAME = "token_embd.weight"

# The matrices of each layer kind that read the normed residual stream. A routed expert sees a
# token with probability n_experts_used / n_experts, so the experts' W^T W are weighted by that.
CONSUMERS = {
    "mamba": ("ssm_in.weight",),
    "attention": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
    "moe": ("ffn_up_shexp.weight", "ffn_up_exps.weight"),
}


def embedding_hessian(w: Weights, kind: str, routed_share: float) -> np.ndarray:
    """H (hidden, hidden) for token_embd's rows, from layer 0's weights `w` of kind `kind`."""
    g = w["attn_norm.weight"].double().cpu()
    h = torch.zeros((len(g), len(g)), dtype=torch.float64)
    for short in CONSUMERS[kind]:
        m = w[short].double().cpu()
        if m.ndim == 3:   # a stack of routed experts (experts, rows, hidden or latent)
            stacked = torch.einsum("eri,erj->ij", m, m)
            if "ffn_latent_down.weight" in w:   # LatentMoE: the experts read L x
                latent = w["ffn_latent_down.weight"].double().cpu()
                stacked = latent.T @ stacked @ latent
            h += routed_share * stacked
        else:
            h += m.T @ m
    return (g[:, None] * h * g[None, :]).numpy()
