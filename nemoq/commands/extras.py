"""The optional dependencies a command needs, checked before any work: a missing one is one
line naming it and the extra that installs it ("nemoq calibrate needs torch: pip install
'nemoq[calib]'"). pyproject.toml's [project.optional-dependencies] lists the same."""

from __future__ import annotations

import importlib.util

from nemoq.errors import NemoqError

# extra -> the modules it brings, in the order they are named when missing
EXTRAS = {
    "calib": ("torch", "tokenizers", "jinja2", "threadpoolctl"),   # the layer-streamed forward, tokenizing
    "eval": ("llama_cpp", "jinja2"),                               # llama.cpp runs the GGUF
    "plot": ("matplotlib",),                                       # quantize --plot, eval --plot
}
PACKAGE_OF = {"llama_cpp": "llama-cpp-python"}   # where the module's name is not its package's


def missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):   # blocked: None in sys.modules, or a finder that refuses it
        return True


def require(extra: str, command: str, purpose: str = "") -> None:
    """Raise NemoqError naming the first of the extra's modules that is not installed."""
    for module in EXTRAS[extra]:
        if missing(module):
            raise NemoqError(f"nemoq {command} needs {PACKAGE_OF.get(module, module)}{purpose}: "
                             f"pip install 'nemoq[{extra}]'")


def require_calibration(command: str, src) -> None:
    """The layer-streamed forward's modules; a GGUF source is tokenized by llama.cpp as well."""
    require("calib", command)
    if str(src).endswith(".gguf"):
        require("eval", command, " to read a GGUF file's tokenizer")
