"""Server settings: one typed model, read from flags, environment and a config file.

Precedence (highest first): command-line flags (``--max-loras 8``), environment
(``LORAPLEX_MAX_LORAS=8``), a TOML file (``--config server.toml`` or
``LORAPLEX_CONFIG``), then the defaults below, which start on a 2-core, 24 GiB
CPU host. Each field's docstring is its ``--help``.

**vLLM's names.** Every engine option loraplex sets has vLLM's flag name: the
canonical one where loraplex had none (``--max-num-seqs``), and vLLM's is
accepted as an alias where loraplex's came first (``--model`` for ``--base``,
``--served-model-name`` for ``--served-name``, ``--kv-cache-memory-bytes`` for
``--kv-cache-bytes``; ``server.__main__`` renames them).
Any other flag is one of vLLM's engine arguments: ``server.__main__`` hands it to
vLLM's own parser, which checks it, and the engine gets it unchanged
(:attr:`Settings.engine_args`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (BaseSettings, CliSuppress, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

from server.adapters.compat import VLLM_RANKS


def _default_data_dir() -> Path:
    root = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(root) / "loraplex"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="forbid", cli_kebab_case=True,
                                      cli_prog_name="python -m server", cli_implicit_flags=True,
                                      use_attribute_docstrings=True)

    config: Path | None = None
    """TOML file with any of these settings (flags and environment override it)."""

    # ---------------------------------------------------------------- the base and the engine
    base: str = "smollm2-135m"
    """Base model: 'smollm2-135m' (bundled) or a local Hugging Face model directory (vLLM: --model)."""
    served_name: str | None = None
    """Name clients use for the base in `model=` (vLLM: --served-model-name); default: the base's name."""
    quantization: str | None = None
    """vLLM quantization method for the base (e.g. bitsandbytes, fp8); must be one the installed vLLM offers."""
    dtype: str = "auto"
    """Weights/activations dtype passed to vLLM (auto, bfloat16, float16, float32)."""
    max_model_len: int = Field(2048, ge=16)
    """Context length (prompt + completion tokens)."""
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    """GPU: fraction of device memory vLLM may use. Ignored on CPU (see --kv-cache-memory-bytes)."""
    kv_cache_bytes: int | None = Field(None, ge=1 << 20)
    """KV cache size in bytes (vLLM: --kv-cache-memory-bytes). Default on CPU: 1 GiB; on GPU: from
    --gpu-memory-utilization."""
    kv_cache_dtype: str = "auto"
    """KV cache dtype (auto, fp8, fp8_e4m3, fp8_e5m2 ...): fp8 halves KV memory on GPUs that have it."""
    max_num_seqs: int | None = Field(None, ge=1)
    """Sequences in one engine step (vLLM's default for an OpenAI server on this device if unset)."""
    max_num_batched_tokens: int | None = Field(None, ge=1)
    """Tokens in one engine step (vLLM's default for an OpenAI server on this device if unset)."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (per adapter version: a replaced adapter never
    reuses the old one's). Each tenant's cache is its own (see --shared-prefix-cache-tenants)."""
    shared_prefix_cache_tenants: list[str] = Field(default_factory=list)
    """Tenants whose base-model prompts share one prefix cache, as on raw vLLM, where only a client's
    cache_salt separates requests. Every other tenant's cache is its own: otherwise a tenant could
    time whether another one recently sent a given prefix."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine shards the base across."""
    enforce_eager: bool = False
    """Disable CUDA graphs / compilation (faster start, slower decode)."""
    seed: int = 0
    """The engine's random seed (a request's own `seed` overrides it for that request)."""
    engine_restarts: int = Field(3, ge=0)
    """How many times a dead vLLM engine is restarted in process; after that the server exits with
    status 3 so that its supervisor restarts it."""
    engine_args: Annotated[dict[str, Any], CliSuppress] = Field(default_factory=dict)
    """Any other vLLM engine argument, as vLLM's parser read it from the command line."""

    # ---------------------------------------------------------------- adapters
    max_loras: int = Field(4, ge=1)
    """Adapters in one batch (vLLM's GPU LoRA slots)."""
    max_cpu_loras: int | None = Field(None, ge=1)
    """Adapters kept loaded in the engine's host-memory tier; default: as many as --adapter-cache-bytes
    holds of small (16 MiB) adapters, at most 4096 and at least max(64, --max-loras)."""
    max_lora_rank: int = 64
    """Largest adapter rank served; vLLM sizes every LoRA slot for it (memory grows linearly)."""
    fully_sharded_loras: bool = False
    """With --tensor-parallel-size > 1: shard the LoRA computation too (faster for high ranks or long inputs)."""
    lora_kernel_configs: str = "auto"
    """Block sizes of vLLM's LoRA kernels on GPU: auto (VLLM_TUNED_CONFIG_FOLDER if set, else loraplex's
    tuned configs for this card if it ships them, for models without MoE layers), off (vLLM's
    defaults), or a folder that benchmarks/lora_kernels.py wrote. Tuned, a batch over many
    distinct adapters steps faster."""
    lora_kernel_launch: Literal["worklist", "vllm"] = "vllm"
    """How vLLM's LoRA kernels are launched on GPU: vllm (vLLM's grid: every token block of the batch
    for every active adapter) or worklist (one block per adapter's token block in the batch, so a
    batch over many adapters launches a fraction of the blocks; checked against vLLM's launch on
    the engine's GPU at start, and vLLM's is kept if they differ). vllm stays the default until the
    work list is timed on a GPU (benchmarks/README.md)."""
    lora_modules: list[str] = Field(default_factory=list)
    """Adapters to register at start, as vLLM takes them: name=path, or JSON {"name": ..., "path": ...}.
    They belong to --lora-modules-tenant; a name already registered with the same files is kept."""
    lora_modules_tenant: str = "default"
    """The tenant --lora-modules are registered for (create it first: python -m server tenants create NAME)."""
    lora_roots: list[Path] = Field(default_factory=list)
    """Server-side directories admins may load adapters from via /v1/load_lora_adapter."""
    adapter_cache_bytes: int | None = Field(None, ge=1)
    """Byte budget of adapters held in the engine's host tier (LRU; pinned adapters never evicted).
    Default: half the host memory available at start (within a container's limit), shared with the
    servers of the host's other GPUs. An adapter in the tier starts without a load on the engine thread."""
    max_pins_per_tenant: int = Field(4, ge=0)
    """Adapters one tenant may pin (admins: any number); one more is a 429 naming `pin`."""
    max_pinned_share: float = Field(0.5, ge=0.0, le=1.0)
    """Share of the host tier (--max-cpu-loras and --adapter-cache-bytes) that pinned adapters together
    may hold before a tenant's pin is refused (admins' pins count; an admin may pin past it), so
    that other tenants' cold adapters always find room."""
    adapter_queue_timeout_s: float = Field(30.0, ge=0.0)
    """How long a request for a cold adapter waits for room while every loaded adapter is busy (503 after)."""
    max_upload_bytes: int = Field(2 << 30, ge=1 << 10)
    """Largest adapter upload (all files, or the archive and what it unpacks to); larger is a 413."""
    max_uploads: int = Field(4, ge=1)
    """Uploads this server stages at once; one more is a 429 (Retry-After)."""
    max_uploads_per_tenant: int = Field(2, ge=1)
    """Uploads one tenant may have in flight on this server (admins: up to --max-uploads)."""
    staging_reserve_bytes: int = Field(256 << 20, ge=0)
    """Disk space under --data-dir that uploads leave free: each upload in flight reserves twice
    --max-upload-bytes (an archive and what it unpacks to), and one that would leave less than this
    free is a 503, so that staging never fills the disk the registry writes to."""
    adapter_gc_grace_s: float = Field(60.0, ge=0.0)
    """How long a deleted or replaced adapter's files stay on disk after it is released, for requests
    that resolved it just before; then they are reclaimed."""

    # ---------------------------------------------------------------- tools
    enable_auto_tool_choice: bool = False
    """Let the model decide when to call a tool (tool_choice "auto"); needs --tool-call-parser."""
    tool_call_parser: str | None = None
    """vLLM's parser for the model's tool-call syntax (hermes, llama3_json, mistral, pythonic ...)."""

    # ---------------------------------------------------------------- requests
    max_request_bytes: int = Field(8 << 20, ge=1 << 10)
    """Largest JSON request body (completions, chat, management calls); larger is a 413. Read
    whole, after the key is checked, before the route runs."""
    max_request_values: int = Field(1 << 18, ge=1 << 15)
    """Most JSON values in one request body (each number, string, array, object and key is one);
    more is a 400 naming ``body``. Each is work done holding Python's GIL, some of it in one C call
    that no other thread interrupts (pydantic validating a list of ints, freeing it): a million token
    ids fit in 8 MiB and stall every tenant for up to 100 ms. The default holds a 128k-token context
    of ids, or 64 prompts of 4,096 ids; a 64 KiB body cannot hold more than the least allowed."""
    max_prompt_chars: int | None = Field(None, ge=1)
    """Longest prompt (or sum of chat message contents) in characters, refused before it is tokenized;
    default 64 x --max-model-len."""
    max_prompts: int = Field(64, ge=1)
    """Most prompts in one completions request (a list of prompts). Each prompt runs as one engine
    request and counts as one against the tenant's --max-concurrency; more is a 400 naming
    `prompt`, refused before any prompt is tokenized."""
    body_timeout_s: float = Field(10.0, gt=0.0)
    """A request body that stalls this long between chunks (or a JSON body not complete after this
    long) is a 408, so a client that claims a large body and sends a little holds nothing."""
    shutdown_grace_s: float = Field(30.0, ge=0.0)
    """On SIGTERM: how long requests in flight may run on (new ones get 503) before they are ended
    with a final error; HTTP and gRPC drain together."""

    replicas: int | None = Field(None, ge=1, le=64)
    """Run N engine replicas on a local Ray Serve cluster (server/cluster) behind one HTTP front on
    --host/--port, instead of one engine in this process. Past one host: serve run deploy/ray/serve.yaml."""
    replica_max_ongoing_requests: int | None = Field(None, ge=1)
    """Ray Serve: requests one engine replica takes at once before Ray sends an adapter's requests to
    a replica that has not loaded it yet (spill-over); default 2 x --max-num-seqs (256)."""

    # ---------------------------------------------------------------- listeners and state
    host: str = "127.0.0.1"
    """Address the HTTP (and gRPC) listeners bind."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port: the OpenAI API, adapter management, health."""
    grpc_port: int | None = Field(None, ge=0, le=65535)
    """gRPC port (0: pick a free one); unset: no gRPC server."""
    grpc_max_concurrent_rpcs: int = Field(1024, ge=1)
    """gRPC calls (streams) the gRPC front runs at once; one more is RESOURCE_EXHAUSTED."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """A separate listener that serves only /metrics, without a key, for Prometheus on a private
    network. On the API port /metrics needs an admin key (its labels name tenants and adapters)."""
    metrics_host: str | None = None
    """Address of the metrics listener; default: --host."""
    ssl_certfile: Path | None = None
    """PEM certificate (chain) for HTTPS on --port (and the metrics listener); with --ssl-keyfile."""
    ssl_keyfile: Path | None = None
    """PEM private key for --ssl-certfile."""
    grpc_ssl_certfile: Path | None = None
    """PEM certificate for TLS on --grpc-port; default: --ssl-certfile."""
    grpc_ssl_keyfile: Path | None = None
    """PEM private key for --grpc-ssl-certfile; default: --ssl-keyfile."""
    data_dir: Path = Field(default_factory=_default_data_dir)
    """This server's own files: the SQLite registry and the adapter store unless the two URLs below
    move them, the local cache of a remote store's blobs, and uploads being staged."""
    registry_url: str | None = None
    """The registry database shared by several servers: postgresql://user:password@host/db
    (default: SQLite in --data-dir)."""
    store_url: str | None = None
    """The adapter store shared by several servers: s3://bucket/prefix, credentials and endpoint from the
    AWS_* environment (default: a directory in --data-dir)."""
    rate_limit_url: str | None = None
    """Where requests per minute are counted for every server: redis://host:port (default: in this
    process, so each server counts its own)."""
    blob_cache_bytes: int = Field(20 << 30, ge=1 << 20)
    """With --store-url: bytes of blobs this server keeps on local disk for vLLM to load (LRU)."""
    metrics_top_adapters: int = Field(20, ge=0)
    """Per-adapter metric labels are kept for this many busiest adapters; the rest are 'other'."""

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v not in VLLM_RANKS:
            raise ValueError(f"must be one of {', '.join(map(str, VLLM_RANKS))} (vLLM accepts no other), got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        for cert, key in (("ssl_certfile", "ssl_keyfile"), ("grpc_ssl_certfile", "grpc_ssl_keyfile")):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ValueError(f"--{cert.replace('_', '-')} and --{key.replace('_', '-')} go together")
            for name in (cert, key):
                if (path := getattr(self, name)) is not None and not path.is_file():
                    raise ValueError(f"--{name.replace('_', '-')} {path} is not a readable file")
        if self.grpc_ssl_certfile is None:
            self.grpc_ssl_certfile, self.grpc_ssl_keyfile = self.ssl_certfile, self.ssl_keyfile
        # Sized from this machine when not given, and not counted as set (``model_fields_set``): a
        # Ray replica sizes its own on its own node.
        from server.adapters import residency

        if self.adapter_cache_bytes is None:
            self.__dict__["adapter_cache_bytes"] = residency.default_host_tier_bytes(
                residency.available_host_memory(), self.tensor_parallel_size, residency.gpus_on_host())
        if self.max_cpu_loras is None:
            self.__dict__["max_cpu_loras"] = residency.default_max_cpu_loras(self.adapter_cache_bytes, self.max_loras)
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"--max-cpu-loras ({self.max_cpu_loras}) must be >= --max-loras ({self.max_loras})")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (as in vLLM)")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (CLI values are passed as init kwargs by load()), env, then the TOML file.
        path = init_settings.init_kwargs.get("config") or os.environ.get("LORAPLEX_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)
