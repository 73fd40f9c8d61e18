"""What measured damage costs on a GPU: one measurement from layer a against a whole forward, and a whole
`recommend-spans`-style plan (`plan_from_damage`), on a random-weight model of a real shape (timing only: random
weights give no meaningful damage). CUDA events, warm-up, medians.

    PYTHONPATH=. python benchmarks/bench_damage.py --model llama3.1-8b --seq-len 1024 --budget 8 --out damage_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sa_analysis.data import token_batch
from sa_analysis.loading import load_model
from sa_analysis.pipeline import TextSpec, analyse
from sa_analysis.damage.measure import plan_from_damage
from sa_analysis.damage.prefix import PrefixRun


def timed(work, repeats: int = 5, warmup: int = 2) -> float:
    """Median milliseconds of `work()` (CUDA events on a GPU, wall clock elsewhere)."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            clock = time.perf_counter()
            work()
            times.append(1000 * (time.perf_counter() - clock))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3.1-8b")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    loaded = load_model(args.model, random_init=True)
    model, n_layers = loaded.model, loaded.info.n_layers
    batch = TextSpec(seq_len=args.seq_len).damage_batch(loaded)
    ids = batch.input_ids.to(model.device)
    with torch.inference_mode():
        forward = timed(lambda: model(input_ids=ids, use_cache=False).logits[:, -1].sum().item())
    record = timed(lambda: PrefixRun.record(model, batch), repeats=3)
    run = PrefixRun.record(model, batch)
    rows = [("whole forward (logits at every position)", forward, 1.0)]
    rows.append(("PrefixRun.record (forward + inputs + baseline)", record, record / forward))
    for anchor in (0, n_layers // 2, n_layers - 2):
        ms = timed(lambda: run.damage({anchor + 1: anchor}))
        rows.append((f"one measurement, follower {anchor + 1} reads {anchor}", ms, ms / forward))
    report = analyse(loaded, token_batch(loaded.tokenizer, split="calibration", n_seqs=2, seq_len=args.seq_len,
                                         vocab_size=loaded.info.vocab_size))
    clock = time.perf_counter()
    found = plan_from_damage(loaded, report, run, budget=args.budget)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    plan_seconds = time.perf_counter() - clock
    measurements = len(found.table.pairs) + len(found.checked)
    print(f"{loaded.info.name} (random weights), {batch.n_seqs} x {batch.seq_len} tokens, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print("| step | ms | / whole forward |")
    print("|---|---|---|")
    for name, ms, ratio in rows:
        print(f"| {name} | {ms:.1f} | {ratio:.2f} |")
    print(f"plan_from_damage, budget {args.budget}: {measurements} measurements in {plan_seconds:.1f} s "
          f"({1000 * plan_seconds / measurements / forward:.2f} whole forwards each)")
    result = {"model": loaded.info.name, "seq_len": batch.seq_len, "n_seqs": batch.n_seqs, "rows": rows,
              "plan_seconds": plan_seconds, "measurements": measurements, "budget": args.budget,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
