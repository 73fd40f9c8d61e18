#!/usr/bin/env bash
# A sweep of wrong inputs on a fresh clone (usage: benchmarks/wrong_inputs.sh CLONE CACHE): exit code, seconds,
# lines of output and whether a traceback showed, per case; the last line lists what is left in the work folder.
cd "$1"
export SA_ANALYSIS_CACHE="$2"
W=/tmp/wrong; rm -rf $W; mkdir -p $W; echo "not json" > $W/bad.json; printf '\x00\x01\x02binary' > $W/bin.txt; : > $W/empty.txt
printf '{"format": "sa-analysis/share-plan", "version": 1, "n_layers": 30, "followers": [24], "head_map": {"24": [0, 1]}}' > $W/badmap.json
touch $W/afile
run() {
  local before after start end out rc
  before=$(find "$1" . -newer /tmp/wrong/afile 2>/dev/null | grep -v "^./.venv\|^./sa-output/smollm2-135m" | sort | md5sum)
  start=$(date +%s.%N); out=$(.venv/bin/sa-analyze "${@:2}" 2>&1); rc=$?; end=$(date +%s.%N)
  local tb=no; echo "$out" | grep -q Traceback && tb=YES
  local lines=$(echo "$out" | grep -c .)
  printf '%-70s rc=%s %5.1fs lines=%s tb=%s | %s\n' "${*:2}" "$rc" "$(echo "$end - $start" | bc)" "$lines" "$tb" "$(echo "$out" | tail -1 | cut -c1-110)"
}
run $W heatmap --model nowhere-model --out $W/o1
run $W heatmap --model ./no/such/dir --out $W/o2
run $W heatmap --model $W/missing.gguf --out $W/o3
run $W heatmap --text $W/bin.txt --out $W/o4
run $W heatmap --text $W/empty.txt --out $W/o5
run $W heatmap --seq-len 100000 --out $W/o6
run $W heatmap --seq-len 1
run $W heatmap --rows lots --out $W/o6b
run $W heatmap --rows 10 --out $W/o6c
run $W heatmap --rows 200 --seq-len 256 --out $W/o6d
run $W recommend-spans --rows 20 --out $W/o6e
run $W heatmap --out $W/afile
run $W heatmap --report $W/bad.json --out $W/o7
run $W heatmap --device cuda:3 --out $W/o8
run $W heatmap --dtype float8 --out $W/o9
run $W heatmap --device-map everywhere --out $W/o10
run $W recommend-spans --report $W/bad.json --out $W/o11
run $W recommend-spans --budget abc --out $W/o12
run $W recommend-spans --budget 2 --max-cost 1 --out $W/o13
run $W recommend-spans --cost euclid --out $W/o14
run $W validate --spans 0-3 --out $W/o15
run $W validate --spans 40-41 --out $W/o16
run $W validate --plan $W/bad.json --out $W/o17
run $W validate --spans 24-26 --mode slow --out $W/o18
run $W validate --spans 24-26 --tasks no_such_task --out $W/o19
run $W heal --spans 24-26 --data $W/missing.jsonl --out $W/o20
run $W heal --out $W/o21
run $W compare --model smollm2-135m --out $W/o22
run $W compare --report $W/bad.json --report $W/bad.json --out $W/o23
run $W recommend-spans --align-heads yes --out $W/o24
run $W validate --plan $W/badmap.json --out $W/o25
run $W validate --spans 24-26 --tasks paskey --out $W/o26
run $W validate --spans 24-26 --tasks passkey@big --out $W/o27
run $W heal --spans 24-26 --full --fsdp --out $W/o28
run $W heal --spans 24-26 --fsdp --out $W/o29
run $W heal --spans 24-26 --full --deepspeed $W/missing.json --out $W/o30
run $W heal --spans 24-26 --report-to mlflow --out $W/o31
run $W heal --spans 24-26 --report-to wandb --out $W/o32
run $W nosuchcommand
ls $W
