"""What the command modules share: the output options, progress hooks and the `.scale` notice."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator

from nemoq.convert.mapping import llama_cpp_build_for


@dataclass(frozen=True)
class Output:
    """Where a command writes its GGUF file."""
    path: Path | None
    force: bool = False          # replace an existing file
    split_max_size: int = 0      # bytes per split file (llama.cpp's gguf-split naming); 0: one file


# (label, total bytes) -> context giving advance(n bytes): a progress bar the caller draws
ByteProgress = Callable[[str, int], ContextManager[Callable[[int], None]]]
# label -> context giving (on_start(sequences, steps), on_progress(forward.Progress)): the layer walks
LayerProgress = Callable[[str], ContextManager[tuple[Callable, Callable]]]


@contextmanager
def no_byte_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


@contextmanager
def no_layer_progress(label: str) -> Iterator[tuple[Callable, Callable]]:
    yield (lambda sequences, steps: None), (lambda progress: None)


@dataclass(frozen=True)
class ScaleNotice:
    """A file that carries `.scale` / `.input_scale` companions, and the llama.cpp build that loads them."""
    count: int
    build: int
    planned: bool = False    # a --dry-run plan, not a written file


def scale_notice(tensor_names: Iterable[str], planned: bool = False) -> ScaleNotice | None:
    names = [n for n in tensor_names if n.endswith((".scale", ".input_scale"))]
    build = llama_cpp_build_for(names)
    return ScaleNotice(len(names), build, planned) if build else None
