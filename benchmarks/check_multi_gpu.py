"""Multi-GPU checks of the user-facing commands, run as a user runs them (the CLI, one subprocess each).

On a host with 2+ GPUs:
  heatmap   `sa-analyze heatmap --random-init` on one GPU and with `--device-map auto`, for each (alias, tokens):
            every array of the two reports must agree (the finite entries within --atol, the infinite ones in the
            same places);
  validate  `validate` and `recommend-spans --validate` with `--device-map auto` finish and write their files;
  heal      `accelerate launch --num_processes 2 -m cli.main heal` (data parallel) on a random-weight model folder,
            then the exported folder reloads with `load_shared` and gives the held-out perplexity the heal report
            recorded for the healed model.

Prints one table per part and writes `multi_gpu.json` to --out. Usage (repository root):

    PYTHONPATH=. python benchmarks/check_multi_gpu.py --parts heatmap --out results/
    PYTHONPATH=. python benchmarks/check_multi_gpu.py --parts validate heal --tokenizer DIR --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEATMAP_CASES = (("llama2-7b", 4096), ("llama3.1-8b", 32768))


def run(args: list[str], log: Path) -> tuple[int, float]:
    """Run a command with the repository on PYTHONPATH; (exit code, wall seconds); output goes to `log`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    seconds = time.perf_counter() - started
    print(f"  {'ok ' if code == 0 else 'FAILED'} {seconds:7.1f} s  {' '.join(args[-12:])}", flush=True)
    if code != 0:
        print(log.read_text()[-3000:], flush=True)
    return code, seconds


def sa(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def compare_reports(a: Path, b: Path) -> dict[str, float]:
    """Worst absolute difference of every array of two report.npz files (finite entries; inf pattern must match)."""
    left, right = np.load(a), np.load(b)
    worst = {}
    for name in sorted(left.files):
        x, y = left[name].astype(np.float64), right[name].astype(np.float64)
        assert x.shape == y.shape, name
        finite = np.isfinite(x)
        if not np.array_equal(finite, np.isfinite(y)) or not np.array_equal(x[~finite], y[~finite]):
            worst[name] = float("inf")
            continue
        worst[name] = float(np.abs(x[finite] - y[finite]).max()) if finite.any() else 0.0
    return worst


def part_heatmap(out: Path, atol: float) -> list[dict]:
    rows = []
    for alias, tokens in HEATMAP_CASES:
        folders = {}
        for label, flags in (("one GPU", ["--device", "cuda:0"]), ("device map", ["--device-map", "auto"])):
            folder = out / f"heatmap-{alias}-{tokens}-{'one' if label == 'one GPU' else 'map'}"
            code, seconds = run(sa("heatmap", "--model", alias, "--random-init", "--seq-len", str(tokens), "--n-seqs", "1",
                                   *flags, "--out", str(folder)), out / f"{folder.name}.log")
            folders[label] = folder
            rows.append({"alias": alias, "tokens": tokens, "run": label, "exit": code, "seconds": round(seconds, 1)})
        if all(r["exit"] == 0 for r in rows[-2:]):
            worst = compare_reports(folders["one GPU"] / "report.npz", folders["device map"] / "report.npz")
            placement = json.loads((folders["device map"] / "report.json").read_text())["model"]["device"]
            rows[-1].update(worst=worst, max_diff=max(worst.values()), equal=max(worst.values()) <= atol,
                            placement=placement)
    print(f"\n{'model':<12} {'tokens':>6} {'run':<11} {'exit':>4} {'seconds':>8} {'max |diff|':>11}  equal (atol {atol:g})")
    for r in rows:
        diff = f"{r['max_diff']:.2e}" if "max_diff" in r else ""
        print(f"{r['alias']:<12} {r['tokens']:>6} {r['run']:<11} {r['exit']:>4} {r['seconds']:>8} {diff:>11}  {r.get('equal', '')}")
    return rows


def part_validate(out: Path) -> list[dict]:
    common = ["--model", "llama2-7b", "--random-init", "--device-map", "auto", "--n-seqs", "2", "--seq-len", "512"]
    rows = []
    folder = out / "validate-map"
    code, seconds = run(sa("validate", *common, "--spans", "24-26", "--out", str(folder)), out / "validate-map.log")
    rows.append({"command": "validate --spans 24-26", "exit": code, "seconds": round(seconds, 1),
                 "files": sorted(p.name for p in folder.glob("*")) if folder.exists() else []})
    folder = out / "recommend-map"
    code, seconds = run(sa("recommend-spans", *common, "--budget", "3", "--validate", "--out", str(folder)),
                        out / "recommend-map.log")
    rows.append({"command": "recommend-spans --budget 3 --validate", "exit": code, "seconds": round(seconds, 1),
                 "files": sorted(p.name for p in folder.glob("*")) if folder.exists() else []})
    print(f"\n{'command (llama2-7b random init, --device-map auto)':<52} {'exit':>4} {'seconds':>8}  files")
    for r in rows:
        print(f"{r['command']:<52} {r['exit']:>4} {r['seconds']:>8}  {', '.join(r['files'])}")
    return rows


def random_model_folder(folder: Path, tokenizer_dir: Path) -> Path:
    """SmolLM2-135M's shape with random weights and its tokenizer, saved as an ordinary model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sa_analysis.aliases import require_alias

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**require_alias("smollm2-135m").config))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def part_heal(out: Path, tokenizer_dir: Path) -> list[dict]:
    import torch

    from sa_analysis.data import token_batch
    from sa_analysis.heal import perplexity
    from sa_analysis.shared_model import load_shared

    base = random_model_folder(out / "random-135m", tokenizer_dir)
    folder = out / "heal-ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
              "--mixed_precision", "no", "-m", "cli.main"]
    code, seconds = run([*launch, "heal", "--model", str(base), "--spans", "24-26", "--steps", "20", "--batch-size", "4",
                         "--seq-len", "128", "--n-seqs", "4", "--data", str(ROOT / "tests/data/heal_alpaca.jsonl"),
                         "--out", str(folder)], out / "heal-ddp.log")
    row = {"command": "accelerate launch --num_processes 2 heal (LoRA, 20 steps)", "exit": code, "seconds": round(seconds, 1)}
    if code == 0:
        report = json.loads((folder / "heal_report.json").read_text())
        loaded = load_shared(folder / "healed-model", device="cuda:0", dtype=report["run"].get("dtype", "bfloat16"))
        batch = token_batch(loaded.tokenizer, split="heldout", n_seqs=report["eval"]["n_seqs"],
                            seq_len=report["eval"]["seq_len"])
        with torch.no_grad():
            reloaded = perplexity(loaded.model, batch.input_ids.to("cuda:0"))
        row.update(processes=report["run"].get("world_size"), losses=[report["losses"][0], report["losses"][-1]],
                   healed=report["perplexity"]["healed"], reloaded=reloaded,
                   reload_rel_diff=abs(reloaded / report["perplexity"]["healed"] - 1))
    print(f"\n{row['command']}: exit {row['exit']}, {row['seconds']} s")
    if code == 0:
        print(f"  processes {row['processes']}, loss {row['losses'][0]:.4f} -> {row['losses'][1]:.4f}, healed perplexity "
              f"{row['healed']:.4f}, reloaded export {row['reloaded']:.4f} (relative difference {row['reload_rel_diff']:.1e})")
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["heatmap", "validate", "heal"], choices=["heatmap", "validate", "heal"])
    parser.add_argument("--out", type=Path, default=Path("multi-gpu-out"))
    parser.add_argument("--atol", type=float, default=1e-3)
    parser.add_argument("--tokenizer", type=Path, help="A folder with the default model's tokenizer files (heal part).")
    args = parser.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}", flush=True)
    results = {"gpus": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name(0)}
    if "heatmap" in args.parts:
        results["heatmap"] = part_heatmap(args.out, args.atol)
    if "validate" in args.parts:
        results["validate"] = part_validate(args.out)
    if "heal" in args.parts:
        results["heal"] = part_heal(args.out, args.tokenizer)
    (args.out / "multi_gpu.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
