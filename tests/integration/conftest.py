"""The real vLLM CPU engine on the tiny model, started once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def vllm_engine(tiny_base):
    """vllm.LLM (offline engine) with LoRA enabled; the engine core runs in its own process."""
    from vllm import LLM

    llm = LLM(model=str(tiny_base), enable_lora=True, max_lora_rank=16, max_loras=2, max_model_len=512,
              dtype="float32", kv_cache_memory_bytes=128 * 2**20, seed=0, enforce_eager=True)
    yield llm
    del llm


def vllm_greedy(llm, prompts: list[str], lora=None, max_tokens: int = 12) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), lora_request=lora,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


# ---------------------------------------------------------------- the real server


class Cluster:
    """One running server plus the keys and adapter directories the tests use."""

    def __init__(self, server, keys: dict[str, str], adapters: dict[str, Path], base: Path,
                 grpc_port: int | None = None):
        self.server, self.keys, self.adapters, self.base = server, keys, adapters, base
        self.grpc_port = grpc_port
        self.metrics_port: int | None = None
        """The --metrics-port listener, where the server has one."""

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, tenant: str):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[tenant], max_retries=0, timeout=120)

    def http(self, tenant: str | None = None):
        import httpx

        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def channel(self):
        """A real grpcio channel to the server's --grpc-port."""
        import grpc

        return grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")

    def grpc_auth(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[tenant]}"),)

    def metrics(self) -> str:
        """/metrics as an operator scrapes it on the API port: with an admin key."""
        import httpx

        return httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {self.keys['admin']}"},
                         timeout=10).text

    def upload(self, tenant: str, name: str, adapter: str, *, method: str = "POST"):
        d = self.adapters[adapter]
        files = [("files", (f.name, f.read_bytes())) for f in sorted(d.iterdir()) if f.is_file()]
        with self.http(tenant) as h:
            if method == "POST":
                return h.post("/v1/adapters", data={"name": name}, files=files)
            return h.put(f"/v1/adapters/{name}", files=files)


@pytest.fixture(scope="session")
def adapter_dirs(tiny_base, tmp_path_factory) -> dict:
    from tests.tiny import make_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_base, root / name, seed=seed, r=r)
            for name, seed, r in (("a1", 1, 8), ("a2", 2, 8), ("a3", 3, 8), ("a4", 4, 16))}


def _start_cluster(tiny_base, adapter_dirs, tmp_path_factory, *extra: str, name: str,
                   grpc: bool = False) -> Cluster:
    from tests.integration.server_proc import ServerProcess, create_tenant, free_port

    data = tmp_path_factory.mktemp(f"{name}-data")
    keys = {
        "admin": create_tenant(data, "admin", "--admin"),
        "alice": create_tenant(data, "alice"),
        "bob": create_tenant(data, "bob"),
        "carol": create_tenant(data, "carol", "--rpm", "3"),
        "dave": create_tenant(data, "dave", "--max-adapters", "1", "--max-rank", "8"),
    }
    grpc_port = free_port() if grpc else None
    if grpc:
        extra = (*extra, "--grpc-port", str(grpc_port))
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    server = ServerProcess(tiny_base, data, *extra, log=log).start()
    return Cluster(server, keys, adapter_dirs, tiny_base, grpc_port)


@pytest.fixture(scope="session")
def cluster(tiny_base, adapter_dirs, tmp_path_factory):
    """The session's server: HTTP and gRPC on one engine; the adapters' directory is a --lora-roots."""
    roots = {str(d.parent) for d in adapter_dirs.values()}
    # Every adapter the suite sends traffic to keeps its own metric labels (the default keeps the
    # first 20; the suite uses more, and test_server_metrics asserts on one that comes late).
    from tests.integration.server_proc import free_port

    metrics_port = free_port()
    c = _start_cluster(tiny_base, adapter_dirs, tmp_path_factory, "--max-loras", "2", "--max-cpu-loras", "8",
                       "--metrics-top-adapters", "10000", "--metrics-port", str(metrics_port), "--body-timeout-s", "2",
                       # A vLLM engine argument loraplex passes through unread: compact JSON, so that a
                       # tiny random model's structured outputs end within max_tokens.
                       "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
                       "--shared-prefix-cache-tenants", "pc-shared-1", "--shared-prefix-cache-tenants", "pc-shared-2",
                       *[a for r in sorted(roots) for a in ("--lora-roots", r)], name="main", grpc=True)
    c.metrics_port = metrics_port
    yield c
    c.server.stop()


@pytest.fixture(scope="session")
def grpc_cluster(cluster):
    return cluster
