"""quantize --fit MEM --fit-ctx N and --plot F.png: the KV cache and Mamba state are what llama.cpp
itself allocates for the bundled model, the compute estimate is above what it reserves, the budget
is the memory less all of it, the file fits; refusals are one line and write nothing; the plot is a
PNG drawn from the same profile."""

from __future__ import annotations

import re
import sys

import pytest

from nemoq.calib.target import budget_of, quantize_to_target
from nemoq.calib.target_plot import plot_data
from nemoq.cli import parse_size
from nemoq.convert.config import load_config
from nemoq.errors import NemoqError
from nemoq.quant.fit import Fit, fit_budget
from tests.conftest import ROOT, run_cli
from tests.test_target_size import profile, source  # noqa: F401  (the profile fixture, reused)

NANO = ROOT / "tests" / "data" / "nemotron-3-nano"
MIB = 2**20


def llama_cpp_buffers(gguf, ctx: int, kv_type: str) -> dict[str, float]:
    """llama.cpp's own report (MiB, two decimals) of the buffers it allocates at this context."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lines = []
    callback = llama_cpp.llama_log_callback(lambda level, text, user: lines.append(text.decode("utf-8", "replace")))
    llama_cpp.llama_log_set(callback, None)
    types = {"f16": {}, "q8_0": {"type_k": 8, "type_v": 8, "flash_attn": True}}   # 8: GGML_TYPE_Q8_0
    llm = llama_cpp.Llama(str(gguf), n_ctx=ctx, n_threads=1, verbose=True, **types[kv_type])
    del llm
    text = "".join(lines)
    found = {key: re.search(rf"{pattern}\s*=\s*([0-9.]+)", text)
             for key, pattern in (("kv", "KV buffer size"), ("state", "RS buffer size"),
                                  ("compute", "compute buffer size"), ("n_ctx", r"llama_context: n_ctx"))}
    assert all(found.values()), text[-2000:]
    return {key: float(m.group(1)) for key, m in found.items()}


@pytest.mark.parametrize("ctx, kv_type", [(1000, "f16"), (16384, "f16"), (4096, "q8_0")])
def test_kv_cache_and_mamba_state_are_what_llama_cpp_allocates(tiny_gguf_f32, tiny_model, ctx, kv_type):
    theirs = llama_cpp_buffers(tiny_gguf_f32, ctx, kv_type)
    needs = dict(fit_budget(load_config(tiny_model), Fit(10**10, ctx, kv_type)).needs)
    fit = Fit(10**10, ctx, kv_type)
    assert fit.n_ctx == theirs["n_ctx"]                      # 1000 is padded to 1024 by both
    assert round(needs["KV cache"] / MIB, 2) == theirs["kv"]
    assert round(needs["Mamba state"] / MIB, 2) == theirs["state"]
    # the compute buffer is an estimate: never below llama.cpp's, and within 30% from 4096 tokens on
    assert theirs["compute"] <= needs["compute buffer (estimate)"] / MIB
    assert fit.n_ctx < 4096 or needs["compute buffer (estimate)"] / MIB <= 1.3 * theirs["compute"]


def test_fit_budget_for_nemotron_3_nano_is_the_documented_example():
    budget = fit_budget(load_config(NANO), Fit(24 * 2**30, 32768))
    assert dict(budget.needs) == {"KV cache": 201_326_592, "Mamba state": 49_930_240,
                                  "compute buffer (estimate)": 2_530_738_176, "logits": 524_288,
                                  "margin": 1_052_266_987}
    assert budget.weights == 24 * 2**30 - 3_834_786_283 == 21_935_017_493
    q8 = fit_budget(load_config(NANO), Fit(24 * 2**30, 32768, "q8_0"))
    assert q8.weights > budget.weights   # a q8_0 cache and flash attention leave more for the file


def test_fit_budget_is_the_memory_less_what_llama_cpp_needs(source):  # noqa: F811
    fit = Fit(3 * 10**9, 4096)
    needs = fit_budget(load_config(source.path), fit)
    assert budget_of(source, None, None, fit) == 3 * 10**9 - needs.runtime == needs.weights
    with pytest.raises(NemoqError, match="one of --target-size and --target-bpw, or --fit"):
        budget_of(source, 10**6, None, fit)


def test_fit_chooses_a_file_within_what_is_left(profile, tiny_model, tmp_path):  # noqa: F811
    path, _ = profile
    runtime = fit_budget(load_config(tiny_model), Fit(10**9, 2048)).runtime
    # memory such that the margin's share moves with it: solve memory - runtime(memory) = 4.6 MB
    memory = int((4_600_000 + runtime - 0.02 * 10**9) / 0.98)
    out = tmp_path / "fit.gguf"
    r = quantize_to_target(tiny_model, out, fit=Fit(memory, 2048), profile_path=path)
    assert r.plan.fit is not None and r.plan.budget == r.plan.fit.weights
    assert abs(r.plan.budget - 4_600_000) < 10
    assert out.stat().st_size == r.plan.nbytes <= r.plan.budget


def test_fit_below_what_llama_cpp_needs_is_one_line_and_writes_nothing(profile, tiny_model, tmp_path):  # noqa: F811
    path, _ = profile
    out = tmp_path / "m.gguf"
    r = run_cli("quantize", tiny_model, "-o", out, "--fit", "100M", "--fit-ctx", "4096", "--profile", path)
    assert r.exit_code == 1, r.output
    assert "less than llama.cpp needs beside the weights at a context of 4,096 tokens" in r.output
    assert len(r.output.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_cli_fit_dry_run_prints_the_breakdown(profile, tiny_model, tmp_path):  # noqa: F811
    path, _ = profile
    r = run_cli("quantize", tiny_model, "--fit", "0.6GiB", "--fit-ctx", "2048", "--profile", path, "--dry-run")
    assert r.exit_code == 0, r.output
    for words in ("KV cache", "Mamba state", "compute buffer", "margin", "left for the file", "predicted KLD"):
        assert words in r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--fit", "1G", "--fit-ctx", "512", "--target-size", "4.5M"], "--target-size and --fit are each a budget"),
    (["--target-bpw", "6", "--fit-ctx", "512"], "--fit-ctx and --kv-type go with --fit"),
    (["--fit", "1G"], "--fit needs --fit-ctx"),
    (["--plot", "p.png"], "goes with --target-size, --target-bpw or --fit"),
])
def test_cli_budget_options_exclude_each_other(profile, tiny_model, tmp_path, args, message):  # noqa: F811
    path, _ = profile
    r = run_cli("quantize", tiny_model, "-o", tmp_path / "x.gguf", "--profile", path, *args)
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert list(tmp_path.iterdir()) == []


def test_cli_kv_type_is_checked(profile, tiny_model):  # noqa: F811
    path, _ = profile
    r = run_cli("quantize", tiny_model, "--fit", "1G", "--fit-ctx", "512", "--kv-type", "q4_0", "--profile", path,
                "--dry-run")
    assert r.exit_code == 1 and "unknown --kv-type 'q4_0'; known: f16, q8_0" in r.output


def test_sizes_in_binary_units():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("512mi") == 512 * 2**20 and parse_size("5G") == 5 * 10**9


def test_plot_writes_a_png_and_never_clobbers(profile, tiny_model, tmp_path):  # noqa: F811
    pytest.importorskip("matplotlib")
    path, _ = profile
    png = tmp_path / "plan.png"
    r = run_cli("quantize", tiny_model, "--target-size", "4.5M", "--profile", path, "--dry-run", "--plot", png)
    assert r.exit_code == 0, r.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    r = run_cli("quantize", tiny_model, "--target-size", "4.5M", "--profile", path, "--dry-run", "--plot", png)
    assert r.exit_code == 1 and "already exists" in r.output and png.read_bytes() == data
    r = run_cli("quantize", tiny_model, "--target-size", "5M", "--profile", path, "--dry-run", "--plot", png, "--force")
    assert r.exit_code == 0 and png.read_bytes() != data


def test_plot_points_come_from_the_profile(profile, source):  # noqa: F811
    from nemoq.calib.target import plan_for_budget
    _, prof = profile
    plan = plan_for_budget(prof, source, 4_500_000)
    data = plot_data(prof, source, plan)
    sizes = [b for b, _ in data.frontier]
    klds = [k for _, k in data.frontier]
    assert sizes == sorted(sizes) and klds == sorted(klds, reverse=True)   # more bytes, never more KLD
    assert data.chosen == (plan.nbytes, plan.kld) and plan.nbytes <= data.budget
    assert {"NQ4", "Q8_0"} <= set(data.recipes) and set(data.recipes) | set(data.unpriced) >= {"Q4_K_M", "MXFP4_MOE"}
    for name, (family, size, kld) in data.recipes.items():
        # a recipe is one point of the same trade-off: the allocator at its size does no worse (1% more
        # room: the allocator rounds each tensor's bytes up to its byte unit)
        assert plan_for_budget(prof, source, int(size * 1.01)).kld <= kld * (1 + 1e-6), name


def test_plot_beside_the_file_and_without_matplotlib(profile, tiny_model, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("matplotlib")
    path, _ = profile
    out, png = tmp_path / "m.gguf", tmp_path / "m.png"
    r = run_cli("quantize", tiny_model, "-o", out, "--fit", "0.6GiB", "--fit-ctx", "2048", "--profile", path,
                "--plot", png)
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as if not installed
    other = tmp_path / "other.png"
    r = run_cli("quantize", tiny_model, "-o", tmp_path / "n.gguf", "--target-size", "4.5M", "--profile", path,
                "--plot", other)
    assert r.exit_code == 1 and "nemoq quantize --plot needs matplotlib: pip install 'nemoq[plot]'" in r.output
    assert not other.exists() and not (tmp_path / "n.gguf").exists()
