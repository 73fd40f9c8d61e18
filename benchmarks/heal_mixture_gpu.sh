#!/usr/bin/env bash
# Issue 34's mixture measurement on one GPU: the default model's 8-layer plan healed by 1,000 distillation steps on
# a mixture of the documentation and the standard library's code (`--heal-data pydoc_data.topics+python-source`),
# LoRA on q/k/v/o and LoRA on the MLPs too, each judged on the held-out part of each kind (`--other-text`), four runs
# side by side in the background. Usage: benchmarks/heal_mixture_gpu.sh SMOLLM2.gguf WORK
# (2026-12-07, H100: 4 to 5.5 min each, side by side; results in benchmarks/results/2026-12-07-h100-heal-mixture/)
set -u
smol=$1 work=$2
mkdir -p "$work"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
python3 -c "from sa_analysis.loading import load_model as l; l('$smol', device='cpu')" > "$work/warm.log" 2>&1
for other in python-source pydoc_data.topics; do
  for extra in lora lora-mlp; do
    flag=""; [ $extra = lora-mlp ] && flag="--heal-lora-mlp"
    python3 -m cli.main frontier --model "$smol" --budgets 8 --heal-steps 1000 --heal-objective distill \
      --heal-data pydoc_data.topics+python-source --other-text $other $flag --device cuda --dtype float32 \
      --out "$work/mix-$other-$extra" > "$work/mix-$other-$extra.log" 2>&1 &
  done
done
wait
tail -n 4 "$work"/*.log
