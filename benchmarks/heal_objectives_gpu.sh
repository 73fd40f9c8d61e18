#!/usr/bin/env bash
# Issue 34's side-by-side measurement on one GPU: the frontier healed by each objective at the same steps, on the
# default model (budgets 1-15, 100 steps; budgets 8 and 10 with 1,000 distillation steps; budget 8 with 1,000 LM
# steps for its KL) and on Qwen2.5-Coder-0.5B (budgets 3, 6, 9, 100 steps). The runs are small and launch-bound,
# so they run side by side, one process each (2 CPU threads each), in the background (setsid), logs and results
# under $WORK. Usage: benchmarks/heal_objectives_gpu.sh SMOLLM2.gguf QWEN.gguf WORK
set -u
smol=$1 qwen=$2 work=$3
mkdir -p "$work"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
common="--device cuda --dtype float32"
# first loads dequantise and cache each GGUF once, before the runs read the cache side by side
python3 -c "from sa_analysis.loading import load_model as l; l('$smol', device='cpu'); l('$qwen', device='cpu')" > "$work/warm.log" 2>&1
run() {  # name, then the frontier's arguments
  local name=$1; shift
  setsid nohup bash -c "python3 -m cli.main frontier $* $common --out $work/$name > $work/$name.log 2>&1; echo EXIT \$? >> $work/$name.log" > /dev/null 2>&1 &
}
run smollm2-lm100 --model "$smol" --budgets 1-15 --heal-steps 100 --heal-objective lm
run smollm2-distill100 --model "$smol" --budgets 1-15 --heal-steps 100 --heal-objective distill
run smollm2-distill1000 --model "$smol" --budgets 8,10 --heal-steps 1000 --heal-objective distill
run smollm2-lm1000 --model "$smol" --budgets 8 --heal-steps 1000 --heal-objective lm --no-control
run qwen05-lm100 --model "$qwen" --budgets 3,6,9 --heal-steps 100 --heal-objective lm
run qwen05-distill100 --model "$qwen" --budgets 3,6,9 --heal-steps 100 --heal-objective distill
echo "started 6 runs under $work"
