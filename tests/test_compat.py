"""The dependency adapter: tested ranges (stated once, warned about once), both KV-cache keyword spellings, and no
deprecation noise from our own calls on the installed transformers release."""

from __future__ import annotations

import logging
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from sa_analysis import compat
from sa_analysis.patch import SharedAttention, share_attention

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _pyproject_ranges() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d.split(">=")[0].strip(): d.split(">=")[1].strip() for d in deps if ">=" in d}


def test_pyproject_states_the_tested_ranges():
    ranges = _pyproject_ranges()
    for package, (low, high) in compat.TESTED_RANGES.items():
        assert ranges[package] == f"{low},<{high}", package


@pytest.mark.parametrize("version, inside", [
    ("5.0.0", True), ("5.24.0", True), ("5.24.9", True), ("4.57.6", False), ("5.25.0", False),
    ("5.25.0rc1", False), ("5.0.0rc3", False), ("6.0.0", False),
])
def test_in_range_reads_versions_as_pip_does(version, inside):
    assert compat.in_range(version, "5.0.0", "5.25") is inside


def test_one_warning_line_outside_the_tested_range(monkeypatch, caplog):
    versions = {package: low for package, (low, _) in compat.TESTED_RANGES.items()}
    versions["transformers"] = "5.99.0"
    low, high = compat.TESTED_RANGES["transformers"]
    monkeypatch.setattr(compat.metadata, "version", lambda name: versions[name])
    with caplog.at_level(logging.WARNING, logger="sa_analysis"):
        compat.check_versions()
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "\n" not in message and "transformers 5.99.0" in message and f">={low},<{high}" in message
    assert "accelerate" not in message and "peft" not in message


def test_no_warning_inside_the_tested_range(monkeypatch, caplog):
    lows = {package: low for package, (low, _) in compat.TESTED_RANGES.items()}
    monkeypatch.setattr(compat.metadata, "version", lambda name: lows[name])
    with caplog.at_level(logging.WARNING, logger="sa_analysis"):
        compat.check_versions()
    assert caplog.records == []


def test_importing_the_package_warns_on_an_untested_release(tmp_path):
    """A fake `transformers` distribution outside the range, seen by a fresh interpreter, gives one stderr line."""
    import subprocess

    dist = tmp_path / "transformers-9.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 9.0.0\n")
    code = "import sa_analysis"
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    low, high = compat.TESTED_RANGES["transformers"]
    assert lines == [f"sa-analysis was not tested with transformers 9.0.0 (tested >={low},<{high}); results may differ."]


@pytest.mark.parametrize("spelling", compat.CACHE_KEYWORDS)
def test_cache_from_kwargs_takes_either_spelling(spelling):
    kwargs = {spelling: "the cache", "position_ids": None}
    assert compat.cache_from_kwargs(kwargs) == "the cache"
    assert kwargs == {"position_ids": None}


def test_cache_keyword_is_the_installed_releases():
    import transformers

    model = tiny_model("llama")
    expected = "cache" if compat.in_range(transformers.__version__, "5.24", "99") else "past_key_values"
    assert compat.cache_keyword(model) == expected


@pytest.mark.parametrize("spelling", compat.CACHE_KEYWORDS)
def test_follower_uses_the_cache_under_either_keyword(spelling):
    """A follower called with `cache=` or `past_key_values=` stores its values; a prefix then a step equals the whole."""
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with share_attention(model, {2: 1, 3: 1}), torch.no_grad():
        whole = model(input_ids=ids, use_cache=False).logits[:, -1]
        follower = model.model.layers[2].self_attn
        assert isinstance(follower, SharedAttention)
        calls = []
        original = follower.forward

        def spy(*args, **kwargs):  # the decoder layer's call, re-sent under the spelling this test checks
            cache = compat.cache_from_kwargs(kwargs)
            calls.append(cache is not None)
            return original(*args, **{spelling: cache}, **kwargs)

        follower.forward = spy
        cache = compat.new_cache(model)
        model(input_ids=ids[:, :-1], **compat.cache_kwargs(model, cache), use_cache=True)
        step = model(input_ids=ids[:, -1:], **compat.cache_kwargs(model, cache), use_cache=True).logits[:, -1]
        del follower.forward
    assert calls == [True, True]
    torch.testing.assert_close(step, whole, rtol=0, atol=1e-10)


def test_no_deprecation_warning_from_our_calls():
    """Patched generate(), a cached forward and the validation speed helpers raise no FutureWarning/DeprecationWarning."""
    from sa_analysis.validate.speed import decode, prefill

    model = tiny_model("gemma3_text", dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with share_attention(model, {2: 1, 3: 1}):
            model.generate(ids, max_new_tokens=3, do_sample=False)
            cache, token = prefill(model, ids)
            decode(model, cache, token, 2)


def test_the_gguf_conversion_bar_is_off_inside_and_back_after():
    import importlib

    module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    original = module.tqdm
    with compat.no_gguf_progress_bar():
        bar = module.tqdm(range(3))
        assert bar.disable
        bar.close()
    assert module.tqdm is original
