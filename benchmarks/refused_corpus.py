"""A corpus of broken adapters, each judged by raw vLLM and then uploaded to loraplex.

Generated, not hand-picked: every field vLLM's adapter loader reads (``PEFTHelper``'s
dataclass fields on the installed vLLM, and the other line's), each missing, of the
wrong type, or out of range; the PEFT flags vLLM refuses; wrong tensor names, dtypes
and shapes; truncated files and lying safetensors headers.

For each case, raw vLLM decides first: its own server (``vllm serve`` with runtime LoRA
updating and the same LoRA settings) loads it through ``/v1/load_lora_adapter`` (which is
``add_lora``), then serves one request with it if it loaded; a raw engine that dies is
counted and restarted. Then the
case is uploaded to a running loraplex server, and the server's health and a base
request are checked after every upload. The targets: every adapter vLLM refuses is
refused by loraplex (0 registered), no upload is answered with a 5xx, and the engine
never dies (0 deaths). Cases vLLM takes but loraplex refuses are listed with
loraplex's reason (options one vLLM line serves wrong, for instance).

    python benchmarks/refused_corpus.py --out benchmarks/results/cpu/refused_corpus.json
    python benchmarks/refused_corpus.py --device cuda --out /tmp/gpu.json     # the GPU host (vLLM 0.25)

``tests/integration/test_refused_corpus.py`` runs the whole corpus against the session's
server, with the session's offline engine (``vllm.LLM``, the same add_lora) as the judge.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# PEFTHelper's fields on vLLM 0.32 and 0.25 (0.25 reads the first six and the vllm_* two).
HELPER_FIELDS = ("r", "lora_alpha", "target_modules", "bias", "modules_to_save", "use_rslora", "use_dora",
                 "lora_bias", "init_lora_weights", "alora_invocation_tokens", "layer_replication", "use_bdlora",
                 "use_qalora", "rank_pattern", "alpha_pattern", "vllm_lora_scaling_factor",
                 "vllm_max_position_embeddings")
WRONG_VALUES = {"null": None, "true": True, "false": False, "zero": 0, "negative": -8, "float": 1.5, "huge": 10**12,
                "string": "x", "list": ["q_proj"], "empty_list": [], "object": {"q_proj": 8}, "nan": math.nan,
                "infinity": math.inf}
OUT_OF_RANGE = {"r": [0, -8, 12, 1024, 32], "lora_alpha": [0, -16, 1e308], "target_modules": [["embed_tokens"],
                ["lm_head"], "^(", ".*", ["q_proj", "nonexistent"]], "bias": ["all", "lora_only"],
                "init_lora_weights": ["pissa", "loftq", "olora", "corda", "gaussian"],
                "rank_pattern": [{"q_proj": 16}, {"q_proj": 0}, {"q_proj": "8"}],
                "alpha_pattern": [{"q_proj": 64}, {"q_proj": "x"}]}


@dataclass
class Case:
    id: str
    category: str
    files: dict[str, bytes]


@dataclass
class Result:
    id: str
    category: str
    vllm_refused: bool
    vllm_error: str | None
    loraplex_status: int
    loraplex_registered: bool
    loraplex_message: str | None
    engine_alive: bool


@dataclass
class Report:
    vllm: str
    cases: int = 0
    vllm_refused: int = 0
    registered_though_vllm_refused: int = 0
    """Target 0: an adapter vLLM refuses that loraplex registered anyway."""
    engine_deaths: int = 0
    """Target 0: uploads after which the server's engine no longer served."""
    server_errors: int = 0
    """Target 0: uploads answered with a 5xx."""
    registered: int = 0
    registered_that_failed_to_serve: int = 0
    refused_though_vllm_took: list[dict] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- the corpus


def _good() -> tuple[dict, dict]:
    from tests.adapter_files import adapter_config, lora_tensors

    return adapter_config(r=8, targets=("q_proj", "v_proj")), lora_tensors(8, ("q_proj", "v_proj"))


def _files(config: dict | bytes, tensors: dict | None = None, weights: bytes | None = None) -> dict[str, bytes]:
    from tests.adapter_files import safetensors_bytes

    raw = config if isinstance(config, bytes) else json.dumps(config).encode()  # NaN/Infinity allowed, as Python writes
    return {"adapter_config.json": raw,
            "adapter_model.safetensors": weights if weights is not None else safetensors_bytes(tensors)}


def _header(st: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", st[:8])[0]
    return json.loads(st[8:8 + n]), st[8 + n:]


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def cases() -> list[Case]:
    import torch

    from tests.adapter_files import lora_tensors, safetensors_bytes

    config, tensors = _good()
    out = [Case("good", "control", _files(config, tensors))]
    fields = list(HELPER_FIELDS)
    try:  # the installed line's own fields first: the corpus follows vLLM as it changes
        import dataclasses

        from vllm.lora.peft_helper import PEFTHelper

        fields = [f.name for f in dataclasses.fields(PEFTHelper)] + [f for f in HELPER_FIELDS
                                                                     if f not in {f.name for f in dataclasses.fields(PEFTHelper)}]
    except ImportError:
        pass
    for key in fields:
        if key in config:
            out.append(Case(f"{key}:missing", "config field missing",
                            _files({k: v for k, v in config.items() if k != key}, tensors)))
        for label, value in WRONG_VALUES.items():
            out.append(Case(f"{key}:{label}", "config field of the wrong type", _files({**config, key: value}, tensors)))
        for value in OUT_OF_RANGE.get(key, []):
            out.append(Case(f"{key}={json.dumps(value)}", "config field out of range",
                            _files({**config, key: value}, tensors)))
    for key, value in (("use_dora", True), ("lora_bias", True), ("use_qalora", True), ("bias", "all"),
                       ("modules_to_save", ["lm_head"]), ("modules_to_save", ["embed_tokens"]),
                       ("alora_invocation_tokens", [1, 2]), ("layer_replication", [[0, 1]]),
                       ("use_bdlora", {"nblocks": 2}), ("trainable_token_indices", [3]),
                       ("target_parameters", ["mlp.experts.gate_up_proj"]), ("peft_type", "IA3"),
                       ("peft_type", "ADALORA")):
        out.append(Case(f"flag {key}={json.dumps(value)}", "flag vLLM refuses", _files({**config, key: value}, tensors)))
    for label, raw in (("not JSON", b"{r: 8"), ("a JSON list", b"[]"), ("empty", b""), ("binary", b"\x00\xff" * 8)):
        out.append(Case(f"config {label}", "config file", _files(raw, tensors)))

    # tensor names
    prefix = "base_model.model.model.layers.0"
    for label, extra in (
        ("embed_tokens lora", {"base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(8, 512)}),
        ("lm_head lora", {"base_model.model.lm_head.lora_A.weight": torch.randn(8, 128)}),
        ("unknown module", {f"{prefix}.mlp.fc1.lora_A.weight": torch.randn(8, 128),
                            f"{prefix}.mlp.fc1.lora_B.weight": torch.randn(256, 8)}),
        ("not a lora weight", {f"{prefix}.self_attn.q_proj.weight": torch.randn(128, 128)}),
        ("a layer the base lacks", {"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.randn(8, 128),
                                    "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.randn(128, 8)}),
        ("full weight copy", {"base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": torch.randn(128, 128)}),
        ("dora magnitude", {f"{prefix}.self_attn.q_proj.lora_magnitude_vector": torch.randn(128)}),
        ("bias", {f"{prefix}.self_attn.q_proj.lora_B.bias": torch.randn(128)}),
    ):
        out.append(Case(f"tensor: {label}", "tensor names", _files(config, {**tensors, **extra})))
    lone = dict(tensors)
    lone.pop(f"{prefix}.self_attn.v_proj.lora_B.weight")
    out.append(Case("tensor: lora_A without lora_B", "tensor names", _files(config, lone)))
    out.append(Case("tensor: none", "tensor names", _files(config, {})))

    # dtypes
    for dtype in (torch.int8, torch.int32, torch.int64, torch.bool, torch.uint8, torch.float8_e4m3fn, torch.float64,
                  torch.float16, torch.bfloat16):
        cast = {k: v.to(dtype) for k, v in tensors.items()}
        out.append(Case(f"dtype {str(dtype).removeprefix('torch.')}", "tensor dtypes", _files(config, cast)))
    nan = {k: v.clone() for k, v in tensors.items()}
    next(iter(nan.values()))[0, 0] = float("nan")
    out.append(Case("values: NaN", "tensor dtypes", _files(config, nan)))
    inf = {k: v.clone() for k, v in tensors.items()}
    next(iter(inf.values()))[0, 0] = float("inf")
    out.append(Case("values: inf", "tensor dtypes", _files(config, inf)))

    # shapes
    key_a, key_b = f"{prefix}.self_attn.q_proj.lora_A.weight", f"{prefix}.self_attn.q_proj.lora_B.weight"
    for label, change in (
        ("A transposed", {key_a: tensors[key_a].T.contiguous()}),
        ("B transposed", {key_b: tensors[key_b].T.contiguous()}),
        ("rank 16 against r=8", {key_a: torch.randn(16, 128), key_b: torch.randn(128, 16)}),
        ("rank 4 against r=8", {key_a: torch.randn(4, 128), key_b: torch.randn(128, 4)}),
        ("another hidden size", {key_a: torch.randn(8, 256), key_b: torch.randn(256, 8)}),
        ("1-D", {key_a: torch.randn(8 * 128)}),
        ("3-D", {key_a: torch.randn(1, 8, 128)}),
        ("0-D", {key_a: torch.tensor(1.0)}),
        ("empty", {key_a: torch.randn(0, 128), key_b: torch.randn(128, 0)}),
    ):
        out.append(Case(f"shape: {label}", "tensor shapes", _files(config, {**tensors, **change})))
    big = lora_tensors(64, ("q_proj", "v_proj"))
    out.append(Case("rank 64 over --max-lora-rank 16", "tensor shapes",
                    _files({**config, "r": 64, "lora_alpha": 128}, big)))

    # files
    st = safetensors_bytes(tensors)
    header, data = _header(st)
    keys = [k for k in header if k != "__metadata__"]
    lies = {
        "truncated by 100 bytes": st[:-100],
        "truncated to its header": st[:8 + struct.unpack("<Q", st[:8])[0]],
        "empty": b"",
        "8 bytes": st[:8],
        "header length past the end": struct.pack("<Q", 10**9) + st[8:],
        "header not JSON": st[:8] + b"#" * (len(st) - 8),
        "trailing bytes": st + b"\0" * 16,
        "not safetensors": b"PK\x03\x04" + b"\0" * 64,
        "a pickle": b"\x80\x04\x95" + b"\0" * 32,
    }
    def lie(edit) -> bytes:
        h = json.loads(json.dumps(header))
        edit(h)
        return _with_header(h, data)
    lies["offsets overlap"] = lie(lambda h: h[keys[1]].__setitem__("data_offsets", list(h[keys[0]]["data_offsets"])))
    lies["offsets past the data"] = lie(lambda h: h[keys[-1]].__setitem__(
        "data_offsets", [h[keys[-1]]["data_offsets"][0], len(data) + 4096]))
    lies["shape larger than its bytes"] = lie(lambda h: h[keys[0]].__setitem__("shape", [64, 128]))
    lies["shape smaller than its bytes"] = lie(lambda h: h[keys[0]].__setitem__("shape", [1, 128]))
    lies["dtype F16 over F32 bytes"] = lie(lambda h: h[keys[0]].__setitem__("dtype", "F16"))
    lies["unknown dtype"] = lie(lambda h: h[keys[0]].__setitem__("dtype", "Q4"))
    lies["negative offsets"] = lie(lambda h: h[keys[0]].__setitem__("data_offsets", [-8, 0]))
    lies["header a list"] = _with_header([], data)  # type: ignore[arg-type]
    for label, raw in lies.items():
        out.append(Case(f"safetensors: {label}", "truncated or lying files", _files(config, weights=raw)))
    return out


# ---------------------------------------------------------------- judging and uploading


class OfflineJudge:
    """Raw vLLM in this process (``vllm.LLM``): add_lora, then one request with the adapter."""

    def __init__(self, llm):
        self.llm = llm

    def __call__(self, path: Path, lora_id: int, prompt_ids: list[int]) -> tuple[bool, str | None]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        request = LoRARequest(f"case-{lora_id}", lora_id, str(path))
        try:
            ok = self.llm.llm_engine.add_lora(request)
        except Exception as e:  # vLLM's utility-call failure: the loader's message
            return True, str(e).split("method failed: ", 1)[-1][:300]
        if not ok:
            return True, "add_lora returned False"
        try:
            self.llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(max_tokens=2, temperature=0),
                              lora_request=request, use_tqdm=False)
        finally:
            try:
                self.llm.llm_engine.remove_lora(lora_id)
            except Exception:
                pass
        return False, None


class ServerJudge:
    """Raw ``vllm serve`` (vLLM's OpenAI server, runtime LoRA updating on): its own
    /v1/load_lora_adapter, then one request with the adapter. A judge that dies is counted and
    started again."""

    def __init__(self, process):
        self.process = process
        self.deaths = 0

    def __call__(self, path: Path, lora_id: int, prompt_ids: list[int]) -> tuple[bool, str | None]:
        import httpx

        name = f"case-{lora_id}"
        with httpx.Client(base_url=self.process.url, timeout=120) as h:
            r = h.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            if r.status_code != 200:
                return True, r.text[:300]
            try:
                g = h.post("/v1/completions", json={"model": name, "prompt": prompt_ids, "max_tokens": 2,
                                                    "temperature": 0})
                served = g.status_code == 200
            except httpx.HTTPError as e:
                served, g = False, e
            h.post("/v1/unload_lora_adapter", json={"lora_name": name})
            if served:
                return False, None
            if h.get("/health").status_code != 200:  # the adapter killed raw vLLM's engine
                self.deaths += 1
                self.process.stop()
                self.process.start(900)
                return True, "raw vLLM's engine died serving it"
            return True, getattr(g, "text", str(g))[:300]


def run(url: str, key: str, judge, *, work: Path, base_model: str = "tiny", only: set[str] | None = None,
        vllm_version: str = "") -> Report:
    """Judge each case with raw vLLM (``judge(path, lora_id, prompt_ids) -> (refused, why)``), then
    upload it to the loraplex server at ``url``."""
    import httpx

    report = Report(vllm=vllm_version)
    t0 = time.perf_counter()
    all_cases = [c for c in cases() if only is None or c.id in only]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as h:
        for i, case in enumerate(all_cases):
            d = work / f"case-{i}"
            d.mkdir(parents=True)
            for name, data in case.files.items():
                (d / name).write_bytes(data)
            refused, why = judge(d, 10_000 + i, [5, 6, 7, 8])
            name = f"corpus-{i}"
            r = h.post("/v1/adapters", data={"name": name},
                       files=[("files", (n, data)) for n, data in case.files.items()])
            registered = r.status_code == 201
            try:
                message = None if registered else r.json()["error"]["message"]
            except ValueError:
                message = r.text[:300]
            alive = _alive(h, base_model)
            report.cases += 1
            report.vllm_refused += refused
            report.registered += registered
            report.registered_though_vllm_refused += refused and registered
            report.server_errors += r.status_code >= 500
            report.engine_deaths += not alive
            if registered:
                s = h.post("/v1/completions", json={"model": f"{base_model}:{name}", "prompt": [5, 6, 7, 8],
                                                     "max_tokens": 2})
                report.registered_that_failed_to_serve += s.status_code != 200
                h.delete(f"/v1/adapters/{name}")
            elif not refused:
                report.refused_though_vllm_took.append({"id": case.id, "loraplex": message})
            report.results.append(asdict(Result(case.id, case.category, refused, why, r.status_code, registered,
                                                message, alive)))
    report.seconds = time.perf_counter() - t0
    return report


def _alive(h, base_model: str) -> bool:
    try:
        if h.get("/health").status_code != 200:
            return False
        return h.post("/v1/completions", json={"model": base_model, "prompt": [5, 6], "max_tokens": 1}).status_code == 200
    except Exception:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-corpus")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    import shutil

    from benchmarks.mixed_traffic import _vllm_version
    from tests.integration.server_proc import RawProcess, ServerProcess, create_tenant, free_port
    from tests.tiny import make_tiny_llama

    shutil.rmtree(a.work, ignore_errors=True)
    base = make_tiny_llama(a.work / "base")
    engine = ["--max-model-len", "256", "--max-lora-rank", "16", "--max-loras", "2", "--seed", "0"]
    if a.device == "cpu":
        engine += ["--dtype", "float32", "--enforce-eager"]
        kv = {"loraplex": ["--kv-cache-bytes", str(64 << 20)], "vllm": ["--kv-cache-memory-bytes", str(64 << 20)]}
    else:  # the GPU's LoRA kernels run in 16-bit; two tiny engines share the GPU
        engine += ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.2"]
        kv = {"loraplex": [], "vllm": []}
    port = free_port()
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # raw vLLM's own /v1/load_lora_adapter
    raw = RawProcess([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
                      "--served-model-name", "tiny", "--port", str(port), "--enable-lora", *engine, *kv["vllm"]],
                     port, a.work / "vllm.log").start(900)
    data = a.work / "data"
    key = create_tenant(data, "corpus", "--rpm", "100000000", "--max-adapters", "100000")
    server = ServerProcess(base, data, log=a.work / "server.log", engine=(*engine, *kv["loraplex"])).start(900)
    judge = ServerJudge(raw)
    try:
        report = run(server.url, key, judge, work=a.work / "cases", vllm_version=_vllm_version())
    finally:
        server.stop()
        raw.stop()
    result = asdict(report) | {"raw_vllm_engine_deaths": judge.deaths, "host": platform.node(), "device": a.device,
                               "command": " ".join(sys.argv)}
    summary = {k: result[k] for k in ("vllm", "cases", "vllm_refused", "raw_vllm_engine_deaths",
                                      "registered_though_vllm_refused",
                                      "engine_deaths", "server_errors", "registered",
                                      "registered_that_failed_to_serve", "seconds")}
    summary["refused_though_vllm_took"] = len(report.refused_though_vllm_took)
    print(json.dumps(summary))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
