"""``ssageo export``: an encoder as an ONNX or TorchScript file for deployment."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ssageo.cli import app
from ssageo.io import check_output


@app.command("export")
def export(
    checkpoint: Path = typer.Option(..., help="Checkpoint folder."),
    out: Path = typer.Option(..., help="File to write (.onnx or .pt)."),
    format: str = typer.Option("onnx", "--format", help="onnx | torchscript"),
    view: str = typer.Option(
        "query", help="query (for `locate --onnx`) | reference (for `index build --onnx`)"),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing exported encoder (nothing else)."),
) -> None:
    """Write one encoder, its input normalisation inside, with a dynamic batch dimension.

    Input: uint8 (B, H, W, 3) RGB pixels at the recorded size; output: (B, D) L2-normalised
    descriptors. The file is checked against PyTorch (1e-4) before it is renamed into place.
    """
    from ssageo.evaluate.export import export_encoder, is_export_file

    check_output(out, "an `ssageo export` file", is_export_file, force)
    record = export_encoder(checkpoint, format, view, out)
    height, width = record["input_size"]
    Console().print(
        f"wrote the {view} encoder ({record['model']['backbone']}, input {height}x{width} RGB "
        f"uint8, D = {record['descriptor_dim']}) as {format} to {out}; max difference to "
        f"PyTorch {record['max_abs_diff']:.2g}", highlight=False)
