"""python -m server: serve, or manage tenants.

    python -m server [--base DIR] [--port 8000] [--max-loras 4] ...   # serve (flags: --help)
    python -m server tenants create NAME [--admin] [--max-adapters N] [--max-rank R] [--rpm N]
                                         [--max-concurrency N] [--max-inflight-tokens N]
    python -m server tenants list
    python -m server tenants revoke NAME

Every serve flag also reads from LORAPLEX_<FLAG> and from a TOML --config file.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Annotated

import typer

tenants_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                          help="Create, list and revoke tenants and their API keys.")
DataDir = Annotated[str | None, typer.Option(help="Server data directory (default: as the server's --data-dir).")]


def _db(data_dir: str | None):
    from server.config import Settings
    from server.runtime import open_db

    settings = Settings(**({"data_dir": data_dir} if data_dir else {}))
    return open_db(settings)


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
           data_dir: DataDir = None) -> None:
    """Create a tenant and print its API key. The key is shown once; only its hash is stored."""
    from server.errors import LoraplexError
    from server.tenants.store import Quotas, Role, TenantStore

    try:
        key = TenantStore(_db(data_dir)).create(
            name, Role.ADMIN if admin else Role.TENANT,
            Quotas(max_adapters=max_adapters, max_rank=max_rank, requests_per_minute=rpm,
                   max_concurrent_requests=max_concurrency, max_inflight_tokens=max_inflight_tokens))
    except (LoraplexError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(key)


@tenants_app.command("list")
def list_(data_dir: DataDir = None) -> None:
    """List tenants (never their keys)."""
    from server.tenants.store import TenantStore

    for t in TenantStore(_db(data_dir)).list():
        state = "revoked" if t.revoked else "active"
        typer.echo(f"{t.name:24} {t.role.value:7} {state:8} key {t.key_prefix}...  max_adapters={t.quotas.max_adapters} "
                   f"max_rank={t.quotas.max_rank} rpm={t.quotas.requests_per_minute} "
                   f"concurrency={t.quotas.max_concurrent_requests} inflight_tokens={t.quotas.max_inflight_tokens}")


@tenants_app.command("revoke")
def revoke(name: str, data_dir: DataDir = None) -> None:
    """Revoke a tenant's key: it stops authenticating at once."""
    from server.errors import LoraplexError
    from server.tenants.store import TenantStore

    try:
        TenantStore(_db(data_dir)).revoke(name)
    except LoraplexError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"revoked {name}")


def serve(argv: list[str]) -> None:
    from pydantic import ValidationError
    from pydantic_settings import CliApp, SettingsError

    from server.config import Settings
    from server.runtime import serve as run

    try:
        settings = CliApp.run(Settings, cli_args=argv)
    except ValidationError as e:
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            flag = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-") + ": " if err["loc"] else ""
            print(f"error: {flag}{msg}", file=sys.stderr)
        raise SystemExit(2)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    from server.engine.vllm_engine import EngineConfigError
    from trainer.base import BaseModelError

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
    else:
        serve(argv[1:] if argv[:1] == ["serve"] else argv)


if __name__ == "__main__":
    main()
