"""``ssageo serve``: a local page that localizes the images a person drops on it."""

from __future__ import annotations

from pathlib import Path

import typer

from ssageo.cli import app


@app.command("serve")
def serve(
    index: Path = typer.Option(..., help="Index file or folder from `ssageo index build`."),
    port: int = typer.Option(7860, min=0, max=65535, help="Port (0: any free one)."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on (0.0.0.0: reachable from other computers)."),
    checkpoint: Path | None = typer.Option(
        None, help="Checkpoint (default: the one the index was built from)."),
    top_k: int = typer.Option(5, min=1, max=50, help="Tiles shown per image (the page's default)."),
    max_upload_mb: float = typer.Option(25.0, min=0.001, help="Largest upload accepted, in MB."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N] | mps"),
    in_memory: bool = typer.Option(
        False, "--in-memory", help="ivfpq: read the re-ranking store into RAM when the page "
        "starts (as `locate --in-memory`)."),
) -> None:
    """Serve a page where a person drops a panorama and sees the best tiles, their scores and
    lat/lon, the BEV prediction and the spot on a plot. Ctrl-C stops it."""
    from ssageo.device import resolve_device
    from ssageo.serve.server import LocateService, make_server

    service = LocateService(index, checkpoint, resolve_device(device, "--device"), top_k,
                            int(max_upload_mb * 1e6), in_memory)
    server = make_server(service, host, port)
    url = f"http://{host}:{server.server_address[1]}/"
    typer.echo(f"serving {index} ({service.count} tiles) on {url} (Ctrl-C stops it)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()
