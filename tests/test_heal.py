"""Healing: a tiny random Llama heals with Shared Attention in force on small local files (loss decreases), the
response-only mask, gradients into the anchor through the follower, export -> load_shared with identical logits,
resume from a checkpoint, and the user mistakes (no usable rows, a plan for another model, a full fine-tune that
does not fit).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from sa_analysis.compat import attention_implementation
from sa_analysis.errors import UserError
from sa_analysis.heal import (IGNORE_INDEX, HealConfig, alpaca_prompt, check_full_fits, full_finetune_bytes,
                              full_parameters, heal, load_heal_data, lora_targets)
from sa_analysis.loading import LoadedModel, describe
from sa_analysis.patch import SharedAttention, share_attention
from sa_analysis.planner import SharePlan

DATA = Path(__file__).parent / "data"
VOCAB = 128  # tiny_config's vocabulary: the default tokenizer's ids are folded into it
PLAN = {2: 1, 3: 1}  # layers 2 and 3 reuse layer 1's attention
SEQ = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(default_tokenizer):
    return default_tokenizer


@pytest.fixture(scope="module")
def text_data(tokenizer):
    return load_heal_data(DATA / "heal_text.txt", tokenizer, seq_len=SEQ, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def heldout(tokenizer):
    from sa_analysis.data import token_batch

    return token_batch(tokenizer, split="heldout", n_seqs=4, seq_len=SEQ, vocab_size=VOCAB)


def tiny_loaded(seed: int = 0) -> LoadedModel:
    model = tiny_model("llama", dtype=torch.float32, seed=seed)
    return LoadedModel(model, None, describe(model, "tiny-llama", "tiny-llama", "random-init"))


def config(**kwargs) -> HealConfig:
    settings = dict(steps=30, batch_size=4, seq_len=SEQ, lr=1e-2, eval_batch_size=4)
    settings.update(kwargs)
    return HealConfig(**settings)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ----- data --------------------------------------------------------------------------------------------------
def test_alpaca_rows_learn_the_response_only(tokenizer):
    from sa_analysis.data import is_heldout

    data = load_heal_data(DATA / "heal_alpaca.jsonl", tokenizer, seq_len=128, vocab_size=VOCAB)
    import json

    lines = (DATA / "heal_alpaca.jsonl").read_text().splitlines()
    kept = [json.loads(line) for number, line in enumerate(lines, start=1) if not is_heldout(f"heal_alpaca.jsonl#{number}")]
    assert 0 < len(kept) < 14  # the held-out rows are for judging the heal, never trained on
    assert data.kind == "alpaca" and data.n_rows == 14 and len(data) + sum(data.n_skipped.values()) == len(kept)
    usable = [r for r in kept if r.get("instruction") and r.get("output")]
    for row, (ids, labels) in zip(usable, data.examples):
        n_prompt = len(tokenizer(alpaca_prompt(row))["input_ids"])
        response = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert torch.equal(labels[n_prompt:], ids[n_prompt:])
        assert labels[n_prompt:].tolist() == [t % VOCAB for t in response][: 128 - n_prompt]
    lengths = [len(ids) for ids, _ in data.examples]
    short, long = lengths.index(min(lengths)), lengths.index(max(lengths))
    batch = data.collate([data[short], data[long]])  # padded on the right: no loss and no attention there
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"][0].sum() == min(lengths) and (batch["labels"][0, min(lengths):] == IGNORE_INDEX).all()
    # a prompt longer than --seq-len leaves no response: skipped, counted
    cut = load_heal_data(DATA / "heal_alpaca.jsonl", tokenizer, seq_len=40, vocab_size=VOCAB)
    assert cut.n_skipped["prompt_too_long"] > 0 and all(len(ids) <= 40 for ids, _ in cut.examples)


def test_text_windows_and_the_trainers_rows(text_data):
    assert text_data.kind == "text" and all(len(ids) == SEQ for ids, _ in text_data.examples)
    assert all(torch.equal(ids, labels) for ids, labels in text_data.examples)
    rows = [text_data[i] for i in (0, 3)]  # the dataset rows the Trainer draws, and its collator
    batch = text_data.collate(rows)
    assert torch.equal(batch["input_ids"], torch.stack([r["input_ids"] for r in rows]))
    assert batch["attention_mask"].all()
    assert torch.equal(batch["labels"], torch.stack([r["labels"] for r in rows]))


def test_alpaca_json_list_and_text_jsonl(tmp_path, tokenizer):
    import json

    rows = [json.loads(line) for line in (DATA / "heal_alpaca.jsonl").read_text().splitlines()]
    listed = tmp_path / "alpaca_data.json"  # Stanford Alpaca ships one JSON list
    listed.write_text(json.dumps(rows, indent=1))
    assert load_heal_data(listed, tokenizer, seq_len=128).kind == "alpaca"
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"document {i} " * 40}) for i in range(10)))
    data = load_heal_data(texts, tokenizer, seq_len=16)
    assert data.kind == "text" and len(data) > 0 and all(torch.equal(i, l) for i, l in data.examples)


def test_no_usable_rows(tmp_path, tokenizer):
    with pytest.raises(UserError, match="no usable rows"):
        load_heal_data(DATA / "heal_no_rows.jsonl", tokenizer, seq_len=SEQ)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(UserError, match="no usable rows"):
        load_heal_data(empty, tokenizer, seq_len=SEQ)
    with pytest.raises(UserError, match="does not exist"):
        load_heal_data(tmp_path / "missing.jsonl", tokenizer)


# ----- training ----------------------------------------------------------------------------------------------
def test_lora_heal_lowers_the_loss_and_exports_a_model_that_reloads_identically(tmp_path, text_data, heldout):
    from sa_analysis import load_shared
    from sa_analysis.shared_model import load_with_plan

    loaded = tiny_loaded()
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    report = heal(loaded, PLAN, text_data, heldout, config(), out=tmp_path)
    losses = report.losses
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    p = report.evals["held-out"]["perplexity"]
    assert p["patched"] != p["baseline"] and p["healed"] < p["patched"]
    assert "control" not in p and report.control == {"status": "skipped"} and report.gaps("held-out")["closed"] is None
    assert any("recovery is not measured" in note for note in report.notes)
    for name in ("report", "figure", "model"):
        assert Path(report.files[name]).exists()
    assert not (tmp_path / "checkpoints").exists()  # no --save-every: the Trainer's scratch space is not left behind
    # after heal: LoRA merged (plain Linear layers), patch in force, followers' q/k untouched
    assert loaded.share is not None and loaded.share.active
    assert not any(hasattr(m, "lora_A") for m in loaded.model.modules())
    for layer in (2, 3):
        follower = loaded.model.model.layers[layer].self_attn
        assert isinstance(follower, SharedAttention)
        assert torch.equal(follower.original.q_proj.weight, before[f"model.layers.{layer}.self_attn.q_proj.weight"])
    assert not torch.equal(loaded.model.model.layers[1].self_attn.q_proj.weight, before["model.layers.1.self_attn.q_proj.weight"])

    ids = heldout.input_ids
    healed = _logits(loaded.model, ids)
    reloaded = load_shared(report.files["model"], device="cpu", dtype="float32")
    assert reloaded.share.active and reloaded.share.anchor_of == PLAN
    assert isinstance(reloaded.model.model.layers[2].self_attn, SharedAttention)
    assert torch.equal(_logits(reloaded.model, ids), healed)
    via_load_model = load_with_plan(report.files["model"], device="cpu", dtype="float32")  # --model PATH
    assert via_load_model.share.active and torch.equal(_logits(via_load_model.model, ids), healed)
    reloaded.share.remove()  # the same weights without sharing
    assert not torch.equal(_logits(reloaded.model, ids), healed)

    plan = SharePlan.load(Path(report.files["model"]) / "share_plan.json")  # also a plain plan file
    assert plan.anchor_of == PLAN


def test_export_loads_without_the_training_code(tmp_path, text_data, heldout):
    loaded = tiny_loaded()
    report = heal(loaded, PLAN, text_data, heldout, config(steps=2), out=tmp_path)
    expected = _logits(loaded.model, heldout.input_ids)
    torch.save(heldout.input_ids, tmp_path / "ids.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys, torch
torch.set_num_threads(1)
sys.modules["peft"] = None  # LoRA's library must not be needed
import sa_analysis
loaded = sa_analysis.load_shared({report.files['model']!r}, device="cpu", dtype="float32")
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    logits = loaded.model(input_ids=ids, use_cache=False).logits
expected = torch.load({str(tmp_path / 'expected.pt')!r})
assert torch.equal(logits, expected), (logits - expected).abs().max()
assert "sa_analysis.heal" not in sys.modules, "training code imported"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_head_maps_travel_through_heal_export_and_load_shared(tmp_path, text_data, heldout):
    from sa_analysis import load_shared

    loaded = tiny_loaded()
    plan = SharePlan(4, [2, 3], model=loaded.info.shape(), head_map={3: [2, 0, 3, 1]})
    report = heal(loaded, plan, text_data, heldout, config(steps=2), out=tmp_path)
    assert loaded.share.head_map == {3: (2, 0, 3, 1)}
    expected = _logits(loaded.model, heldout.input_ids)
    reloaded = load_shared(report.files["model"], device="cpu", dtype="float32")
    assert reloaded.share.head_map == {3: (2, 0, 3, 1)}
    assert torch.equal(_logits(reloaded.model, heldout.input_ids), expected)
    exact = load_shared(report.files["model"], device="cpu", dtype="float32", mode="exact")  # the map survives a mode change
    assert exact.share.head_map == {3: (2, 0, 3, 1)}
    torch.testing.assert_close(_logits(exact.model, heldout.input_ids), expected, rtol=1e-4, atol=1e-4)
    reloaded.share.remove()
    with share_attention(reloaded.model, PLAN):  # by index the same weights give other logits: the map was applied
        assert not torch.allclose(_logits(reloaded.model, heldout.input_ids), expected, atol=1e-4)


def test_full_heal_sends_gradients_through_the_follower_into_the_anchor(text_data, heldout):
    loaded = tiny_loaded()
    model = loaded.model
    chosen = dict(full_parameters(model, PLAN, config(method="full")))
    assert "model.layers.1.self_attn.q_proj.weight" in chosen and "model.layers.2.self_attn.v_proj.weight" in chosen
    assert not any(f"layers.{l}.self_attn.{p}_proj" in n for n in chosen for l in (2, 3) for p in "qk")
    # the follower's output alone has a gradient with respect to the anchor's q_proj and k_proj
    outputs = []
    with share_attention(model, PLAN):
        follower = model.model.layers[3].self_attn
        hook = follower.register_forward_hook(lambda _m, _i, out: outputs.append(out[0]))
        model(input_ids=heldout.input_ids[:1])
        hook.remove()
        anchor = model.model.layers[1].self_attn
        grads = torch.autograd.grad(outputs[0].square().sum(), [anchor.q_proj.weight, anchor.k_proj.weight])
    assert all(g.abs().sum() > 0 for g in grads)
    # a full heal trains the anchor's q/k; the followers' unused q/k stay as they were
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = heal(loaded, PLAN, text_data, heldout, config(method="full", steps=4, lr=1e-3))
    after = dict(loaded.model.named_parameters())
    assert not torch.equal(after["model.layers.1.self_attn.k_proj.weight"], before["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(loaded.model.model.layers[2].self_attn.original.k_proj.weight, before["model.layers.2.self_attn.k_proj.weight"])
    assert report.run["n_trainable"] == sum(p.numel() for p in chosen.values())


def test_lora_targets_skip_what_followers_never_run():
    model = tiny_model("llama", dtype=torch.float32)
    names = lora_targets(model, PLAN, config())
    assert "model.layers.1.self_attn.q_proj" in names and "model.layers.3.self_attn.v_proj" in names
    assert not any(f"layers.{l}.self_attn.{p}_proj" in n for n in names for l in (2, 3) for p in "qk")
    upper = lora_targets(model, PLAN, config(train_layers="from-anchor", lora_mlp=True))
    assert not any(".layers.0." in n for n in upper) and "model.layers.2.mlp.down_proj" in upper


def test_resume_continues_where_the_checkpoint_stopped(tmp_path, text_data, heldout):
    from transformers.trainer_utils import get_last_checkpoint

    settings = dict(steps=6, save_every=2, lora_dropout=0.1)  # dropout: the RNG state must come back too
    whole = heal(tiny_loaded(), PLAN, text_data, heldout, config(**settings), out=tmp_path / "whole", export=False)

    def stop_at_5(step, _loss):
        if step == 5:
            raise KeyboardInterrupt

    interrupted = tiny_loaded()
    with pytest.raises(KeyboardInterrupt):
        heal(interrupted, PLAN, text_data, heldout, config(**settings), out=tmp_path / "cut", on_step=stop_at_5)
    assert attention_implementation(interrupted.model) == "sdpa"  # the patch came off with the interruption
    assert Path(get_last_checkpoint(str(tmp_path / "cut" / "checkpoints"))).name == "checkpoint-4"
    resumed = heal(tiny_loaded(), PLAN, text_data, heldout, config(**settings), out=tmp_path / "cut", resume=True)
    assert resumed.run["resumed_from"] == 4 and resumed.run["steps_run"] == 2
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    assert resumed.evals["held-out"]["perplexity"]["healed"] == pytest.approx(whole.evals["held-out"]["perplexity"]["healed"], rel=1e-5)
    with pytest.raises(UserError, match="other settings"):  # a checkpoint of another LoRA rank
        heal(tiny_loaded(), PLAN, text_data, heldout, config(lora_rank=4, **settings), out=tmp_path / "cut", resume=True)


# ----- mistakes ----------------------------------------------------------------------------------------------
def test_plan_for_another_model(text_data, heldout):
    other = SharePlan(n_layers=30, followers=[7, 8], model={"name": "smollm2-135m", "n_layers": 30})
    with pytest.raises(UserError, match="30-layer"):
        heal(tiny_loaded(), other, text_data, heldout, config(steps=1))


def test_full_finetune_that_does_not_fit_suggests_lora(monkeypatch, text_data, heldout):
    import sa_analysis.heal.params as heal_module  # where check_full_fits looks it up

    loaded = tiny_loaded()
    params = [p for _, p in full_parameters(loaded.model, PLAN, config(method="full"))]
    need = full_finetune_bytes(params)
    assert need["total"] == 4 * sum(p.numel() * 4 for p in params)
    monkeypatch.setattr(heal_module, "free_memory_bytes", lambda device: need["gradients"])  # room for grads only
    with pytest.raises(UserError, match="LoRA"):
        check_full_fits(params, torch.device("cpu"))
    with pytest.raises(UserError, match="LoRA"):
        heal(loaded, PLAN, text_data, heldout, config(method="full", steps=1))
    assert attention_implementation(loaded.model) == "sdpa"  # refused before patching anything
    # on a host with GPUs the sentence names the fewest that would hold it sharded: 4W of state, 0.9 x 2W per GPU
    with pytest.raises(UserError, match=r"FSDP over 3 GPUs \(`accelerate launch --num_processes 3"):
        check_full_fits(params, torch.device("cuda"), gpus=8)
    with pytest.raises(UserError, match="LoRA instead"):  # more GPUs than the host has: LoRA
        check_full_fits(params, torch.device("cuda"), gpus=2)
    assert check_full_fits(params, torch.device("cuda"), world=3, sharded=True, gpus=8)["per_process"] <= 0.9 * 2 * need["weights"]


def test_sharded_lora_and_a_missing_deepspeed_config_are_refused(tmp_path):
    with pytest.raises(UserError, match="full fine-tunes"):
        HealConfig(method="lora", shard="fsdp")
    with pytest.raises(UserError, match="does not exist"):
        HealConfig(method="full", deepspeed=str(tmp_path / "ds.json"))
    with pytest.raises(UserError, match="--report-to none or tensorboard or wandb"):
        HealConfig(report_to="mlflow")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(UserError, match="pip install wandb"):
            HealConfig(report_to="wandb")


# ----- the command -------------------------------------------------------------------------------------------
def test_cli_heals_exports_and_refuses_bad_data(tmp_path, monkeypatch):
    from cli.main import app
    from sa_analysis.shared_model import load_with_plan

    monkeypatch.setattr("sa_analysis.heal.control.cache_root", lambda: tmp_path / "cache")  # a control of its own
    folder = tmp_path / "tiny"
    tiny_model("llama", dtype=torch.float32).save_pretrained(folder)
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["heal", "--model", folder, "--spans", "2-3", "--data", DATA / "heal_alpaca.jsonl", "--steps", 3,
            "--seq-len", 64, "--n-seqs", 2, "--save-every", 2, "--out", out]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    for name in ("heal_report.json", "heal.png", "healed-model/share_plan.json", "checkpoints/checkpoint-2/trainer_state.json"):
        assert (out / name).exists(), name
    assert "healed" in result.output and "vs untouched: before" in result.output and "vs control: after" in result.output
    assert "KL: before -> after" in result.output and "control healed in" in result.output
    from sa_analysis.heal import HealReport

    judged = HealReport.load(out / "heal_report.json")
    assert list(judged.evals) == ["heal data, held out", "other text"] and judged.control["status"] == "run"
    assert judged.evals["other text"]["text"]["source"] == "pydoc_data.topics"  # another kind than the Alpaca data
    assert all("control" in e["perplexity"] for e in judged.evals.values())
    again = runner.invoke(app, [str(a) for a in args[:-1] + [tmp_path / "again"]])  # the same recipe: control cached
    assert again.exit_code == 0 and "control from the cache" in again.output, again.output
    cached = HealReport.load(tmp_path / "again" / "heal_report.json")
    assert cached.control["status"] == "cached" and cached.control["key"] == judged.control["key"]
    assert cached.evals["other text"]["perplexity"]["control"] == judged.evals["other text"]["perplexity"]["control"]
    skipped = runner.invoke(app, [str(a) for a in args[:-1] + [tmp_path / "skipped", "--no-control"]])
    assert skipped.exit_code == 0 and "recovery under the same fine-tune is not measured" in skipped.output, skipped.output
    assert HealReport.load(tmp_path / "skipped" / "heal_report.json").control == {"status": "skipped"}
    assert "healing: step 3/3, loss" in result.output and "s left" in result.output  # plain lines, with the time left
    healed = load_with_plan(str(out / "healed-model"), device="cpu")
    assert healed.share.active and healed.info.source == "shared-folder"
    # the exported folder works as --model for the other commands: measured unshared, validated with its own plan
    measured = runner.invoke(app, [str(a) for a in ["heatmap", "--model", out / "healed-model", "--n-seqs", 1, "--seq-len", 16, "--out", tmp_path / "hm"]])
    assert measured.exit_code == 0, measured.output
    validated = runner.invoke(app, [str(a) for a in ["validate", "--model", out / "healed-model", "--n-seqs", 1, "--seq-len", 16, "--no-speed", "--tolerance", "100", "--out", tmp_path / "va"]])
    assert validated.exit_code == 0 and "2/4 layers shared" in validated.output, validated.output
    searched = runner.invoke(app, [str(a) for a in ["recommend-spans", "--model", folder, "--budget", 1, "--validate", "--n-seqs", 1, "--seq-len", 16, "--out", tmp_path / "rs"]])
    assert searched.exit_code == 0, searched.output
    assert "measuring output damage: damage 1: layer 1 reads 0" in searched.output  # progress, line by line
    assert "measuring plans: damage" in searched.output and "validating" in searched.output

    bad = runner.invoke(app, [str(a) for a in ["heal", "--model", folder, "--spans", "2-3", "--data", DATA / "heal_no_rows.jsonl", "--seq-len", 32, "--out", tmp_path / "bad"]])
    assert bad.exit_code == 1 and "no usable rows" in bad.output and "Traceback" not in bad.output
    plan_file = tmp_path / "plan30.json"
    SharePlan(n_layers=30, followers=[7]).save(plan_file)
    other = runner.invoke(app, [str(a) for a in ["heal", "--model", folder, "--plan", plan_file, "--seq-len", 32, "--out", tmp_path / "other"]])
    assert other.exit_code == 1 and "30-layer" in other.output.replace("\n", " ")


@pytest.mark.skipif(not __import__("os").environ.get("SA_TEST_MULTIPROCESS"), reason="set SA_TEST_MULTIPROCESS=1 (about 30 s: two processes)")
def test_two_processes_through_torchrun(tmp_path):
    """The data-parallel path on CPUs (gloo): what `accelerate launch --num_processes 2` does on two GPUs."""
    import os

    folder = tmp_path / "tiny"
    tiny_model("llama", dtype=torch.float32).save_pretrained(folder)
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [str(torchrun), "--nproc_per_node", "2", "-m", "cli.main", "heal", "--model", str(folder), "--spans", "2-3",
            "--data", str(DATA / "heal_alpaca.jsonl"), "--steps", "4", "--seq-len", "64", "--n-seqs", "2",
            "--out", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stdout and result.stdout.count("gap before") == 1  # only the main process reports
    from sa_analysis.heal import HealReport

    report = HealReport.load(tmp_path / "out" / "heal_report.json")
    assert report.run["world_size"] == 2 and report.run["tokens"] > 0 and len(report.losses) == 4


def test_memory_check_at_llama_3_8b_shape_names_fsdp_over_two_80gb_gpus(monkeypatch):
    """Known answer on the real shape (meta tensors, no memory): followers 23-30 of 32, float32 master weights."""
    import sa_analysis.heal.params as heal_module
    from transformers import AutoConfig, AutoModelForCausalLM

    from sa_analysis.aliases import require_alias

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**require_alias("llama3.1-8b").config), dtype=torch.float32)
    plan = {m: 22 for m in range(23, 31)}
    trained = [p for _, p in full_parameters(model, plan, config(method="full"))]
    every = list(model.parameters())
    state = 4 * sum(p.numel() for p in every) + 3 * 4 * sum(p.numel() for p in trained)  # weights + grads + 2 Adam
    assert 126e9 < state < 127e9  # 16 bytes a trained parameter
    resident = 4 * sum(p.numel() for p in every)
    monkeypatch.setattr(heal_module, "free_memory_bytes", lambda device: 80e9 - resident)  # an 80 GB GPU, weights loaded
    with pytest.raises(UserError, match=r"FSDP over 2 GPUs"):
        check_full_fits(trained, torch.device("cuda"), all_params=every, gpus=8)
    fits = check_full_fits(trained, torch.device("cuda"), all_params=every, world=2, sharded=True, gpus=8)
    assert fits["per_process"] == pytest.approx(state / 2)


# ----- the control: recovery judged against the unshared model healed the same way ------------------------------
def test_gap_and_closed_fraction_known_answers():
    import math

    from sa_analysis.heal import closed_fraction, gap

    assert gap(20.0, 10.0) == pytest.approx(math.log(2))
    assert closed_fraction(0.2, 0.05) == pytest.approx(0.75)
    assert closed_fraction(0.2, -0.1) == pytest.approx(1.5)  # the healed shared model beats the control
    assert closed_fraction(0.0, 0.1) is None and closed_fraction(-0.1, 0.0) is None  # sharing cost nothing


def test_control_heal_is_the_unshared_model_healed_alike_cached_and_judged(tmp_path, monkeypatch, text_data, heldout):
    import math

    from sa_analysis.heal import control_path, run_control

    monkeypatch.setattr("sa_analysis.heal.control.cache_root", lambda: tmp_path / "cache")
    evals = {"held-out": heldout}
    recipe = config(steps=4)
    control = run_control(tiny_loaded(), text_data, evals, recipe)
    assert control["status"] == "run" and control_path(control["key"]).is_file()
    # the same as healing with nothing shared, computed on its own
    unshared = heal(tiny_loaded(), SharePlan.empty(4), text_data, evals, recipe, export=False)
    assert control["perplexity"]["held-out"]["healed"] == pytest.approx(unshared.evals["held-out"]["perplexity"]["healed"], rel=1e-6)
    assert control["perplexity"]["held-out"]["baseline"] == pytest.approx(unshared.evals["held-out"]["perplexity"]["baseline"], rel=1e-9)
    again = run_control(tiny_loaded(), text_data, evals, recipe)
    assert again["status"] == "cached" and again["perplexity"] == control["perplexity"]
    assert run_control(tiny_loaded(seed=1), text_data, evals, recipe)["key"] != control["key"]  # other weights
    assert run_control(tiny_loaded(), text_data, evals, config(steps=3))["key"] != control["key"]  # another recipe

    report = heal(tiny_loaded(), PLAN, text_data, evals, recipe, control=control)
    p, gaps = report.evals["held-out"]["perplexity"], report.gaps("held-out")
    assert p["control"] == control["perplexity"]["held-out"]["healed"] and report.control["key"] == control["key"]
    assert gaps["before"] == pytest.approx(math.log(p["patched"] / p["baseline"]))
    assert gaps["after"] == pytest.approx(math.log(p["healed"] / p["control"]))
    assert gaps["closed"] == pytest.approx(1 - gaps["after"] / gaps["before"])
    nll = report.evals["held-out"]["nll"]  # per sequence, paired: the intervals of the gaps
    assert math.exp(sum(nll["healed"]) / len(nll["healed"])) == pytest.approx(p["healed"], rel=1e-12)
    diffs = [a - b for a, b in zip(nll["healed"], nll["control"])]
    assert sum(diffs) / len(diffs) == pytest.approx(gaps["after"])
    assert gaps["after_low"] < gaps["after"] < gaps["after_high"]
    assert "against the control" in report.summary()
