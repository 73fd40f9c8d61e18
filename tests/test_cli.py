"""The `sa-analyze heatmap` command: the real default model end to end, redraws, and every user mistake.

A user mistake must give one sentence on stderr, exit code 1 and no partial file.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from sa_analysis.report import AttentionReport

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, fragment: str, out_dir=None):
    assert result.exit_code == 1, result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    if out_dir is not None and out_dir.exists():
        assert list(out_dir.iterdir()) == [], f"partial files left: {list(out_dir.iterdir())}"


def test_help_reads_well():
    result = run("--help")
    assert result.exit_code == 0 and "heatmap" in result.output
    result = run("heatmap", "--help")
    for flag in ("--model", "--device", "--dtype", "--text", "--n-seqs", "--seq-len", "--out", "--report", "--exclude-first"):
        assert flag in result.output


@pytest.mark.slow
def test_heatmap_on_the_default_model_then_redraw(tmp_path, default_model):
    out = tmp_path / "run"
    result = run("heatmap", "--n-seqs", 2, "--seq-len", 32, "--out", out, "--pdf")
    assert result.exit_code == 0, result.output
    for name in ("report.json", "report.npz", "heatmap_kl.png", "heatmap_cosine_flat.png", "isotropy.png", "head_grid.png", "heatmaps.pdf"):
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in result.output.replace("\n", "")
    report = AttentionReport.load(out / "report.json")
    assert report.meta["model"]["name"] == "smollm2-135m" and report.meta["data"]["n_tokens"] == 64
    assert report.array("kl_mean").shape == (30, 9, 30, 9)
    again = tmp_path / "redraw"
    result = run("heatmap", "--report", out / "report.json", "--out", again)
    assert result.exit_code == 0, result.output
    assert (again / "heatmap_kl.png").is_file()
    assert not list(out.glob(".*")), "temporary files left behind"


def test_missing_model(tmp_path):
    out = tmp_path / "o"
    assert_user_error(run("heatmap", "--model", tmp_path / "nowhere.gguf", "--out", out), "does not exist", out)


def test_unknown_alias(tmp_path):
    out = tmp_path / "o"
    assert_user_error(run("heatmap", "--model", "llama9-70b", "--out", out), "neither a known alias", out)


def test_unknown_device_map_is_refused_before_building(tmp_path):
    out = tmp_path / "o"
    result = run("heatmap", "--model", "llama2-7b", "--random-init", "--device-map", "fastest", "--out", out)
    assert_user_error(result, "--device-map 'fastest' is not one of auto, balanced, balanced_low_0, sequential", out)


def test_alias_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "o"
    assert_user_error(run("heatmap", "--model", "llama2-7b", "--out", out), "hf download", out)


@pytest.mark.slow
def test_empty_text_file(tmp_path, default_model):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "o"
    assert_user_error(run("heatmap", "--text", empty, "--out", out), "contains no text", out)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    assert_user_error(run("heatmap", "--text", short, "--out", out), "fewer than", out)


@pytest.mark.slow
def test_seq_len_too_long(tmp_path, default_model):
    out = tmp_path / "o"
    assert_user_error(run("heatmap", "--seq-len", 9000, "--out", out), "longer than this model's context", out)


def test_unreadable_report(tmp_path):
    bad = tmp_path / "report.json"
    bad.write_text("{not json")
    out = tmp_path / "o"
    assert_user_error(run("heatmap", "--report", bad, "--out", out), "could not be read", out)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something else"}))
    assert_user_error(run("heatmap", "--report", other, "--out", out), "not an sa-analysis attention report", out)
    assert_user_error(run("heatmap", "--report", tmp_path / "absent.json", "--out", out), "does not exist", out)


def test_output_folder_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_user_error(run("heatmap", "--out", blocker / "sub"), "not writable")


# ----- wrong inputs: one sentence, exit 1, nothing left behind --------------------------------------------------
def test_a_mistyped_model_leaves_no_folder(tmp_path):
    out = tmp_path / "sa-output" / "typo"
    result = run("heatmap", "--model", "typo-model", "--out", out)
    assert result.exit_code == 1 and "neither a known alias" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "sa-output").exists()


def test_a_missing_model_path_is_called_missing(tmp_path):
    result = run("heatmap", "--model", str(tmp_path / "no" / "such" / "folder"), "--out", tmp_path / "o")
    assert result.exit_code == 1 and "does not exist" in result.output and not (tmp_path / "o").exists()


def test_a_binary_text_file_is_refused(tmp_path):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    result = run("heatmap", "--text", binary, "--out", tmp_path / "o")
    assert result.exit_code == 1 and "is not text" in result.output and not (tmp_path / "o").exists()


def test_an_existing_file_as_out_is_refused(tmp_path):
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    result = run("heatmap", "--out", target)
    assert result.exit_code == 1 and "is a file, not a folder" in result.output and target.read_text() == "mine"


@pytest.mark.parametrize("damage", ["truncated npz", "no model in the header", "npz of other arrays"])
def test_a_damaged_report_is_one_sentence_and_writes_nothing(tmp_path, damage):
    import numpy as np

    report = tmp_path / "r" / "report.json"
    report.parent.mkdir()
    header = {"format": "sa-analysis/attention-report", "version": 1, "arrays": "report.npz",
              "model": {"name": "m", "n_layers": 2, "n_heads": 1}}
    np.savez(report.with_suffix(".npz"), kl_layers=np.zeros((1, 2, 2)))
    if damage == "truncated npz":
        data = report.with_suffix(".npz").read_bytes()
        report.with_suffix(".npz").write_bytes(data[: len(data) // 2])
    elif damage == "no model in the header":
        del header["model"]
    else:
        np.savez(report.with_suffix(".npz"), something_else=np.zeros(3))
    report.write_text(json.dumps(header))
    before = {p.name for p in report.parent.iterdir()}
    for command in (["heatmap", "--report", report, "--out", tmp_path / "o1"],
                    ["recommend-spans", "--report", report, "--out", tmp_path / "o2"]):
        result = run(*command)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "re-run `sa-analyze heatmap`" in result.output or "written with its .json" in result.output
    assert {p.name for p in report.parent.iterdir()} == before
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_bad_spans_are_answered_before_any_model_loads(tmp_path):
    """The spans are checked first: with a model that does not exist, the answer is still about the spans."""
    for command in ("validate", "heal"):
        result = run(command, "--spans", "abc", "--model", "typo-model", "--out", tmp_path / command)
        assert result.exit_code == 1 and "span 'abc'" in result.output, result.output
        assert not (tmp_path / command).exists()


def test_a_malformed_command_line_exits_2():
    result = run("heatmap", "--n-seqs", "0")  # out of the option's range: click's usage error
    assert result.exit_code == 2


def test_config_mistakes_are_answered_before_the_model_loads(tmp_path, monkeypatch):
    """A span past the last layer and a --seq-len past the context come from the config (here: the alias's)."""
    import sa_analysis.shared_model as shared_model

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(shared_model, "load_model", no_loading, raising=False)
    import sa_analysis.loading as loading

    monkeypatch.setattr(loading, "_load_model", no_loading)
    out = tmp_path / "o"
    assert_user_error(run("validate", "--spans", "28-31", "--out", out), "past the last layer (29)", out)
    assert_user_error(run("heatmap", "--seq-len", 9000, "--out", out), "longer than this model's context", out)
    assert_user_error(run("validate", "--spans", "24-26", "--seq-len", 9000, "--out", out), "longer than this model's context", out)
    assert not out.exists()


def test_mistakes_that_need_no_model_are_answered_without_torch(tmp_path):
    """The light checks run before torch is imported (what makes a typo's answer come in a fraction of a second)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from typer.testing import CliRunner; from cli.main import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); print(r.exit_code, 'torch' in sys.modules)")
    wrong_map = tmp_path / "plan.json"  # a head map for 2 query heads; the default model has 9
    wrong_map.write_text(json.dumps({"format": "sa-analysis/share-plan", "version": 1, "n_layers": 30, "followers": [24],
                                     "head_map": {"24": [0, 1]}}))
    for args in (["heatmap", "--seq-len", "9000"], ["validate", "--spans", "28-31"], ["heal", "--spans", "abc"],
                 ["heatmap", "--text", str(tmp_path / "missing.txt")], ["validate", "--plan", str(wrong_map)],
                 ["heatmap", "--rows", "lots"], ["recommend-spans", "--rows", "200", "--seq-len", "256"],
                 ["frontier", "--budgets", "1-40"], ["frontier", "--other-text", "pythn-source"],
                 ["frontier", "--heal-steps", "3", "--heal-data", str(tmp_path / "missing.jsonl")],
                 ["heal", "--spans", "3-4", "--data", str(tmp_path / "missing.jsonl")],
                 ["heal", "--spans", "3-4", "--text", "pythn-source"]):
        done = subprocess.run([sys.executable, "-c", code, *args, "--out", str(tmp_path / "o")], cwd=root,
                              capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == ["1", "False"], (args, done.stdout, done.stderr)
    assert not (tmp_path / "o").exists()


def test_a_report_redrawn_for_another_model_is_refused(tmp_path):
    import numpy as np

    report = tmp_path / "report.json"
    np.savez(report.with_suffix(".npz"), kl_layers=np.zeros((1, 2, 2)))
    report.write_text(json.dumps({"format": "sa-analysis/attention-report", "version": 1, "arrays": "report.npz",
                                  "model": {"name": "smollm2-135m", "spec": "smollm2-135m", "n_layers": 2, "n_heads": 1}}))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_user_error(run("heatmap", "--report", report, "--model", "llama2-7b"), "does not match the report's model")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("args, fragment", [
    (["--rows", "lots"], "is not auto, all or a number of rows"),
    (["--rows", "10"], "too few to sample: use at least 64 rows"),
    (["--rows", "200", "--seq-len", "256"], "half or more of the 256 query rows"),
    (["--rows", "96", "--path", "maps"], "only the streaming path does; drop --path maps"),
])
def test_wrong_rows_are_one_sentence_before_any_model_loads(tmp_path, args, fragment):
    out = tmp_path / "o"
    assert_user_error(run("heatmap", *args, "--out", out), fragment, out)
    assert not out.exists()
