"""Loading: aliases, the local Hugging Face cache, folders, GGUF, random init, and clear errors offline."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from sa_analysis.aliases import ALIASES, require_alias
from sa_analysis.errors import UserError
from sa_analysis.loading import DTYPES, load_model, resolve_dtype, spread_over_devices

REQUIRED_ALIASES = ["llama2-7b", "llama2-13b", "llama3-8b", "llama3.1-8b", "mistral-7b", "qwen2.5-7b", "gemma2-9b", "smollm2-135m"]


def place_in_hf_cache(model, cache, hub_id: str):
    """Save `model` as the local Hugging Face cache would hold a download of `hub_id`."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)


@pytest.mark.parametrize("name", REQUIRED_ALIASES)
def test_alias_configs_build_the_published_shape(name):
    from transformers import AutoConfig

    alias = require_alias(name)
    config = AutoConfig.for_model(**alias.config)
    assert config.num_hidden_layers == alias.config["num_hidden_layers"]
    assert "/" in alias.hub_id


def test_llama2_resolves_from_the_local_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    tiny = tiny_model("llama", dtype=torch.float32)
    place_in_hf_cache(tiny, tmp_path, ALIASES["llama2-7b"].hub_id)
    loaded = load_model("llama2-7b", device="cpu")
    assert loaded.info.source == "hf-cache" and loaded.info.name == "llama2-7b"
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, tiny(ids).logits)
    by_hub_id = load_model("meta-llama/Llama-2-7b-hf", device="cpu")
    assert by_hub_id.info.source == "hf-cache"


def test_absent_weights_say_where_we_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as err:
        load_model("llama2-7b", device="cpu")
    message = str(err.value)
    assert str(tmp_path) in message and "hf download meta-llama/Llama-2-7b-hf" in message
    with pytest.raises(UserError, match="No weights"):
        load_model("someorg/somemodel", device="cpu")


def test_local_folder_and_bad_specs(tmp_path):
    tiny = tiny_model("qwen2", dtype=torch.float32)
    tiny.save_pretrained(tmp_path / "qwen")
    loaded = load_model(str(tmp_path / "qwen"), device="cpu")
    assert loaded.info.architecture == "qwen2" and loaded.info.n_kv_heads == 2
    with pytest.raises(UserError, match="neither a known alias"):
        load_model("llama9", device="cpu")
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="does not hold a loadable"):
        load_model(str(tmp_path / "empty"), device="cpu")


def test_random_init_needs_an_alias():
    with pytest.raises(UserError, match="Unknown model alias"):
        load_model("not-an-alias", random_init=True, device="cpu")


def test_device_map_places_models_built_in_memory():
    """--device-map with --random-init goes through accelerate like from_pretrained(device_map=...) (CPU here)."""
    loaded = load_model("smollm2-135m", random_init=True, device="cpu", device_map="sequential")
    gpus = set(range(torch.cuda.device_count()))
    assert loaded.model.hf_device_map and set(loaded.model.hf_device_map.values()) <= {"cpu"} | gpus
    model = tiny_model("llama", dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
        spread = spread_over_devices(model, "auto", max_memory={"cpu": 10**9})
        torch.testing.assert_close(spread(ids).logits, ref)
    with pytest.raises(UserError, match="--device-map 'fastest' is not one of auto, balanced"):
        spread_over_devices(model, "fastest")


def test_dtypes_and_devices():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16 and "float64" in DTYPES
    with pytest.raises(UserError, match="Unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            load_model("smollm2-135m", device="cuda")


@pytest.mark.slow
def test_default_model_from_its_packaged_gguf(default_model):
    info = default_model.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (30, 9, 3, 64)
    assert info.source == "packaged-gguf" and default_model.tokenizer is not None
    ids = default_model.tokenizer("def main():\n    return 0", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = default_model.model(ids).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_the_first_load_of_a_gguf_is_the_cached_floats_that_the_trainer_accepts(tmp_path, monkeypatch, default_model):
    """The first use dequantises into an empty cache; the model it returns must be what later loads return (a model
    loaded from the GGUF itself still says it is quantized, and the Trainer refuses to fine-tune it)."""
    from transformers.trainer_utils import validate_quantization_for_training

    from sa_analysis.loading import load_model

    from sa_analysis.gguf_files import UNFAITHFUL

    monkeypatch.setenv("SA_ANALYSIS_CACHE", str(tmp_path))
    first = load_model("smollm2-135m", device="cpu", dtype="float32")
    # its tokenizer reloads faithfully, so the saved copy is kept (a copy that does not is dropped: the test below)
    assert list(tmp_path.rglob("tokenizer_config.json")) and not list(tmp_path.rglob(UNFAITHFUL))
    assert not getattr(first.model, "is_quantized", False)
    validate_quantization_for_training(first.model)  # raises for a model that says it is quantized
    again = load_model("smollm2-135m", device="cpu", dtype="float32")
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_gguf_cache_key_follows_the_content_not_the_path(tmp_path):
    """Another virtual environment's copy of the same packaged file finds the same dequantised cache."""
    from sa_analysis.gguf_files import _file_key

    data = bytes(range(256)) * 40000  # ~10 MB: past the hashed head
    a, b, c = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c.gguf"
    for path, content in ((a, data), (b, data), (c, data + b"x")):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
    assert _file_key(a) == _file_key(b)
    assert _file_key(a) != _file_key(c)  # same head, another size
    c.write_bytes(b"y" + data[1:])
    assert _file_key(a) != _file_key(c)  # same size, another head


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    from sa_analysis.io import write_json

    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_a_near_miss_alias_gets_a_suggestion():
    from sa_analysis.loading import load_model

    with pytest.raises(UserError, match=r"did you mean llama2-7b\?"):
        load_model("llama2-7", random_init=True)
    with pytest.raises(UserError, match=r"did you mean smollm2-135m\?"):
        load_model("smolm2-135m")
    with pytest.raises(UserError) as far:
        load_model("zzz")
    assert "did you mean" not in str(far.value)


def test_a_folder_without_tokenizer_files_gets_no_empty_tokenizer(tmp_path):
    """transformers builds a tokenizer with an empty vocabulary from config.json alone (seen for Gemma 3); a folder
    without tokenizer files must come back without one, so the default text is tokenised by the default tokenizer."""
    from conftest import tiny_model
    from sa_analysis.loading import load_model

    tiny_model("gemma3_text").save_pretrained(tmp_path / "m")
    assert load_model(str(tmp_path / "m"), device="cpu").tokenizer is None


def test_a_saved_tokenizer_that_reloads_differently_is_not_kept(tmp_path, monkeypatch, default_tokenizer):
    """transformers 5.17 saves Gemma-3's GGUF tokenizer in a form that reloads as one token per character: the cache
    must keep only a copy that encodes as the converted tokenizer does, else convert at every load."""
    from sa_analysis import gguf_files
    from sa_analysis.aliases import require_alias

    class PerCharacter:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    real = gguf_files._from_pretrained
    conversions = []

    def reload_wrongly(*args, **kwargs):
        if kwargs.get("local_files_only"):
            return PerCharacter()
        conversions.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_files, "_from_pretrained", reload_wrongly)
    path = gguf_files.packaged_gguf_path(require_alias("smollm2-135m"))
    first = gguf_files.cached_gguf_tokenizer(path, tmp_path)
    second = gguf_files.cached_gguf_tokenizer(path, tmp_path)
    probe = gguf_files.PROBE_TEXT
    assert len(conversions) == 2  # nothing faithful was cached: the GGUF was converted both times
    assert [f for f in tmp_path.rglob(gguf_files.UNFAITHFUL)] and not list(tmp_path.rglob("tokenizer_config.json"))
    for tokenizer in (first, second):
        assert tokenizer(probe, add_special_tokens=False)["input_ids"] == default_tokenizer(probe, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("class_name, version, refused", [
    ("GemmaTokenizer", "5.17.0", True), ("GemmaTokenizerFast", "5.23.1", True), ("GemmaTokenizer", "5.24.0", False),
    ("Qwen2Tokenizer", "5.17.0", False),
])
def test_gguf_tokenizers_a_release_converts_wrongly_are_refused(monkeypatch, class_name, version, refused):
    from importlib import metadata

    from sa_analysis import compat

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: version if name == "transformers" else real(name))
    tokenizer = type(class_name, (), {})()
    if refused:
        with pytest.raises(UserError, match=r"install transformers>=5\.24\.0"):
            compat.check_gguf_tokenizer(tokenizer)
    else:
        compat.check_gguf_tokenizer(tokenizer)


def test_a_refused_gguf_tokenizer_leaves_no_cache(tmp_path, monkeypatch):
    """The release check sits where every GGUF tokenizer is made, before anything is saved."""
    from importlib import metadata

    from sa_analysis import gguf_files

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "5.17.0" if name == "transformers" else real(name))
    monkeypatch.setattr(gguf_files, "_from_pretrained", lambda *args, **kwargs: type("GemmaTokenizer", (), {})())
    with pytest.raises(UserError, match=r"install transformers>=5\.24\.0"):
        gguf_files.cached_gguf_tokenizer(tmp_path / "gemma.gguf", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
