"""python -m server: serve, or manage tenants.

    python -m server [--model DIR] [--port 8000] [--max-loras 4] ...  # serve (flags: --help); any other
                                                                      # flag is one of vLLM's engine arguments
    python -m server tenants create NAME [--admin] [--max-adapters N] [--max-rank R] [--rpm N]
                                         [--max-concurrency N] [--max-inflight-tokens N]
    python -m server tenants list
    python -m server tenants revoke NAME
    python -m server registry migrate --to postgresql://... [--store-url s3://...]

Every serve flag also reads from LORAPLEX_<FLAG> and from a TOML --config file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Annotated

import typer

tenants_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                          help="Create, list and revoke tenants and their API keys.")
DataDir = Annotated[str | None, typer.Option(help="Server data directory (default: as the server's --data-dir).")]
RegistryUrl = Annotated[str | None, typer.Option(
    help="The shared registry, postgresql://... (default: as the server's --registry-url, else SQLite in --data-dir).")]


def _db(data_dir: str | None, registry_url: str | None = None):
    from server.config import Settings
    from server.runtime import open_db

    given = {"data_dir": data_dir, "registry_url": registry_url}
    return open_db(Settings(**{k: v for k, v in given.items() if v}))


@tenants_app.command("create")
def create(name: str,
           admin: Annotated[bool, typer.Option(help="Admin role: manage any tenant's adapters, load server paths.")] = False,
           max_adapters: Annotated[int, typer.Option(help="Most adapters this tenant may register.")] = 100,
           max_rank: Annotated[int, typer.Option(help="Highest adapter rank this tenant may upload.")] = 64,
           rpm: Annotated[int, typer.Option(help="Requests per minute before 429.")] = 600,
           max_concurrency: Annotated[int, typer.Option(
               help="Inference requests in flight at once before 429.")] = 64,
           max_inflight_tokens: Annotated[int, typer.Option(
               help="Tokens (max_tokens x n) the tenant's running requests may hold before 429.")] = 262144,
           data_dir: DataDir = None, registry_url: RegistryUrl = None) -> None:
    """Create a tenant and print its API key. The key is shown once; only its hash is stored."""
    from server.errors import LoraplexError
    from server.tenants.store import Quotas, Role, TenantStore

    try:
        key = TenantStore(_db(data_dir, registry_url)).create(
            name, Role.ADMIN if admin else Role.TENANT,
            Quotas(max_adapters=max_adapters, max_rank=max_rank, requests_per_minute=rpm,
                   max_concurrent_requests=max_concurrency, max_inflight_tokens=max_inflight_tokens))
    except (LoraplexError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(key)


@tenants_app.command("list")
def list_(data_dir: DataDir = None, registry_url: RegistryUrl = None) -> None:
    """List tenants (never their keys)."""
    from server.tenants.store import TenantStore

    for t in TenantStore(_db(data_dir, registry_url)).list():
        state = "revoked" if t.revoked else "active"
        typer.echo(f"{t.name:24} {t.role.value:7} {state:8} key {t.key_prefix}...  max_adapters={t.quotas.max_adapters} "
                   f"max_rank={t.quotas.max_rank} rpm={t.quotas.requests_per_minute} "
                   f"concurrency={t.quotas.max_concurrent_requests} inflight_tokens={t.quotas.max_inflight_tokens}")


@tenants_app.command("revoke")
def revoke(name: str, data_dir: DataDir = None, registry_url: RegistryUrl = None) -> None:
    """Revoke a tenant's key: every server sharing the registry refuses it within a second."""
    from server.errors import LoraplexError
    from server.tenants.store import TenantStore

    try:
        TenantStore(_db(data_dir, registry_url)).revoke(name)
    except LoraplexError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"revoked {name}")


VLLM_ALIASES = {"--model": "--base", "--served-model-name": "--served-name",
                "--kv-cache-memory-bytes": "--kv-cache-bytes"}
"""vLLM's names for flags loraplex had first; both work."""


def _is_flag(token: str) -> bool:
    return token.startswith("--") or (token.startswith("-") and len(token) > 1 and not token[1].isdigit()
                                      and token[1] != ".")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(loraplex's flags, the rest -- vLLM's engine arguments). vLLM's aliases are renamed, and
    a list flag given vLLM's way (``--lora-modules a=/x b=/y``) is repeated per value."""
    from server.config import Settings

    ours, lists = {"-h", "--help"}, set()
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ours |= {flag, "--no-" + flag[2:]}
        if str(field.annotation).startswith("list"):
            lists.add(flag)
    mine, rest, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        name, eq, inline = token.partition("=")
        name = VLLM_ALIASES.get(name, name)
        values = []
        i += 1
        while i < len(argv) and not _is_flag(argv[i]):
            values.append(argv[i])
            i += 1
        if name not in ours:
            rest += [token, *values]
        elif name in lists:
            for v in ([inline] if eq else []) + values:
                mine += [name, v]
        else:
            mine += [f"{name}={inline}" if eq else name, *values]
    return mine, rest


registry_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                           help="The registry several servers share.")


@registry_app.callback()
def _registry() -> None:
    """The registry several servers share."""


@registry_app.command("migrate")
def migrate(to: Annotated[str, typer.Option(help="The shared registry to copy into: postgresql://user@host/db.")],
            store_url: Annotated[str | None, typer.Option(
                help="Object storage to copy the blobs into (s3://bucket/prefix); default: they stay in the "
                     "data directory's store.")] = None,
            data_dir: DataDir = None) -> None:
    """Copy a data directory's SQLite registry (tenants, keys, adapters) and its blobs into a shared
    registry and store. Running it again copies nothing."""
    from server.config import Settings
    from server.migrate import migrate as run

    settings = Settings(**({"data_dir": data_dir} if data_dir else {}))
    store = None
    try:
        if store_url:
            from server.adapters.remote import RemoteStore

            store = RemoteStore(store_url, settings.data_dir / "adapters", cache_bytes=settings.blob_cache_bytes)
        copied = run(settings.data_dir, to, store)
    except Exception as e:  # noqa: BLE001 -- a CLI: say what failed, exit 2
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"copied {copied.tenants} tenants, {copied.adapters} adapter versions, {copied.blobs} blobs; "
               f"{len(copied.skipped)} already there")


def serve(argv: list[str]) -> None:
    from pydantic import ValidationError
    from pydantic_settings import CliApp, SettingsError

    from server.config import Settings
    from server.runtime import serve as run

    from server.engine import vllm_patches

    # Mark this process tree as loraplex's before vLLM's parser loads its plugins (a forked engine
    # does not load them again): the patches act only in engines loraplex starts.
    os.environ[vllm_patches.ENV] = "1"
    mine, rest = split_argv(argv)
    if "-h" in mine or "--help" in mine:
        try:
            CliApp.run(Settings, cli_args=["--help"])
        except SystemExit:
            pass
        from server.engine.vllm_engine import engine_help

        print("\nAny other flag is one of vLLM's engine arguments, passed to vLLM as `vllm serve` would pass it:\n")
        print(engine_help())
        return
    from server.engine.vllm_engine import EngineConfigError, parse_engine_args
    from trainer.base import BaseModelError

    try:
        engine_args = parse_engine_args(rest) if rest else {}
        settings = CliApp.run(Settings, cli_args=mine)
        if engine_args:
            settings = settings.model_copy(update={"engine_args": engine_args})
    except ValidationError as e:
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            flag = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-") + ": " if err["loc"] else ""
            print(f"error: {flag}{msg}", file=sys.stderr)
        raise SystemExit(2)
    except (SettingsError, EngineConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if settings.replicas:
        from server.cluster.app import run as run_cluster

        try:
            run_cluster(settings, settings.replicas)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            pass
        return
    try:
        asyncio.run(run(settings))
    except (EngineConfigError, BaseModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        pass


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:]
    if argv[:1] == ["tenants"]:
        tenants_app(argv[1:], prog_name="python -m server tenants")
    elif argv[:1] == ["registry"]:
        registry_app(argv[1:], prog_name="python -m server registry")
    else:
        serve(argv[1:] if argv[:1] == ["serve"] else argv)


if __name__ == "__main__":
    main()
