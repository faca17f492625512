"""`nemoq eval` from the command line: the gate's exit codes, --json and --baseline, usage
errors, and --compare's table and plot."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.test_eval_files import eval_files

RUN = ("--ctx", "128", "--chunks", "4", "--threads", "1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return eval_files(tmp_path_factory)


def nemoq_eval(files, model, *extra):
    return run_cli("eval", model, "--data", files.text, *RUN, *extra)


@pytest.fixture(scope="module")
def q4_json(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("json") / "q4.json"
    result = nemoq_eval(files, files.q4_k_m, "--base", files.f16, "--json", out)
    assert result.exit_code == 0, result.output
    return out


def test_gate_passes_the_base_against_itself(files):
    result = nemoq_eval(files, files.f16, "--base", files.f16, "--max-kld", "0", "--min-top1", "1",
                        "--max-ppl-ratio", "1")
    assert result.exit_code == 0, result.output
    assert "pass" in result.output and "FAIL" not in result.output


def test_gate_fails_a_model_with_a_zeroed_expert(files, q4_json):
    limit = 2 * json.loads(q4_json.read_text())["kld"]["kld_mean"]     # twice what Q4_K_M costs
    result = nemoq_eval(files, files.damaged, "--base", files.f16, "--max-kld", str(limit))
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "gate failed" in result.output


def test_json_has_the_documented_fields(q4_json):
    record = json.loads(q4_json.read_text())
    assert record["format"] == "nemoq.eval" and record["version"] == 1 and record["passed"] is True
    assert record["data"]["scored_tokens"] == 4 * 63 and record["base"]["source"] == "model"
    for key in ("ppl", "ppl_stderr", "ln_ppl", "ln_ppl_stderr", "bits_per_weight", "size_bytes", "fingerprint"):
        assert key in record["model"]
    for key in ("kld_mean", "kld_stderr", "kld_median", "kld_p99", "kld_max", "top1", "ppl_ratio", "ppl_diff"):
        assert key in record["kld"]


def test_baseline_round_trip_passes_the_same_model_and_fails_a_worse_one(files, q4_json, tmp_path):
    out = tmp_path / "again.json"
    same = nemoq_eval(files, files.q4_k_m, "--base", files.f16, "--baseline", q4_json, "--json", out)
    assert same.exit_code == 0, same.output
    record = json.loads(out.read_text())
    assert record["passed"] and {g["name"] for g in record["gates"]} >= {"KLD mean vs baseline"}
    worse = nemoq_eval(files, files.damaged, "--base", files.f16, "--baseline", q4_json)
    assert worse.exit_code == 1, worse.output
    assert "KLD mean vs baseline" in worse.output and "FAIL" in worse.output


def test_baseline_from_other_chunks_is_refused(files, q4_json):
    result = run_cli("eval", files.q4_k_m, "--data", files.text, "--ctx", "128", "--chunks", "3", "--threads", "1",
                     "--base", files.f16, "--baseline", q4_json)
    assert result.exit_code == 1
    assert "other tokens" in result.output


@pytest.mark.parametrize("args", [
    ("--base", "{f16}", "--base-logits", "{f16}"),
    ("--plot", "{out}/p.png"),
    ("--max-kld", "0.1"),
    ("--noise-floor",),
    ("--compare", "--data-less"),
])
def test_usage_errors_exit_2(files, tmp_path, args):
    args = [a.format(f16=files.f16, out=tmp_path) for a in args if a != "--data-less"]
    result = nemoq_eval(files, files.q4_k_m, *args)
    assert result.exit_code == 2, result.output


def test_two_models_without_compare_is_a_usage_error(files):
    assert run_cli("eval", files.q4_k_m, files.f16, "--data", files.text, "--base", files.f16).exit_code == 2


def test_compare_prints_one_table_and_writes_a_plot(files, tmp_path):
    png, out = tmp_path / "kld.png", tmp_path / "compare.json"
    result = run_cli("eval", "--compare", files.q4_k_m, files.damaged, "--base", files.f16, "--data", files.text,
                     *RUN, "--plot", png, "--json", out)
    assert result.exit_code == 0, result.output
    for name in (files.q4_k_m.name, files.damaged.name, "noise floor", "KLD mean"):
        assert name in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(out.read_text())
    q4, damaged = record["models"]
    assert record["format"] == "nemoq.eval.compare" and record["noise_floor"][0]["kld_mean"] == 0.0
    assert 0 < q4["kld"]["kld_mean"] < damaged["kld"]["kld_mean"]
    assert q4["model"]["bits_per_weight"] < damaged["model"]["bits_per_weight"]


def test_saved_base_logits_drive_the_gate_and_say_they_approximate(files, tmp_path):
    saved = tmp_path / "f16.npz"
    first = nemoq_eval(files, files.f16, "--save-logits", saved)
    assert first.exit_code == 0 and saved.is_file(), first.output
    again = nemoq_eval(files, files.f16, "--save-logits", saved)
    assert again.exit_code == 1 and "--force" in again.output      # never clobbered silently
    result = nemoq_eval(files, files.damaged, "--base-logits", saved, "--max-kld", "0.001")
    assert result.exit_code == 1, result.output
    assert "top-256 logits file" in result.output and "FAIL" in result.output
