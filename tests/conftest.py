from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from nemoq.cli import app
from tests.fixtures.checkpoints import to_fused_layout, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "tests" / "data" / "nemotron-tiny"


def run_cli(*args):
    """Run the nemoq CLI in-process; the result has exit_code, output (stdout+stderr), stderr."""
    return CliRunner().invoke(app, [str(a) for a in args])


def convert(src: Path, out: Path, *extra) -> Path:
    result = run_cli("convert", src, "-o", out, *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_model_fused(tmp_path_factory) -> Path:
    return to_fused_layout(TINY_MODEL, tmp_path_factory.mktemp("tiny-fused"))


@pytest.fixture(scope="session")
def tiny_gguf_f32(tmp_path_factory, tiny_model) -> Path:
    return convert(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "--outtype", "f32")


@pytest.fixture(scope="session")
def random_hub(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("random-hub"), layout="hub", dtype="float32")


@pytest.fixture(scope="session")
def random_hub_gguf(tmp_path_factory, random_hub) -> Path:
    return convert(random_hub, tmp_path_factory.mktemp("gguf") / "random-f32.gguf", "--outtype", "f32")


@pytest.fixture
def fresh_checkpoint(tmp_path) -> Path:
    """A float32 hub-layout checkpoint a test may damage."""
    return write_checkpoint(tmp_path / "ckpt", layout="hub", dtype="float32")
