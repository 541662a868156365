"""A model's inference path as a file that other runtimes read: ONNX (onnxruntime, Triton's onnxruntime backend).

The graph is what `LoadedModel.predict` does at one depth k, without early exit: its input is what the service
takes, its output the probabilities the service answers.

- input "input", dynamic batch axis: a number model's rows as float32 of shape (batch, *input_shape), raw (the
  graph normalises them as the service does); a text model's token ids as int64 (batch, max_tokens), as its
  tokenizer makes them (the tokenizer stays outside the graph, which holds it as metadata; a text without a
  token reads as one unknown token inside it, as in the service).
- f_1..f_k -> b_k -> h_k..h_1, then output "probabilities" (batch, classes): h_1's scores made to sum to one.
- metadata_props: "classes" (JSON, by class index), "depth" (k), "components" (the model's full depth),
  "input_kind" ("tensor" or "text"), "input_shape" (JSON), "method", and for a text model "tokenizer" (the model
  directory's tokenizer.json: Hugging Face `tokenizers`' JSON, for `Tokenizer.from_str`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from al.checkpoint import LoadedModel, load_model, read_model_info
from al.data import TEXT
from al.data.text import with_a_token
from al.sequence import TokenEmbedding

FORMATS = {"onnx": ".onnx"}  # format -> the suffix of its file
INPUT, OUTPUT = "input", "probabilities"
CHILD_SECONDS = 600  # the most an export in a child process may take
_one_at_a_time = threading.Lock()  # of a process's exports in children: one child's memory and core at a time


class Exported(NamedTuple):
    content: bytes  # the file
    depth: int  # the depth k of its path
    suffix: str  # of its file's name


class InferencePath(nn.Module):
    """Raw input -> the probabilities the service answers, through f_1..f_k -> b_k -> h_k..h_1."""

    def __init__(self, model: LoadedModel, depth: int):
        super().__init__()
        self.net, self.depth = model.net, depth
        self.encoding = None if model.input_kind == TEXT else model.encoding  # a Normalization; texts: token ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = with_a_token(x) if self.encoding is None else self.encoding.apply(x)
        return self.net.probabilities(self.net(x, self.depth))


def checked_depth(directory: str | os.PathLike, format: str, depth: int | None) -> int:
    """The depth to export the model in `directory` at, read from its config and weights' header (no weights are
    loaded). ValueError names a format or a depth that does not fit; ModelError, an unusable directory."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    components = read_model_info(directory).depth
    if depth is not None and not 1 <= depth <= components:
        raise ValueError(f"depth must be between 1 and {components} for this model, got {depth}")
    return components if depth is None else depth


def export_model(directory: str | os.PathLike, format: str, depth: int | None = None) -> Exported:
    """The model in `directory` at `depth` (default: its full depth, as predict) as a file of `format`, in this
    process (`al export`; a server uses export_in_child)."""
    k = checked_depth(directory, format, depth)
    model = load_model(directory)  # a copy of its own: tracing swaps the parameters of the module it traces
    for module in model.net.modules():
        if isinstance(module, TokenEmbedding):
            module.crop = False  # the graph's shapes may not depend on the data
    return Exported(onnx_bytes(model, k), k, FORMATS[format])


def export_in_child(directory: str | os.PathLike, format: str, depth: int | None = None) -> Exported:
    """export_model in a child process (`al export`), one at a time. While it traces, torch.export switches
    process-wide state (mkldnn, NNPACK and cuDNN off, builtins patched; dynamo is not thread-safe), which a
    server's inference threads must not meet. A format or depth that does not fit is refused before any child
    starts; a child that fails is a RuntimeError with its last words."""
    k = checked_depth(directory, format, depth)
    with _one_at_a_time, tempfile.TemporaryDirectory(prefix="al-export-") as tmp:
        out = Path(tmp) / f"model{FORMATS[format]}"
        command = [sys.executable, "-m", "al.cli", "export", "--model", str(directory), "--format", format,
                   "--depth", str(k), "--out", str(out)]
        child = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_SECONDS)
        if child.returncode != 0:
            raise RuntimeError(f"al export exited with {child.returncode}: {child.stderr.strip()[-2000:]}")
        return Exported(out.read_bytes(), k, FORMATS[format])


def onnx_bytes(model: LoadedModel, depth: int) -> bytes:
    text = model.input_kind == TEXT
    # Two rows: torch.export specialises an axis of size 0 or 1, and the batch axis must stay free.
    example = torch.ones(2, *model.input_shape, dtype=torch.long if text else torch.float32)
    program = torch.onnx.export(InferencePath(model, depth).eval(), (example,), dynamo=True, input_names=[INPUT],
                                output_names=[OUTPUT], verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    proto = program.model_proto
    metadata = {
        "classes": json.dumps(model.classes),
        "depth": str(depth),
        "components": str(model.depth),
        "input_kind": model.input_kind,
        "input_shape": json.dumps(list(model.input_shape)),
        "method": model.config["method"],
        **({"tokenizer": model.encoding.tokenizer.to_str()} if text else {}),
    }
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()
