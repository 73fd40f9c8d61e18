"""Regenerate every figure of the README from the default model (SmolLM2-135M), through the library only.

    python figures/make_figures.py                 # about 4 minutes on 2 CPU cores; a GPU is not needed
    python figures/make_figures.py --reuse         # redraw from the reports saved by an earlier run (seconds)

Writes into figures/ (PNG, kept small) and keeps the measured artefacts (reports, plan search) in --work
(default sa-output/figures/), where `sa-analyze compare --report ...` or `heatmap --report ...` can redraw them.

Figures:
    attention_maps.png   single heads' attention matrices (log scale), first calibration sequence
    heatmaps.png         layer x layer flat cosine and KL(m ‖ a), head mean
    isotropy.png         isotropy curves, head structure, block influence, entropy per layer
    head_grid.png        one layer x layer cosine heatmap per head
    head_alignment.png   heads of the adjacent pair whose heads are most permuted, Hungarian matching boxed
    head_families.png    every (layer, head) clustered by how alike they attend (a seaborn clustermap)
    plan.png             the recommended plan (recommend-spans' defaults: measured damage, 25 % of the layers)
                         over the KL heatmap
    quality_vs_shared.png  measured perplexity change vs layers shared for every plan search_plans tried, and
                         each plan's predicted damage against the same plan measured whole
    (damage_calibration.png comes from benchmarks/damage_calibration.py: predicted vs measured held-out perplexity)
    compare.png          the SA paper's figure: random init vs trained vs trained with weights rounded to int4
    compare_adjacent.png adjacent-layer similarity of the same three checkpoints
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sa_analysis import planner, plots, validate
from sa_analysis.search import PlanSearch, search_plans
from sa_analysis.damage.measure import plan_from_damage
from sa_analysis.capture import AttentionMaps, capture_attention
from sa_analysis.data import token_batch
from sa_analysis.loading import load_model
from sa_analysis.pipeline import TextSpec, analyse
from sa_analysis.planner.families import head_families
from sa_analysis.plots import plot_plan_over_heatmap
from sa_analysis.report import AttentionReport

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
# single heads shown in attention_maps.png: (layer, head)
MAP_HEADS = ((0, 0), (2, 1), (4, 3), (11, 6))  # broad, previous token, attention sink, current token
MAP_TOKENS = 96
CHECKPOINTS = ("random init", "trained", "trained, int4 weights")
SEARCH_BUDGETS = (1, 2, 3, 4, 6, 8, 10, 12)  # layers shared: the whole curve, past the tolerance
PNG_DPI = 150  # README figures: modest resolution keeps every PNG well under 300 KB


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def save(fig, name: str, out: Path) -> Path:
    """Write a library figure as a PNG at the README's resolution."""
    path = out / f"{name}.png"
    fig.savefig(path, format="png", dpi=PNG_DPI, bbox_inches="tight", pad_inches=0.03)
    say(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return path


def round_weights_int4(model: torch.nn.Module) -> None:
    """Round every decoder linear weight to symmetric int4 per output channel (and back to float): a stand-in for a
    post-training quantisation, to compare the same model before and after it."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight
                scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7.0
                w.copy_((w / scale).round().clamp(-8, 7) * scale)


def measure(args, work: Path):
    """Reports of the three checkpoints (same token ids), the plan search, and single heads' maps."""
    loaded = load_model(MODEL, device=args.device, dtype="float32")
    calibration = token_batch(loaded.tokenizer, n_seqs=args.n_seqs, seq_len=args.seq_len)
    heldout = token_batch(loaded.tokenizer, split="heldout", n_seqs=args.n_seqs, seq_len=args.seq_len)

    say(f"trained model: {calibration.n_seqs} x {calibration.seq_len} tokens")
    report = analyse(loaded, calibration)
    report.save(work / "trained" / "report")

    maps = AttentionMaps(layers=sorted({layer for layer, _ in MAP_HEADS}))
    with torch.no_grad(), capture_attention(loaded.model, maps):
        loaded.model(calibration.input_ids[:1, :MAP_TOKENS].to(loaded.model.device))
    torch.save({f"{layer}/{head}": maps.probs(layer)[0, head].cpu() for layer, head in MAP_HEADS}, work / "maps.pt")

    say("the recommended plan: measured output damage, recommend-spans' default budget")
    recommended = plan_from_damage(loaded, report, TextSpec(seq_len=args.seq_len).damage_batch(loaded), progress=say).plan
    recommended.save(work / "plan.json")

    say("plan search (damage of each layer, then candidate plans measured whole), measured quality")
    search = search_plans(loaded, report, calibration, heldout, budgets=SEARCH_BUDGETS,
                                   stop_early=False, tolerance=args.tolerance, progress=say)
    search.save(work / "search.json")

    say("the same model with int4-rounded weights")
    round_weights_int4(loaded.model)
    analyse(loaded, calibration).save(work / "int4" / "report")
    del loaded

    say("random init (same architecture, same token ids)")
    untrained = load_model(MODEL, device=args.device, dtype="float32", random_init=True)
    analyse(untrained, calibration).save(work / "random-init" / "report")


def draw(work: Path, out: Path) -> list[Path]:
    report = AttentionReport.load(work / "trained" / "report.json")
    maps = torch.load(work / "maps.pt")
    search = PlanSearch.load(work / "search.json")
    paths = []

    titles = [f"layer {layer}, head {head}" for layer, head in MAP_HEADS]
    fig = plots.plot_attention_maps([maps[f"{l}/{h}"] for l, h in MAP_HEADS], titles,
                                    suptitle=f"{report.model_name}: single heads, first {MAP_TOKENS} tokens of a calibration sequence")
    paths.append(save(fig, "attention_maps", out))
    paths.append(save(plots.plot_heatmaps(report, ["cosine_flat", "kl"]), "heatmaps", out))
    paths.append(save(plots.plot_isotropy_curve(report, "cosine_flat"), "isotropy", out))
    paths.append(save(plots.plot_head_grid(report, "cosine_flat"), "head_grid", out))
    pair = plots.most_misaligned_pair(report, "cosine_flat")
    paths.append(save(plots.plot_head_alignment(report, pair, pair + 1, "cosine_flat"), "head_alignment", out))

    families = head_families(report, "cosine_flat")
    paths.append(plots.plot_head_families(families, out / "head_families.png"))
    plan = planner.SharePlan.load(work / "plan.json")  # recommend-spans' defaults: 25 % of the layers, measured damage
    fig = plot_plan_over_heatmap(report, plan, "kl")
    paths.append(save(fig, "plan", out))

    quality = out / "quality_vs_shared.png"
    plots.plot_search(search, quality)
    say(f"wrote {quality} ({quality.stat().st_size // 1024} KB)")
    paths.append(quality)

    reports = [AttentionReport.load(work / name / "report.json") for name in ("random-init", "trained", "int4")]
    paths.append(save(plots.plot_compare_heatmaps(reports, CHECKPOINTS, "cosine_flat"), "compare", out))
    paths.append(save(plots.plot_compare_isotropy(reports, CHECKPOINTS, "cosine_flat"), "compare_adjacent", out))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where the PNGs go (default: figures/)")
    parser.add_argument("--work", type=Path, default=Path("sa-output/figures"), help="reports and search results")
    parser.add_argument("--reuse", action="store_true", help="redraw from the reports in --work, without the model")
    parser.add_argument("--n-seqs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tolerance", type=float, default=validate.DEFAULT_TOLERANCE)
    parser.add_argument("--device", default="cpu", help="cpu (default, reproducible float32) or cuda")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not args.reuse:
        measure(args, args.work)
    draw(args.work, args.out)
    say(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
