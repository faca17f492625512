"""`pip install nemoq` without extras: convert, quantize and info run without torch, llama.cpp
and the other optional modules; calibrate and eval say in one line which extra they need."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nemoq.commands.extras import EXTRAS, PACKAGE_OF

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = sorted({m for modules in EXTRAS.values() for m in modules} | {"transformers", "matplotlib"})

# Runs the CLI with every optional module unimportable, and reports which ones were asked for.
BLOCKED_RUN = """
import sys
blocked, asked = set(sys.argv[1].split(",")), []
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            asked.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
from nemoq.cli import app
try:
    app(sys.argv[2:], prog_name="nemoq")
finally:
    print("asked for:", sorted(set(asked)), file=sys.stderr)
"""


def run_light(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, ",".join(OPTIONAL), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def asked_for(done: subprocess.CompletedProcess) -> str:
    return re.search(r"asked for: (.*)", done.stderr).group(1)


def test_convert_and_quantize_need_no_optional_module(tmp_path, tiny_model, random_hub):
    runs = [
        ("convert", tiny_model, "-o", tmp_path / "f16.gguf", "--outtype", "f16"),     # BF16 -> F16 cast
        ("convert", random_hub, "-o", tmp_path / "bf16.gguf", "--outtype", "bf16"),   # F32 -> BF16 cast
        ("convert", tiny_model, "-o", tmp_path / "q8.gguf", "--outtype", "q8_0"),
        ("quantize", tiny_model, "-o", tmp_path / "q4km.gguf", "--recipe", "Q4_K_M"),
        ("quantize", tmp_path / "f16.gguf", "-o", tmp_path / "nvfp4.gguf", "--recipe", "NVFP4"),
        ("quantize", tiny_model, "--recipe", "NQ4", "--dry-run"),
        ("info", tmp_path / "q4km.gguf", "--max-tensors", "3"),
    ]
    for args in runs:
        done = run_light(*args)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        assert asked_for(done) == "[]", args
    assert all((tmp_path / name).stat().st_size > 0 for name in ("f16.gguf", "bf16.gguf", "q8.gguf", "q4km.gguf",
                                                                   "nvfp4.gguf"))


@pytest.mark.parametrize("args,line", [
    (("calibrate", "{model}", "-o", "{tmp}/imatrix.gguf"), "nemoq calibrate needs torch: pip install 'nemoq[calib]'"),
    (("quantize", "{model}", "-o", "{tmp}/q.gguf", "--calibrate"),
     "nemoq quantize --calibrate needs torch: pip install 'nemoq[calib]'"),
    (("eval", "{model}/model.gguf", "--data", "{tmp}/text.txt"),
     "nemoq eval needs llama-cpp-python: pip install 'nemoq[eval]'"),
])
def test_commands_that_need_an_extra_say_which_in_one_line(tmp_path, tiny_model, args, line):
    done = run_light(*(a.format(model=tiny_model, tmp=tmp_path) for a in args))
    assert done.returncode == 1
    said = [s for s in done.stderr.splitlines() if not s.startswith("asked for:")]
    assert said == [f"error: {line}"]
    assert not list(tmp_path.iterdir())


def test_extras_in_pyproject_bring_the_modules_the_commands_check():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    core, extras = names(project["dependencies"]), project["optional-dependencies"]
    assert not core & {"torch", "llama-cpp-python", "transformers", "tokenizers", "jinja2", "matplotlib"}
    for extra, modules in EXTRAS.items():
        assert {PACKAGE_OF.get(m, m) for m in modules} <= names(extras[extra]), extra
    assert extras["all"] == ["nemoq[calib,eval,plot]"]
