"""`appliance bundle ...`: build, verify and sign the offline bundle (docs/packaging.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from appliance.cli._common import console, fail
from appliance.packaging.bundle import (
    BundleError,
    build_bundle,
    compose_images,
    generate_keypair,
    verify_bundle,
)
from appliance.settings import PROJECT_ROOT

app = typer.Typer(no_args_is_help=True)


@app.command("build")
def build(
    out: Annotated[Path, typer.Option("--out", help="The bundle to write (a .tar).")],
    signing_key: Annotated[
        Path, typer.Option("--signing-key", help="Ed25519 private key (PEM) that signs the manifest.")
    ],
    no_images: Annotated[
        bool, typer.Option("--no-images", help="Skip `docker save` (no Docker engine on this host).")
    ] = False,
    image: Annotated[
        list[str] | None,
        typer.Option("--image", help="An image to save (repeatable; default: the compose file's images)."),
    ] = None,
    find_links: Annotated[
        list[Path] | None,
        typer.Option(
            "--find-links", help="Local wheel directories searched first (default: the install wheelhouse)."
        ),
    ] = None,
    package: Annotated[
        list[str] | None,
        typer.Option("--package", help="Only these pins of constraints.txt (repeatable)."),
    ] = None,
    no_index: Annotated[bool, typer.Option("--no-index", help="Take wheels from --find-links only.")] = False,
    no_models: Annotated[bool, typer.Option("--no-models", help="Leave the model files out.")] = False,
    repo: Annotated[Path, typer.Option("--repo", help="The project tree to pack.")] = PROJECT_ROOT,
    models_dir: Annotated[Path | None, typer.Option("--models-dir", help="Default: REPO/models.")] = None,
) -> None:
    """Build a signed bundle: source, wheels, models and images, with SHA256SUMS and its signature."""
    from appliance.inference.build import DEFAULT_WHEELHOUSE

    try:
        images = None if no_images else (image or compose_images(repo))
        result = build_bundle(
            out,
            signing_key,
            repo=repo,
            models_dir=models_dir,
            find_links=find_links if find_links is not None else [DEFAULT_WHEELHOUSE],
            packages=package,
            no_index=no_index,
            images=images,
            with_models=not no_models,
            progress=lambda msg: console.print(f"  [dim]…[/] {msg}", highlight=False, soft_wrap=True),
        )
    except BundleError as exc:
        fail(str(exc))
    console.print(
        f"bundle {result.path}: {result.members} members, {result.size / 2**20:.1f} MiB "
        f"({result.wheels} wheels, models: {', '.join(result.models) or 'none'}, "
        f"images: {', '.join(result.images) or 'none'}) in {result.seconds:.1f}s",
        highlight=False,
        soft_wrap=True,
    )


@app.command("verify")
def verify(
    bundle: Annotated[Path, typer.Argument(help="The bundle (.tar).")],
    pubkey: Annotated[Path, typer.Option("--pubkey", help="The vendor's Ed25519 public key (PEM).")],
) -> None:
    """Check the signature and every member's sha256; exit 1 with one line on any mismatch."""
    try:
        sums = verify_bundle(bundle, pubkey)
    except BundleError as exc:
        fail(str(exc))
    console.print(
        f"bundle {bundle}: signature ok, {len(sums)} members match their sha256",
        highlight=False,
        soft_wrap=True,
    )


@app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Option("--out", help="Private key to create (PEM, 0600); KEY.pub beside it.")],
) -> None:
    """Create a bundle-signing key pair. Keep the private key offline; ship KEY.pub to customers."""
    try:
        public = generate_keypair(out)
    except BundleError as exc:
        fail(str(exc))
    console.print(
        f"signing key {out} (keep it secret), public key {public} (ship it)", highlight=False, soft_wrap=True
    )
