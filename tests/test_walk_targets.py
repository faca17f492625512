"""What the calibrated walk rounds each matrix against, beyond its inputs' H: a routed expert's
tokens weighted by their gates."""

from __future__ import annotations

import numpy as np

from nemoq.calib.hparams import config_of
from nemoq.calib.walk import LayerWalk, Target
from nemoq.convert.pipeline import open_source
from tests.test_calib_forward import CPU, token_sequences


def walked(src, targets: dict[str, Target], walk_class=LayerWalk, steps: int | None = None, **options):
    source = open_source(src)
    cfg = config_of(source)
    walk = walk_class(source.plan, cfg, token_sequences(cfg.vocab, n=4, length=256), targets, device=CPU, **options)
    if "token_embd.weight" in targets:   # rounded first, as calibrated.py asks for it
        walk.result("token_embd.weight")
    for _ in range(cfg.n_layers if steps is None else steps):
        walk.advance()
    return walk, cfg


def test_a_routed_experts_h_sums_its_tokens_times_their_gates_squared(tiny_model):
    """The layer adds g * expert(x): an expert's rounding error reaches it times g, so its H is
    sum g^2 x x^T over the tokens routed to it (the router's gates, gathered independently here)."""
    seen: dict[str, list] = {"x": [], "h": []}

    class Watched(LayerWalk):
        def _routed_experts(self, w, out, ids, gates, inputs, references):
            seen["ids"], seen["gates"] = ids.copy(), gates.copy()

            def recorded(token):
                x = inputs(token)
                seen["x"].append(x.double().numpy())
                return x
            super()._routed_experts(w, out, ids, gates, recorded, references)

        def quantize_matrix(self, name, matrix, gram, *more):
            seen["h"].append(gram.numpy())
            return super().quantize_matrix(name, matrix, gram, *more)
    source = open_source(tiny_model)
    layer = config_of(source).layer_kinds.index("moe")
    walked(tiny_model, {f"blk.{layer}.ffn_up_exps.weight": Target("q8_0", False)}, Watched, layer + 1)
    ids, gates = seen["ids"], seen["gates"]
    counts = np.bincount(ids.reshape(-1), minlength=len(seen["h"]))
    order = sorted(range(len(counts)), key=lambda e: counts[e] == 0)
    assert len(seen["x"]) == len(seen["h"]) == len(order) and counts.min() > 0
    spread = []
    for e, x, h in zip(order, seen["x"], seen["h"]):
        token, slot = np.nonzero(ids == e)
        g = gates[token, slot].astype(np.float64)
        expected = (x * g[:, None] ** 2).T @ x
        np.testing.assert_allclose(h, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
        spread.append(g.max() / g.min())
    assert max(spread) > 2   # the gates differ enough between tokens that unweighted H would fail


def test_residual_writers_hide_their_error_from_the_routers_after_them(tiny_model, monkeypatch):
    """The walk rounds layer 0's ssm_out under the routers' row metric (routers.py): what the later
    routers read of its output error falls well below rounding each row on its own."""
    from nemoq.calib import walk as walk_module
    from nemoq.calib.routers import router_reads
    seen = {}

    class Watched(LayerWalk):
        def quantize_matrix(self, name, matrix, gram, *more):
            c, scale, values = super().quantize_matrix(name, matrix, gram, *more)
            seen[name] = (matrix.double().numpy() - values.double().numpy(), gram.numpy())
            return c, scale, values
    name = "blk.0.ssm_out.weight"
    errors = {}
    for aware in (False, True):
        monkeypatch.setattr(walk_module, "ROUTER_AWARE", aware)
        walked(tiny_model, {name: Target("q4_0", False)}, Watched, 1, feeds="sequential")
        errors[aware] = seen[name]
    source = open_source(tiny_model)
    b = sum(router_reads(source.plan, config_of(source).layer_kinds).values())
    visible = {k: float(np.trace(b @ e @ h @ e.T)) for k, (e, h) in errors.items()}
    total = {k: float(np.trace(e @ h @ e.T)) for k, (e, h) in errors.items()}
    assert visible[True] < 0.5 * visible[False] and total[True] < 1.5 * total[False]
