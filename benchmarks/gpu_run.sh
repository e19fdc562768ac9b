#!/usr/bin/env bash
# The GPU runs of benchmarks/README.md, one step per device call (each well under
# 10 minutes), on a host staged as ../shared/gpu/README.md explains (vLLM 0.25.1):
#
#   . /root/kit/env.sh && bash benchmarks/gpu_run.sh setup              # 8B base + adapters, ~2 min
#   . /root/kit/env.sh && bash benchmarks/gpu_run.sh bf16 loraplex      # ~7 min
#   . /root/kit/env.sh && bash benchmarks/gpu_run.sh bf16 vllm          # ~7 min
#   . /root/kit/env.sh && bash benchmarks/gpu_run.sh bf16 base peft     # ~5 min
#   . /root/kit/env.sh && bash benchmarks/gpu_run.sh bf16 loraplex-ray  # one Ray Serve replica; needs
#       ray[serve]==2.60.0 staged too (../shared/gpu/pack.sh -s fix 'ray[serve]==2.60.0')
#   . /root/kit/env.sh && bash benchmarks/gpu_run.sh bnb4 loraplex      # bitsandbytes 4-bit
#   . /root/kit/env.sh && bash benchmarks/gpu_run.sh bnb4 vllm
#   . /root/kit/env.sh && bash benchmarks/gpu_run.sh mixed loraplex vllm   # ~3 min each, no setup needed
#   . /root/kit/env.sh && bash benchmarks/gpu_run.sh corpus                # ~2 min
#   . /root/kit/env.sh && bash benchmarks/gpu_run.sh many SYSTEM [bnb4]    # ~5-8 min each, after setup
#   . /root/kit/env.sh && bash benchmarks/gpu_run.sh tune                  # LoRA kernel configs, 1-4 min
#   . /root/kit/env.sh && KERNELS=DIR bash benchmarks/gpu_run.sh many SYSTEM   # with tuned LoRA kernels
#
# `many` is issue 22's run (benchmarks/many_adapters.py): 1, 32 and 1000 adapters under power-law
# (alpha=1) and uniform popularity, one system per call: vllm-documented (raw vLLM, its documented
# --max-loras 32 --max-cpu-loras 256), loraplex (the slots, host tier and graphs loraplex runs
# with), vllm-same-slots (raw vLLM given those same options), loraplex-documented (loraplex on
# vLLM's documented flags). Then, here: python benchmarks/many_adapters.py many-*.json --out DIR.
#
# `tune` searches vLLM's LoRA shrink/expand kernel block sizes for this card and the 8B shape
# (benchmarks/lora_kernels.py) and writes them to $BENCH_WORK/lora-kernels in the format of vLLM's
# VLLM_TUNED_CONFIG_FOLDER; KERNELS=DIR hands such a folder to the engine of a `many` run (tag -tuned),
# KERNELS=off runs on vLLM's default kernels (tag -untuned). LAUNCH=worklist has loraplex launch them
# over the adapters' token blocks (--lora-kernel-launch worklist; tag -worklist), not as vLLM does. Without KERNELS, loraplex takes its
# shipped configs (server/engine/configs) and vllm-same-slots is given the same folder. MANY_ADAPTERS="1 1000" and
# POPULARITY=alpha shorten a `many` run. loraplex sizes its host tier from host memory (its default);
# CPU_LORAS=N and CACHE_GIB=G name one instead, and size vllm-same-slots' (512 adapters, 48 GiB by default).
#
# `mixed` and `corpus` are the engine-safety checks on this vLLM line: base and adapter requests
# mixed under LoRA slot churn, each compared with its own model's answer (benchmarks/mixed_traffic.py;
# vLLM's CPU kernels gave base requests another adapter's weights, so a vLLM upgrade must not
# bring that here unseen), and the corpus of adapters vLLM refuses (benchmarks/refused_corpus.py).
#
# Every step adds its rows to $BENCH_WORK/results/<config>/compare.json and copies
# that, the plot, and the logs of this step to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
W=${BENCH_WORK:-/root/bench}
M=$W/llama8b
OUT=${OUT:-$W/out}
mkdir -p "$OUT" "$W"
step=$1
shift

common=(
  --base "$M" --adapters 1 32 256 1000 --one-server --alpha 1
  --distinct-weights 64 --cold 16 --pool "$W/adapters"
  --duration "${BENCH_DURATION:-45}" --concurrency 128 --processes 8 --input-len 256 --output-len 128
  --max-model-len 2048 --max-loras 32 --max-cpu-loras 256 --adapter-cache-bytes $((24 << 30))
  --kv-cache-bytes $((16 << 30)) --peft-adapters 1 32 --peft-max-loaded 32
)

case $step in
  setup)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import vllm, bitsandbytes, fastapi, uvicorn, openai, pydantic_settings, typer, grpc, pynvml, \
prometheus_client, psutil, filelock, matplotlib, httpx, peft, multipart; print('imports ok, vllm', vllm.__version__)"
    # The tree runs uninstalled here; register loraplex's vLLM plugin (server.engine.vllm_patches)
    # as installing the package would, so the engine processes loraplex starts load it.
    python3 - <<'PY'
import site, sys
from pathlib import Path
from server.engine import vllm_patches
if not vllm_patches.plugin_installed():
    d = Path(next((p for p in sys.path if p.endswith("/root/site")), site.getsitepackages()[0])) / "loraplex_vllm_plugin-0.dist-info"
    d.mkdir(exist_ok=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: loraplex-vllm-plugin\nVersion: 0\n")
    (d / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{vllm_patches.PLUGIN} = {vllm_patches.__name__}:apply\n")
print("loraplex vLLM plugin registered:", vllm_patches.plugin_installed())
PY
    python3 benchmarks/models.py base --shape llama-3.1-8b --out "$M"
    python3 benchmarks/models.py adapters --base "$M" --n 1000 --distinct 64 --out "$W/adapters"
    python3 benchmarks/models.py adapters --base "$M" --n 16 --distinct 64 --prefix cold --out "$W/adapters"
    df -h "$W" | tail -1
    python3 benchmarks/pinned_alloc.py "$W/adapters/a0/adapter_model.safetensors" --n 16
    ;;
  bf16 | bnb4)
    quant=()
    [ "$step" = bnb4 ] && quant=(--quantization bitsandbytes)
    touch "$W/.mark"
    timeout "${BENCH_TIMEOUT:-560}" python3 benchmarks/compare.py "${common[@]}" "${quant[@]}" --systems "$@" \
      --append --work "$W/$step" --out "$W/results/$step" 2>&1 | grep -v "kernels-community" | tee "$OUT/$step-$1.log"
    cp "$W/results/$step"/* "$OUT/" 2>/dev/null
    for f in "$W/$step"/logs/*.log; do
      [ "$f" -nt "$W/.mark" ] && { head -c 150000 "$f"; echo "[...]"; tail -c 250000 "$f"; } > "$OUT/server-$(basename "$f")"
    done
    nvidia-smi --query-gpu=memory.used --format=csv
    ;;
  many)  # many SYSTEM [bnb4]
    which=$1
    quant=()
    [ "${2:-}" = bnb4 ] && quant=(--quantization bitsandbytes)
    slots=(--max-loras 128 --engine-extra=--specialize-active-lora)
    host=(--max-cpu-loras "${CPU_LORAS:-512}" --adapter-cache-bytes $((${CACHE_GIB:-48} << 30)))
    documented=(--max-loras 32 --max-cpu-loras 256 --adapter-cache-bytes $((24 << 30)))
    case $which in
      vllm-documented) sys=(--systems vllm "${documented[@]}") ;;
      loraplex)  # its own host tier (from host memory) unless CPU_LORAS/CACHE_GIB name one
        [ -z "${CPU_LORAS:-}${CACHE_GIB:-}" ] && host=(--max-cpu-loras 0 --adapter-cache-bytes 0)
        sys=(--systems loraplex "${slots[@]}" "${host[@]}") ;;
      vllm-same-slots)  # and the LoRA kernel configs loraplex hands its engine
        sys=(--systems vllm "${slots[@]}" "${host[@]}")
        [ -z "${KERNELS:-}" ] && export VLLM_TUNED_CONFIG_FOLDER=$PWD/server/engine/configs ;;
      loraplex-documented) sys=(--systems loraplex "${documented[@]}") ;;
      *) echo "many: vllm-documented | loraplex | vllm-same-slots | loraplex-documented" >&2; exit 2 ;;
    esac
    tag=$which${2:+-$2}
    case ${KERNELS:-} in
      "") ;;
      off) export LORAPLEX_LORA_KERNEL_CONFIGS=off; unset VLLM_TUNED_CONFIG_FOLDER; tag=$tag-untuned ;;
      *) export VLLM_TUNED_CONFIG_FOLDER=$KERNELS; tag=$tag-tuned ;;
    esac
    [ "${LAUNCH:-}" = worklist ] && { export LORAPLEX_LORA_KERNEL_LAUNCH=worklist; tag=$tag-worklist; }
    touch "$W/.mark"
    timeout -k 10 "${BENCH_TIMEOUT:-570}" python3 benchmarks/compare.py --base "$M" --adapters ${MANY_ADAPTERS:-1 32 1000} \
      --one-server --alpha 1 --popularity ${POPULARITY:-alpha uniform} --distinct-weights 64 --pool "$W/adapters" \
      --duration "${BENCH_DURATION:-30}" --concurrency 128 --processes 8 --input-len 256 --output-len 128 \
      --max-model-len 2048 --kv-cache-bytes $((16 << 30)) "${sys[@]}" "${quant[@]}" --label "$which" \
      --work "$W/many-$tag" --out "$W/results/many-$tag" 2>&1 | grep -v "kernels-community" | tee "$OUT/many-$tag.log"
    cp "$W/results/many-$tag/compare.json" "$OUT/many-$tag.json" 2>/dev/null
    cp "$W/results/many-$tag/partial.jsonl" "$OUT/many-$tag-partial.jsonl" 2>/dev/null
    for f in "$W/many-$tag"/logs/*.log; do
      [ "$f" -nt "$W/.mark" ] && { head -c 100000 "$f"; echo "[...]"; tail -c 200000 "$f"; } > "$OUT/server-$tag.log"
    done
    nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null
    nvidia-smi --query-gpu=memory.used --format=csv
    ;;
  tune)
    timeout 420 python3 benchmarks/lora_kernels.py --shape llama-3.1-8b --rank 16 --max-loras 128 \
      --budget-s "${TUNE_BUDGET:-240}" --out "$W/lora-kernels" 2>&1 | grep -v "kernels-community" | tee "$OUT/tune.log"
    mkdir -p "$OUT/lora-kernels" && cp "$W/lora-kernels"/* "$OUT/lora-kernels/"
    ;;
  mixed)  # mixed SYSTEM...: loraplex and/or vllm
    for system in "$@"; do
      timeout 280 python3 benchmarks/mixed_traffic.py --system "$system" --device cuda --reference solo \
        --duration "${BENCH_DURATION:-60}" --clients 64 --work "$W/mixed" --out "$OUT/mixed_traffic-$system.json" \
        2>&1 | grep -v "kernels-community" > "$OUT/mixed_traffic-$system.log"
      tail -n 1 "$OUT/mixed_traffic-$system.log"
    done
    ;;
  corpus)
    timeout 400 python3 benchmarks/refused_corpus.py --device cuda --work "$W/corpus" --out "$OUT/refused_corpus.json" \
      2>&1 | grep -v "kernels-community" > "$OUT/refused_corpus.log"
    tail -n 1 "$OUT/refused_corpus.log"
    ;;
  *)
    echo "usage: gpu_run.sh setup | tune | many SYSTEM [bnb4] | mixed SYSTEM... | corpus | {bf16|bnb4} SYSTEM..." >&2
    exit 2
    ;;
esac
