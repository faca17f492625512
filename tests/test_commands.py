"""The command functions run without the CLI: options in, results out, nothing printed."""

from __future__ import annotations

from pathlib import Path

from nemoq import kernels_c
from nemoq.commands.base import Output
from nemoq.commands.evaluate import BaseOptions, EvalInputs, EvalOptions, GateOptions, usage_error
from nemoq.commands.quantize import QuantizeOptions, RecipeOptions, quantize


def test_quantize_threads_reach_the_kernels_for_that_command_only(tmp_path, tiny_model, monkeypatch, capsys):
    seen = []
    for name in ("quantize_rows", "quantize_half_rows"):
        kernel = getattr(kernels_c, name)
        monkeypatch.setattr(kernels_c, name, lambda *a, _k=kernel, **kw: (seen.append(kw["threads"]), _k(*a, **kw))[1])
    plans = []
    outcome = quantize(QuantizeOptions(str(tiny_model), Output(tmp_path / "q.gguf"), RecipeOptions("Q8_0"), threads=1),
                       on_plan=plans.append)
    assert seen and set(seen) == {1}
    assert kernels_c.THREADS is None
    assert plans == [outcome.plan] and outcome.result.outputs == [tmp_path / "q.gguf"]
    assert capsys.readouterr() == ("", "")


def test_dry_run_plans_from_the_config_alone(tmp_path, tiny_model):
    outcome = quantize(QuantizeOptions(str(tiny_model), Output(None), RecipeOptions("NVFP4"), dry_run=True))
    assert outcome.result is None and not list(tmp_path.iterdir())
    scaled = [t for t in outcome.plan.typed if t.type == "nvfp4"]
    assert scaled and outcome.scales.planned and outcome.scales.count == len(scaled)


def test_eval_usage_errors_name_the_first_conflict():
    tiny = Path(__file__)   # any existing path: nothing is read
    one = EvalInputs((tiny,), data=tiny)
    assert usage_error(EvalOptions(one)) is None
    assert usage_error(EvalOptions(EvalInputs((tiny, tiny), data=None))) == "give one model, or several with --compare"
    assert usage_error(EvalOptions(one, gate=GateOptions(max_kld=0.1))) == \
        "--max-ppl-ratio, --max-kld and --min-top1 need --base or --base-logits"
    assert usage_error(EvalOptions(one, BaseOptions(model=tiny), compare=True, plot=None)) is None
