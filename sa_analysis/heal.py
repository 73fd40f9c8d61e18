"""Heal a shared model: fine-tune with Shared Attention in force, then export the model with its plan.

Sharing costs a little quality; a short fine-tune with the patch applied recovers most of it (the SA paper fine-tunes
Llama-3-8B on Alpaca, loss on the response tokens only). Gradients flow through the followers' reused attention
into their anchors' `q_proj` / `k_proj` (the patch detaches nothing), as in the reference.

    data = load_heal_data("alpaca.jsonl", loaded.tokenizer, seq_len=512)
    report = heal(loaded, plan, data, heldout_batch, HealConfig(steps=200), out="sa-output/heal")
    # loaded.model: healed, LoRA merged, patch in force (loaded.share); out/model: the exported folder

Order of operations (why LoRA applies to the weights actually used):

1. perplexity of the baseline and of the patched model on held-out text, before any weight changes;
2. LoRA adapters are injected *before* patching, into the unpatched attention modules: the follower module that
   the patch swaps in holds the same (now LoRA-wrapped) `v_proj` / `o_proj`, and anchors keep theirs. Followers'
   `q_proj` / `k_proj` get no adapter (the patch takes them out of the module tree: they are never used);
3. the patch is applied, the loop trains (plain torch + `accelerate.Accelerator`: device placement, DDP across
   the GPUs of one host under `accelerate launch`, bf16 autocast on GPU, float32 on CPU);
4. the patch is lifted, LoRA is merged into the base weights, the patch is applied again, the healed perplexity is
   measured on exactly the weights that are exported (`shared_model.export_shared`).

Gradient checkpointing (activation recomputation) is not supported while patched; "checkpoints" here are saved
training states (trainable weights, optimizer, step) under `out/checkpoints/`, from which `resume=True` continues.
Data order and dropout are functions of (seed, step), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import UserError
from .io import read_json, read_user_text, write_json

REPORT_FORMAT = "sa-analysis/heal-report"
CHECKPOINT_FORMAT = "sa-analysis/heal-checkpoint"
FORMAT_VERSION = 1
IGNORE_INDEX = -100
METHODS = ("lora", "full")
TRAIN_LAYERS = ("all", "from-anchor")
FULL_SCOPES = ("all", "attention")
DEFAULT_LR = {"lora": 1e-3, "full": 5e-5}
GIB = 1024**3

# Stanford Alpaca's prompt template (the SA reference heals on Alpaca with it); the loss covers the response only.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


# ======================================================================================================
# Settings
# ======================================================================================================
@dataclass
class HealConfig:
    """How to heal. `lr=None` picks 1e-3 for LoRA and 5e-5 for a full fine-tune.

    batch_size is per process (GPU); one optimizer step sees batch_size x grad_accum x processes sequences.
    train_layers="from-anchor" leaves the layers below the first anchor frozen (their outputs do not change
    with sharing; backward then stops at the first anchor, which is cheaper). full_scope="attention" trains only
    the attention projections in a full fine-tune.
    """

    method: str = "lora"
    lora_rank: int = 16
    lora_alpha: float | None = None  # default 2 x rank
    lora_dropout: float = 0.0
    lora_mlp: bool = False  # also adapt gate/up/down projections
    train_layers: str = "all"
    full_scope: str = "all"
    lr: float | None = None
    steps: int = 30
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    warmup_steps: int | None = None  # default: a tenth of the steps
    min_lr_ratio: float = 0.1  # cosine decay to this share of lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    seed: int = 0
    mode: str = "fast"  # Shared Attention mode while training and in the export
    eval_batch_size: int = 4

    def __post_init__(self) -> None:
        from .patch import MODES

        if self.method not in METHODS:
            raise UserError(f"Unknown heal method {self.method!r}; use lora or full.")
        if self.train_layers not in TRAIN_LAYERS:
            raise UserError(f"Unknown train_layers {self.train_layers!r}; use all or from-anchor.")
        if self.full_scope not in FULL_SCOPES:
            raise UserError(f"Unknown full_scope {self.full_scope!r}; use all or attention.")
        if self.mode not in MODES:
            raise UserError(f"Unknown Shared Attention mode {self.mode!r}; use fast or exact.")
        for name in ("lora_rank", "steps", "batch_size", "grad_accum", "keep_checkpoints", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}.")
        if self.seq_len < 2:
            raise UserError(f"seq-len must be at least 2; got {self.seq_len}.")
        if self.save_every < 0:
            raise UserError("save-every must be 0 (no checkpoints) or a number of steps.")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"The learning rate must be a positive number; got {self.lr}.")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"LoRA dropout must lie in [0, 1); got {self.lora_dropout}.")

    @property
    def learning_rate(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[self.method])

    @property
    def warmup(self) -> int:
        return int(self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10))

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to `min_lr_ratio` x lr at the last step (a pure function of step)."""
        lr = self.learning_rate
        if step < self.warmup:
            return lr * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def structure(self) -> dict[str, Any]:
        """What a checkpoint's trainable weights depend on (a resumed run must agree on these)."""
        keys = ("method", "lora_rank", "lora_alpha", "lora_mlp", "train_layers", "full_scope", "mode")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "learning_rate": self.learning_rate, "warmup": self.warmup}


# ======================================================================================================
# Data
# ======================================================================================================
@dataclass
class HealData:
    """Training examples: token ids and labels (IGNORE_INDEX where no loss is taken), each at most seq_len long."""

    examples: list[tuple[torch.Tensor, torch.Tensor]]
    kind: str  # "alpaca" (loss on responses) or "text" (language-model loss)
    source: str
    pad_id: int
    n_rows: int = 0
    n_skipped: dict[str, int] = field(default_factory=dict)
    _orders: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.examples)

    def describe(self) -> dict[str, Any]:
        lengths = [len(ids) for ids, _ in self.examples]
        loss_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in self.examples)
        return {"source": self.source, "kind": self.kind, "n_rows": self.n_rows, "n_examples": len(self.examples),
                "skipped": dict(self.n_skipped), "n_tokens": sum(lengths), "n_loss_tokens": loss_tokens,
                "max_len": max(lengths) if lengths else 0}

    def indices(self, step: int, micro: int, batch_size: int, grad_accum: int, rank: int = 0, world: int = 1,
                seed: int = 0) -> list[int]:
        """The examples of micro-batch `micro` of optimizer step `step` on process `rank`: a fixed function of its
        arguments (epochs are seeded permutations), so a resumed run sees the same data as an uninterrupted one."""
        first = ((step * grad_accum + micro) * world + rank) * batch_size
        return [self._example_at(position, seed) for position in range(first, first + batch_size)]

    def _example_at(self, position: int, seed: int) -> int:
        epoch, index = divmod(position, len(self.examples))
        order = self._orders.get(epoch)
        if order is None:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = self._orders[epoch] = torch.randperm(len(self.examples), generator=generator)
        return int(order[index])

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids`, `attention_mask`, `labels` [b, longest] for the given examples."""
        rows = [self.examples[i] for i in indices]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, :len(ids)] = ids
            labels[r, :len(ids)] = lab
            mask[r, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def alpaca_prompt(row: Mapping[str, Any]) -> str:
    """The Alpaca prompt for a row with `instruction` and optional `input`."""
    instruction = str(row.get("instruction") or "").strip()
    extra = str(row.get("input") or "").strip()
    if extra:
        return ALPACA_PROMPT.format(instruction=instruction, input=extra)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def alpaca_example(tokenizer: Any, row: Mapping[str, Any], seq_len: int,
                   vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(ids, labels) for one Alpaca row: labels are IGNORE_INDEX on the prompt, the response + EOS is learned.

    The response is cut to fit `seq_len`; None when the prompt leaves no room for a response token.
    """
    prompt = tokenizer(alpaca_prompt(row))["input_ids"]
    response = tokenizer(str(row["output"]).strip(), add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        response = response + [eos]
    room = seq_len - len(prompt)
    if room < 1 or not response:
        return None
    response = response[:room]
    ids = torch.tensor(prompt + response, dtype=torch.long)
    if vocab_size is not None:
        ids = ids % vocab_size
    labels = ids.clone()
    labels[:len(prompt)] = IGNORE_INDEX
    return ids, labels


def load_heal_data(source: str | Path | None, tokenizer: Any = None, *, seq_len: int = 256,
                   vocab_size: int | None = None, max_examples: int | None = None) -> HealData:
    """Training data from an Alpaca-style JSON/JSONL file (instruction, input, output: loss on the output only), a
    JSONL file with a `text` field or a plain-text file (language-model loss on windows of `seq_len` tokens), or the
    default text (None). From plain text only the calibration part is used (the held-out part is for evaluation,
    see `data.split_documents`). Without a tokenizer (random-init models) the default tokenizer's ids are folded into
    `vocab_size`. `max_examples` stops tokenizing once that many text windows are collected.
    """
    from .data import DEFAULT_TEXT, default_tokenizer, split_documents

    if tokenizer is None:
        tokenizer = default_tokenizer()
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) or 0
    pad = int(pad) % vocab_size if vocab_size else int(pad)
    if source is None or str(source) == DEFAULT_TEXT:
        from pydoc_data.topics import topics

        docs = split_documents(sorted(topics.items()), "calibration")
        return _text_data(docs, tokenizer, seq_len, vocab_size, max_examples, f"{DEFAULT_TEXT} (calibration)", pad, len(docs))
    path = Path(source).expanduser()
    raw = read_user_text(path, "data file", "pass an Alpaca-style JSON/JSONL file or a text file to --data")
    if path.suffix.lower() in (".json", ".jsonl"):
        rows = _json_rows(raw, path)
        if any(isinstance(r, dict) and ("instruction" in r or "output" in r) for r in rows):
            return _alpaca_data(rows, tokenizer, seq_len, vocab_size, str(path), pad)
        docs = [(f"{path.name}#{i}", r["text"]) for i, r in enumerate(rows)
                if isinstance(r, dict) and isinstance(r.get("text"), str) and r["text"].strip()]
        if not docs:
            raise UserError(f"The data file {path} has no usable rows: {len(rows)} rows, none with Alpaca fields "
                            f"(instruction, output) or a non-empty 'text' field.")
        n_rows = len(rows)
    else:
        docs = [(f"{path.name}#{i}", p) for i, p in enumerate(p for p in raw.split("\n\n") if p.strip())]
        if not docs:
            raise UserError(f"The data file {path} has no usable rows: it holds no text.")
        n_rows = len(docs)
    docs = split_documents(docs, "calibration") or docs
    return _text_data(docs, tokenizer, seq_len, vocab_size, max_examples, f"{path} (calibration part)", pad, n_rows)


def _json_rows(raw: str, path: Path) -> list[Any]:
    """Rows of a JSON list (Alpaca's alpaca_data.json) or of a JSONL file."""
    text = raw.strip()
    if not text:
        raise UserError(f"The data file {path} has no usable rows: it is empty.")
    if text.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"The data file {path} is not valid JSON ({exc.msg} at line {exc.lineno}); write a list of objects or one object per line.") from None
        return rows if isinstance(rows, list) else [rows]
    rows = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"Line {number} of {path} is not valid JSON; each line of a JSONL file must be one object.") from None
    return rows


def _alpaca_data(rows: list[Any], tokenizer: Any, seq_len: int, vocab_size: int | None, source: str, pad: int) -> HealData:
    examples, missing, too_long = [], 0, 0
    for row in rows:
        if not isinstance(row, dict) or not str(row.get("instruction") or "").strip() or not str(row.get("output") or "").strip():
            missing += 1
            continue
        example = alpaca_example(tokenizer, row, seq_len, vocab_size)
        if example is None:
            too_long += 1
            continue
        examples.append(example)
    if not examples:
        raise UserError(f"The data file {source} has no usable rows: {len(rows)} rows, {missing} without an instruction "
                        f"and an output, {too_long} whose prompt fills --seq-len {seq_len}; fix the file or raise --seq-len.")
    return HealData(examples, "alpaca", source, pad, len(rows), {"no_instruction_or_output": missing, "prompt_too_long": too_long})


def _text_data(docs: list[tuple[str, str]], tokenizer: Any, seq_len: int, vocab_size: int | None,
               max_examples: int | None, source: str, pad: int, n_rows: int) -> HealData:
    """Windows of `seq_len` tokens over the documents joined by EOS (a shorter text gives one shorter window)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    needed = None if max_examples is None else max_examples * seq_len
    for _, body in docs:
        ids.extend(tokenizer(body, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if needed is not None and len(ids) >= needed:
            break
    if len(ids) < 2:
        raise UserError(f"The data {source} has no usable rows: fewer than 2 tokens of text.")
    stream = torch.tensor(ids, dtype=torch.long)
    if vocab_size is not None:
        stream = stream % vocab_size
    n = len(ids) // seq_len
    windows = list(stream[: n * seq_len].view(n, seq_len)) if n else [stream]
    if max_examples is not None:
        windows = windows[:max_examples]
    return HealData([(w.clone(), w.clone()) for w in windows], "text", source, pad, n_rows)


# ======================================================================================================
# What is trained
# ======================================================================================================
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
FOLLOWER_UNUSED = ("q_proj", "k_proj", "q_norm", "k_norm")  # out of the module tree while patched


def _layer_of_names(model: torch.nn.Module) -> dict[str, int]:
    """{module name: decoder layer index} for every module inside a decoder layer."""
    from .capture import decoder_layers

    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, int] = {}
    for index, block in enumerate(decoder_layers(model)):
        prefix = names[id(block)]
        for sub, _ in block.named_modules():
            out[f"{prefix}.{sub}" if sub else prefix] = index
    return out


def lora_targets(model: torch.nn.Module, anchor_of: Mapping[int, int], config: HealConfig) -> list[str]:
    """Full names of the linear modules that get a LoRA adapter: attention projections (+ MLP) of the trained
    layers, except followers' q_proj / k_proj, which Shared Attention never runs."""
    layer_of = _layer_of_names(model)
    lowest = min(anchor_of.values()) if (config.train_layers == "from-anchor" and anchor_of) else 0
    wanted = ATTENTION_PROJ + (MLP_PROJ if config.lora_mlp else ())
    targets = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        layer = layer_of.get(name)
        if layer is None or leaf not in wanted or not isinstance(module, torch.nn.Linear) or layer < lowest:
            continue
        if layer in anchor_of and leaf in FOLLOWER_UNUSED:
            continue
        targets.append(name)
    if not targets:
        raise UserError("No linear q/k/v/o projections were found to adapt with LoRA; use a full fine-tune (--full).")
    return targets


def add_lora(model: torch.nn.Module, anchor_of: Mapping[int, int], config: HealConfig):
    """Inject LoRA adapters in place (before patching); returns the peft wrapper (for merging)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("LoRA healing needs peft: `pip install peft`, or use a full fine-tune (--full).") from None
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or 2 * config.lora_rank,
                      lora_dropout=config.lora_dropout, target_modules=lora_targets(model, anchor_of, config), bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks a deprecated transformers property
        return get_peft_model(model, lora)


def full_parameters(model: torch.nn.Module, anchor_of: Mapping[int, int], config: HealConfig) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) trained by a full fine-tune: everything (or the attention projections) of the trained
    layers, minus followers' unused q/k projections and norms; embeddings, final norm and head only with scope "all"
    and train_layers "all"."""
    layer_of = _layer_of_names(model)
    lowest = min(anchor_of.values()) if (config.train_layers == "from-anchor" and anchor_of) else 0
    chosen = []
    for name, param in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        parts = module_name.split(".")
        layer = next((layer_of[".".join(parts[:i])] for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in layer_of), None)
        if layer is None:
            if config.full_scope == "all" and config.train_layers == "all":
                chosen.append((name, param))
            continue
        if layer < lowest:
            continue
        if layer in anchor_of and any(p in FOLLOWER_UNUSED for p in parts):
            continue
        if config.full_scope == "attention" and not any(p in ATTENTION_PROJ for p in parts):
            continue
        chosen.append((name, param))
    return chosen


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory where training runs: CUDA's free bytes, or MemAvailable from /proc/meminfo on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def full_finetune_bytes(params: Sequence[torch.nn.Parameter]) -> dict[str, int]:
    """Bytes of a full fine-tune's state: weights, gradients, AdamW's two moments (kept in the parameter dtype)."""
    weights = sum(p.numel() * p.element_size() for p in params)
    return {"weights": weights, "gradients": weights, "optimizer": 2 * weights, "total": 4 * weights}


def check_full_fits(params: Sequence[torch.nn.Parameter], device: torch.device, margin: float = 0.9) -> dict[str, int]:
    """Refuse (UserError, suggesting LoRA) a full fine-tune whose gradients + optimizer states exceed free memory.

    The weights are already resident; activations come on top, so only `margin` of the free memory is offered.
    """
    need = full_finetune_bytes(params)
    extra = need["gradients"] + need["optimizer"]
    free = free_memory_bytes(device)
    if free is not None and extra > margin * free:
        raise UserError(
            f"A full fine-tune of {sum(p.numel() for p in params) / 1e6:,.1f}M parameters needs about "
            f"{need['total'] / GIB:.1f} GiB on {device} (weights, gradients and two AdamW states) but only "
            f"{free / GIB:.1f} GiB more is free; heal with LoRA instead (--lora, the default), or train fewer weights "
            f"(--full-scope attention, --train-layers from-anchor).")
    return {**need, "free": free}


# ======================================================================================================
# Perplexity
# ======================================================================================================
@torch.no_grad()
def perplexity(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of `model` on `input_ids` [S, T] (every position but the first is predicted)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i:i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


def recovered_fraction(baseline: float, patched: float, healed: float) -> float | None:
    """Share of the perplexity lost to sharing that healing won back (1 = back to baseline, > 1 = better than it)."""
    lost = patched - baseline
    if not (math.isfinite(lost) and lost > 0):
        return None
    return (patched - healed) / lost


# ======================================================================================================
# Checkpoints
# ======================================================================================================
def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint folder (step-NNNNNN with a state.json) under `folder`, or None."""
    folder = Path(folder)
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(folder: str | Path, step: int, named: Sequence[tuple[str, torch.nn.Parameter]], optimizer: Any,
                    losses: Sequence[float], fingerprint: Mapping[str, Any], keep: int = 2) -> Path:
    """Write trainable weights, optimizer state and progress to folder/step-NNNNNN (atomically: temp folder, rename);
    older checkpoints beyond `keep` are deleted."""
    folder = Path(folder)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.save({name: p.detach().cpu() for name, p in named}, tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_json(tmp / "state.json", {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "step": step,
                                        "losses": list(losses), "fingerprint": dict(fingerprint)})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, named: Sequence[tuple[str, torch.nn.Parameter]], optimizer: Any,
                    fingerprint: Mapping[str, Any]) -> tuple[int, list[float]]:
    """Restore a checkpoint written by `save_checkpoint` into the trainable parameters and optimizer; (step, losses)."""
    state = read_json(path / "state.json", "heal checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a heal checkpoint; remove it or heal into another --out.")
    saved = state.get("fingerprint", {})
    differ = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {fingerprint[k]!r}" for k in differ)
        raise UserError(f"The checkpoint {path} was made with other settings ({details}); resume with the same "
                        f"settings, or start afresh without --resume (or in another --out).")
    weights = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
    params = dict(named)
    if set(weights) != set(params):
        raise UserError(f"The checkpoint {path} holds other trainable weights than this run; start afresh without --resume.")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return int(state["step"]), [float(x) for x in state.get("losses", [])]


# ======================================================================================================
# The report
# ======================================================================================================
@dataclass
class HealReport:
    """Baseline, patched and healed perplexity on held-out text, the loss curve, and how the heal ran."""

    model: dict[str, Any]
    plan: dict[str, Any]
    config: dict[str, Any]
    data: dict[str, Any]
    eval: dict[str, Any]
    perplexity: dict[str, float]  # baseline, patched, healed
    recovered: float | None
    losses: list[float]
    run: dict[str, Any]  # steps, resumed_from, seconds, tokens, tokens_per_s, world_size, device, peak memory
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        p = self.perplexity
        rec = "n/a (sharing cost nothing)" if self.recovered is None else f"{100 * self.recovered:.0f}%"
        return (f"perplexity baseline {p['baseline']:.4g}, patched {p['patched']:.4g}, healed {p['healed']:.4g}: "
                f"recovered {rec} of the loss from sharing in {self.run['steps_run']} steps ({self.run['seconds']:.0f} s)")

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "heal report") -> "HealReport":
        if not isinstance(data, Mapping) or data.get("format") != REPORT_FORMAT:
            raise UserError(f"{source} is not an sa-analysis heal report; pass a heal_report.json written by `sa-analyze heal`.")
        try:
            return cls(**{k: v for k, v in data.items() if k not in ("format", "version")})
        except TypeError as exc:
            raise UserError(f"{source} is a damaged heal report ({exc}); re-run `sa-analyze heal`.") from None

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "HealReport":
        return cls.from_dict(read_json(path, "heal report"), source=str(path))


# ======================================================================================================
# Healing
# ======================================================================================================
def make_accelerator(device: torch.device | None = None):
    """An `accelerate.Accelerator` for healing: bf16 autocast on a GPU that has it, none on the CPU; the model is
    placed by us (on its loading device, or the process's GPU under `accelerate launch`)."""
    from accelerate import Accelerator

    cpu = device is not None and device.type == "cpu"
    bf16 = not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", device_placement=False)


def heal(
    loaded: Any,
    plan: Any,
    data: HealData,
    eval_batch: Any,
    config: HealConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    accelerator: Any = None,
    on_step: Callable[[int, float], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    export: bool = True,
) -> HealReport:
    """Fine-tune `loaded.model` with Shared Attention for `plan` in force; measure, export, report.

    eval_batch: held-out token ids (a TokenBatch of split "heldout", or [S, T]) for baseline/patched/healed
    perplexity. out: folder for checkpoints/, model/ (the export), heal_report.json and heal.png (None: nothing is
    written). resume: continue from the newest checkpoint under out/checkpoints (a fresh start when there is none).
    on_step(step, loss) is called on the main process after each optimizer step, on_phase(name) as each phase starts
    ("before", "train", "after", "export"). Afterwards `loaded.model` holds
    the healed weights (LoRA merged) with the patch in force, `loaded.share` its handle.
    """
    from .patch import share_attention
    from .validate import as_plan, check_plan_for_model

    config = config or HealConfig()
    info = loaded.info
    if getattr(loaded, "share", None) is not None and loaded.share.active:
        raise UserError("This model already runs with Shared Attention (it was loaded from a shared folder); heal the base model, or call loaded.share.remove() first.")
    share_plan = as_plan(plan, info.n_layers, info.shape())
    check_plan_for_model(share_plan, info)
    anchor_of = share_plan.anchor_of
    ids_eval = eval_batch.input_ids if hasattr(eval_batch, "input_ids") else eval_batch
    if hasattr(eval_batch, "input_ids") and getattr(eval_batch, "split", "heldout") != "heldout":  # (a tensor has .split())
        raise UserError("Heal evaluates on held-out text, never the calibration text; pass a batch with split='heldout'.")
    if len(data) == 0:
        raise UserError(f"The data {data.source} has no usable rows.")
    model = loaded.model
    device = next(model.parameters()).device
    acc = accelerator or make_accelerator(device)
    main = acc.is_main_process
    _check_distributed(acc)
    out = Path(out) if out is not None else None
    notes: list[str] = []
    phase = (on_phase if main and on_phase is not None else (lambda _name: None))

    # 1. before: baseline and patched perplexity on held-out text
    ppl: dict[str, float] = {}
    phase("before")
    if main:
        ppl["baseline"] = perplexity(model, ids_eval, config.eval_batch_size)
        with share_attention(model, share_plan, mode=config.mode):
            ppl["patched"] = perplexity(model, ids_eval, config.eval_batch_size)

    # 2. trainable weights (LoRA injected before the patch, so followers' v/o adapters are the ones used), patch
    peft_model, memory = _make_trainable(model, anchor_of, config, device)
    handle = share_attention(model, share_plan, mode=config.mode)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.method == "full" and any(p.dtype in (torch.bfloat16, torch.float16) for _, p in named):
        notes.append("full fine-tune of half-precision weights: small updates may round away; load float32 weights "
                     "(--dtype float32) to train with bf16 autocast instead")
    optimizer = torch.optim.AdamW([p for _, p in named], lr=config.learning_rate, weight_decay=config.weight_decay)
    train_model, optimizer = acc.prepare(model, optimizer)

    # 3. resume from the newest checkpoint
    n_trainable = sum(p.numel() for _, p in named)
    fingerprint = {**config.structure(), "followers": list(share_plan.followers), "model": info.name, "n_trainable": n_trainable}
    checkpoints = out / "checkpoints" if out is not None else None
    start, losses = 0, []
    if resume:
        last = latest_checkpoint(checkpoints) if checkpoints is not None else None
        if last is None:
            notes.append("resume asked but no checkpoint was found; started from step 0")
        else:
            start, losses = load_checkpoint(last, named, optimizer, fingerprint)
            losses = losses[:start]

    # 4. train
    phase("train")
    run = _train_loop(train_model, optimizer, named, data, config, acc, start, losses, checkpoints, fingerprint,
                      on_step if main else None)
    run.update(resumed_from=start if resume and start else None, device=str(device), n_trainable=n_trainable,
               mixed_precision=str(acc.mixed_precision))
    if memory is not None:
        run["full_finetune_bytes"] = memory

    # 5. lift the patch, merge LoRA, patch again: the healed model is exactly what is exported
    acc.wait_for_everyone()
    model = acc.unwrap_model(train_model, keep_fp32_wrapper=False)
    handle.remove()
    if peft_model is not None:
        model = peft_model.merge_and_unload()
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    loaded.model = model
    loaded.share = share_attention(model, share_plan, mode=config.mode)
    run["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")

    # 6. after: healed perplexity, report, figure, export (main process)
    report = None
    if main:
        phase("after")
        ppl["healed"] = perplexity(model, ids_eval, config.eval_batch_size)
        described = eval_batch.describe() if hasattr(eval_batch, "describe") else {"n_seqs": int(ids_eval.shape[0]), "seq_len": int(ids_eval.shape[1])}
        report = HealReport(
            model=info.to_dict(), plan=share_plan.to_dict(), config=config.to_dict(), data=data.describe(), eval=described,
            perplexity=ppl, recovered=recovered_fraction(ppl["baseline"], ppl["patched"], ppl["healed"]), losses=losses,
            run=run, notes=notes, meta=_meta(device))
        if out is not None:
            if export:
                phase("export")
                report.files["model"] = str(export_healed(loaded, share_plan, out / "healed-model", report, config.mode))
            report.files["report"] = str(out / "heal_report.json")
            report.files["figure"] = str(out / "heal.png")
            report.save(out / "heal_report.json")
            from .plots import plot_heal

            plot_heal(report, out / "heal")
    acc.wait_for_everyone()
    return report


def _make_trainable(model: torch.nn.Module, anchor_of: Mapping[int, int], config: HealConfig, device: torch.device):
    """(peft wrapper or None, full fine-tune memory estimate or None): LoRA adapters injected, or the chosen weights
    of a full fine-tune marked trainable after checking they fit. Runs before the patch."""
    torch.manual_seed(config.seed)  # adapter initialisation
    if config.method == "lora":
        return add_lora(model, anchor_of, config), None
    chosen = full_parameters(model, anchor_of, config)
    memory = check_full_fits([p for _, p in chosen], device)
    chosen_ids = {id(p) for _, p in chosen}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen_ids)
    return None, memory


def _train_loop(train_model, optimizer, named, data: HealData, config: HealConfig, acc, start: int, losses: list[float],
                checkpoints: Path | None, fingerprint: Mapping[str, Any], on_step) -> dict[str, Any]:
    """Optimizer steps `start`..`config.steps` (appending to `losses`), checkpointing every `save_every`; run stats."""
    device = next(p for _, p in named).device
    world, rank = acc.num_processes, acc.process_index
    params = [p for _, p in named]
    tokens = torch.zeros((), dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_model.train()
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(start, config.steps):
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout (if any) repeats on resume
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        step_loss = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            batch = data.batch(data.indices(step, micro, config.batch_size, config.grad_accum, rank, world, config.seed))
            batch = {k: v.to(device) for k, v in batch.items()}
            last_micro = micro == config.grad_accum - 1
            with contextlib.nullcontext() if last_micro else acc.no_sync(train_model):  # all-reduce once per step
                loss = train_model(**batch, use_cache=False).loss
                acc.backward(loss / config.grad_accum)
            step_loss += loss.detach().float() / config.grad_accum
            tokens += batch["attention_mask"].sum()
        if config.max_grad_norm:
            acc.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(acc.reduce(step_loss, reduction="mean"))
        if not math.isfinite(value):
            raise UserError(f"The training loss became {value} at step {step + 1}; lower --lr (now {config.learning_rate:g}).")
        losses.append(value)
        if on_step is not None:
            on_step(step + 1, value)
        done = step + 1
        if checkpoints is not None and config.save_every and done % config.save_every == 0 and done < config.steps:
            if acc.is_main_process:
                save_checkpoint(checkpoints, done, named, optimizer, losses, fingerprint, config.keep_checkpoints)
            acc.wait_for_everyone()
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    tokens_all = int(acc.reduce(tokens, reduction="sum"))
    steps_run = config.steps - start
    return {"steps": config.steps, "steps_run": steps_run, "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),  # this process's CPU time, all threads (on a shared CPU: load-independent)
            "tokens": tokens_all, "tokens_per_s": round(tokens_all / seconds, 1) if seconds > 0 and steps_run else None,
            "seconds_per_step": round(seconds / steps_run, 3) if steps_run else None, "world_size": world,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss(),
            "peak_memory_kind": "cuda-allocated" if device.type == "cuda" else "process-rss (lifetime)"}


def _check_distributed(acc: Any) -> None:
    """Plain DDP (and DeepSpeed ZeRO-1/2) keep whole weights on every process; ZeRO-3 and FSDP shard them, which the
    patch (it moves modules) and the export (it saves the unwrapped model) do not support."""
    kind = str(getattr(acc, "distributed_type", "")).rsplit(".", 1)[-1]
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None) if plugin is not None else None
    if kind == "FSDP" or (kind == "DEEPSPEED" and stage == 3):
        raise UserError("Healing supports data parallelism (DDP, or DeepSpeed ZeRO stage 1/2), not sharded weights "
                        "(FSDP, ZeRO-3); pick another accelerate config, or heal with LoRA on one GPU.")


def export_healed(loaded: Any, plan: Any, folder: str | Path, report: HealReport | None, mode: str) -> Path:
    """Export the healed, patched model with its plan and a summary of the heal in share_plan.json."""
    from .shared_model import export_shared

    meta = {}
    if report is not None:
        meta["heal"] = {"perplexity": report.perplexity, "recovered": report.recovered, "data": report.data.get("source"),
                        "method": report.config.get("method"), "steps": report.run.get("steps")}
    return export_shared(loaded, plan, folder, mode=mode, meta=meta)


def _peak_rss() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, OSError):
        return None


def _meta(device: torch.device) -> dict[str, Any]:
    import transformers

    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import peft

        meta["peft"] = peft.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    return meta


__all__ = [
    "ALPACA_PROMPT", "HealConfig", "HealData", "HealReport", "IGNORE_INDEX", "alpaca_example", "alpaca_prompt",
    "check_full_fits", "free_memory_bytes", "full_parameters", "heal", "latest_checkpoint", "load_heal_data",
    "lora_targets", "make_accelerator", "perplexity", "recovered_fraction",
]
