#!/usr/bin/env bash
# Issue 35 on one GPU: the decode kernels' GPU tests (against float64 and against exact mode, eager and compiled),
# the inference path's CUDA tests, whole-model decode through generate() (unpatched, patched, patched with the kernels
# off), the GQA shape, one layer's decode attention kernel by kernel, eager decode, prefill.
# Usage: benchmarks/decode_kernels_gpu.sh OUT [STAGES]   STAGES: any of tests,patchtests,decode,gqa,micro,profile,eager,prefill
# (default all but profile; about 8 min for tests,decode and 8 for the rest on an H100). Each stage is bounded by `timeout`, writes under OUT.
# DECODE_FLAGS (default --other-path: also the patched model with the kernels off), DECODE_CELLS (default 8x2048,1x32768,
# maxx32768: the largest batch that fits at 32k) and DECODE_TIMEOUT tune the decode stage; MICRO_CELLS, MICRO_SHAPES, MICRO_TIMEOUT and
# MICRO_CONFIGS (launches of the follower kernel, per SM/keys per tile/warps/stages) the micro stage; GQA_CELLS,
# GQA_TIMEOUT, EAGER_CELLS and EAGER_TIMEOUT the gqa and eager stages; TESTS_K picks tests (pytest -k); PROFILE_CELL
# (default 3x32768) and PROFILE_TIMEOUT the profile stage (profile_decode.py: the kernels of a step, unpatched and patched).
# Stage patchtests: the inference path's CUDA tests of tests/test_patch.py (about 100 s).
# On the H100 a 32k cell at the largest batch (3) takes about 240 s without --other-path (128 new tokens from 16k
# context on: bench_decode.new_tokens_for), a compiled 2k or 8k cell 80-120 s (32 x 2k 120 s), an eager 2k cell about
# 60 s with --other-path; the profile stage at 3x32768 about 100 s with 16 new tokens (its per-step totals were then
# noisy, 38.1 and 31.9 ms where bench_decode reads 30.1 and 26.3: now 64; the decode-only kernels read the same).
set -u
out=$1 stages=${2:-tests,patchtests,decode,gqa,micro,eager,prefill}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
has() { [[ ",$stages," == *",$1,"* ]]; }
python3 -c "import torch, transformers, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$out/versions.txt"
if has tests; then
  timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_decode_kernels.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tail -n 15 | tee "$out/tests.txt"
fi
if has patchtests; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider --device cuda tests/test_patch.py -k infer 2>&1 | tail -n 4 | tee -a "$out/tests.txt"
fi
if has decode; then
  timeout ${DECODE_TIMEOUT:-330} python3 benchmarks/bench_decode.py --kinds compiled --cells ${DECODE_CELLS:-8x2048,1x32768,maxx32768} ${DECODE_FLAGS---other-path} --repeats 3 \
    --out "$out/llama2" 2>&1 | tee "$out/decode-llama2.log" | grep -v -i warn | tail -n 12
fi
if has gqa; then
  timeout ${GQA_TIMEOUT:-200} python3 benchmarks/bench_decode.py --model llama3.1-8b --kinds compiled --cells ${GQA_CELLS:-8x2048,1x32768} \
    --repeats 3 --out "$out/llama31" 2>&1 | tee "$out/decode-llama31.log" | grep -v -i warn | tail -n 12
fi
if has micro; then
  timeout ${MICRO_TIMEOUT:-150} python3 benchmarks/micro_decode_attention.py --cells ${MICRO_CELLS:-8x2048,1x32768} --shapes ${MICRO_SHAPES:-32/32,32/8} \
    --programs-per-sm 2,16 --follower-configs "${MICRO_CONFIGS:-}" --out "$out/micro.json" 2>&1 | tee "$out/micro.log" | grep -v -i warn | tail -n 8
fi
if has profile; then
  timeout ${PROFILE_TIMEOUT:-300} python3 benchmarks/profile_decode.py --cell ${PROFILE_CELL:-3x32768} --new-tokens 64 --repeats 1 \
    --out "$out" 2>&1 | tee "$out/profile.log" | grep -v -i warn | tail -n 34
fi
if has eager; then
  timeout ${EAGER_TIMEOUT:-150} python3 benchmarks/bench_decode.py --kinds eager --cells ${EAGER_CELLS:-1x2048,8x2048,32x2048} --other-path --repeats 3 \
    --out "$out/eager" 2>&1 | tee "$out/decode-eager.log" | grep -v -i warn | tail -n 12
fi
if has prefill; then
  timeout 200 python3 benchmarks/bench_patch.py --mode infer --new-tokens 64 --batches 1 --out "$out/patch" 2>&1 \
    | grep -v -i warn | tail -n 20 | tee "$out/patch.txt"
fi
