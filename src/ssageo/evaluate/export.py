"""``ssageo export``: one encoder of a checkpoint as a self-contained ONNX or TorchScript file.

The exported graph takes what an image decoder gives, ``pixels``: (B, H, W, 3) uint8 RGB at the
recorded input size, any batch size B, and returns ``descriptors``: (B, D) float32 L2-normalised
descriptors. The channel move and the model's mean/std normalisation are inside the graph, so a
deployment only resizes images to (H, W) (``cv2.INTER_LINEAR_EXACT``, as training did).

What the file is, and which model it came from, travels with it as one JSON record
(:data:`ssageo.evaluate.deploy.METADATA_KEY`): in the ONNX file's ``metadata_props``, in the
TorchScript archive as the extra file ``ssageo.json``. :mod:`ssageo.evaluate.deploy` reads it.

ONNX goes through ``torch.onnx.export(..., dynamo=False)``: the TorchScript-based exporter needs
no extra package (the dynamo one needs ``onnxscript``) and handles every timm backbone we tried.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssageo import __version__
from ssageo.config import ConfigError
from ssageo.evaluate.deploy import (
    EXPORT_FORMAT,
    INPUT_NAME,
    INSTALL_HINT,
    METADATA_KEY,
    OUTPUT_NAME,
    TORCHSCRIPT_EXTRA,
    is_onnx_export,
    onnx_session,
)
from ssageo.evaluate.index import index_metadata, load_checkpoint
from ssageo.io import DataError, atomic_write

FORMATS = ("onnx", "torchscript")
VIEWS = ("query", "reference")
TOLERANCE = 1e-4  # max |exported - PyTorch| per descriptor component, checked before renaming
ONNX_OPSET = 17


class PixelEncoder(nn.Module):
    """uint8 (B, H, W, 3) RGB pixels -> the model's (B, D) descriptors of one view.

    The normalisation is ``to_tensor``'s (``x * 1/(255 std) - mean/std``), so the exported graph
    and the PyTorch pipeline see the same numbers.
    """

    def __init__(self, model: nn.Module, view: str) -> None:
        super().__init__()
        self.model, self.view = model, view
        norm = model.data_config()
        std = torch.tensor(norm["std"], dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("offset", -mean / std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = pixels.permute(0, 3, 1, 2).float() * self.scale + self.offset
        return self.model.embed(x, view=self.view)


def export_metadata(checkpoint: Path, config: dict, weights_sha256: str, view: str, fmt: str,
                    dim: int, model: nn.Module) -> dict:
    """The JSON record an exported file carries: input, output, model identity and origin."""
    height, width = (int(v) for v in config["data"][f"{view}_size"])
    norm = model.data_config()
    # the identity an index records (model hash, weights hash, sizes, checkpoint, time)
    identity = index_metadata(checkpoint, config, weights_sha256, dim, 0, "")
    for key in ("count", "source"):
        del identity[key]
    return {
        **identity,
        "format": EXPORT_FORMAT,
        "version": 1,
        "kind": fmt,
        "view": view,
        "input": {"name": INPUT_NAME, "shape": ["batch", height, width, 3], "dtype": "uint8",
                  "channels": "RGB", "resize": "cv2.INTER_LINEAR_EXACT"},
        "input_size": [height, width],
        "output": {"name": OUTPUT_NAME, "shape": ["batch", dim], "dtype": "float32",
                   "normalised": "L2"},
        "normalisation": {"mean": list(norm["mean"]), "std": list(norm["std"])},
    }


def is_export_file(path: Path) -> bool:
    """True for a file written by ``ssageo export`` (ONNX or TorchScript); loads no weights."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                extra = [n for n in names if n.endswith(f"/extra/{TORCHSCRIPT_EXTRA}")]
                return bool(extra) and json.loads(archive.read(extra[0])).get(
                    "format") == EXPORT_FORMAT
        except (OSError, zipfile.BadZipFile, ValueError, AttributeError):
            return False
    return is_onnx_export(path)


def _onnx_bytes(encoder: PixelEncoder, example: torch.Tensor, metadata: dict) -> bytes:
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    proto.producer_name, proto.producer_version = "ssageo", __version__
    return proto.SerializeToString()


def _run_exported(path: Path, fmt: str, pixels: np.ndarray) -> np.ndarray:
    """Descriptors of ``pixels`` from the file just written, by the runtime a user would use."""
    if fmt == "onnx":
        return onnx_session(path).run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit: still supported
        return torch.jit.load(str(path), map_location="cpu")(torch.from_numpy(pixels)).numpy()


def export_encoder(checkpoint: str | Path, fmt: str, view: str, out: str | Path) -> dict:
    """Write ``checkpoint``'s ``view`` encoder to ``out`` as ``fmt`` (onnx | torchscript).

    The file is written under a temporary name, run on a batch of another size than the one
    traced (the batch dimension must really be dynamic) and compared with PyTorch's descriptors;
    only when they agree to :data:`TOLERANCE` is it renamed to ``out``. Returns its metadata
    with ``max_abs_diff`` added.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if view not in VIEWS:
        raise ConfigError(f"--view must be one of {', '.join(VIEWS)}, got {view!r}")
    if fmt == "onnx":  # a missing onnx/onnxruntime is said before any work
        onnx_session(None)
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise ConfigError(f"--format onnx needs the onnx package ({INSTALL_HINT})") from None
    checkpoint, out = Path(checkpoint), Path(out)
    model, config, weights_sha256 = load_checkpoint(checkpoint, "cpu")
    encoder = PixelEncoder(model.eval(), view).eval()
    height, width = (int(v) for v in config["data"][f"{view}_size"])
    rng = np.random.default_rng(0)
    example = torch.from_numpy(rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8))
    check = rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = encoder(torch.from_numpy(check)).numpy()
    metadata = export_metadata(checkpoint, config, weights_sha256, view, fmt,
                               int(expected.shape[1]), model)
    found: dict = {}

    def write(tmp: Path) -> None:
        if fmt == "onnx":
            with torch.no_grad():
                tmp.write_bytes(_onnx_bytes(encoder, example, metadata))
        else:
            with torch.no_grad(), warnings.catch_warnings():
                # tracer notes on shape-dependent python code; torch.jit's deprecation notice
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(encoder, example)
                torch.jit.save(traced, str(tmp),
                               _extra_files={TORCHSCRIPT_EXTRA: json.dumps(metadata)})
        got = _run_exported(tmp, fmt, check)
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else np.inf
        if not diff <= TOLERANCE:
            raise DataError(
                f"{out}: the exported {fmt} model disagrees with PyTorch (max difference "
                f"{diff:.3g} > {TOLERANCE:g}, output {got.shape} vs {expected.shape}); not written")
        found["max_abs_diff"] = diff

    atomic_write(out, write)
    return {**metadata, **found}
