"""tff_sim.sweep: the sweep file is checked up front, finished runs are skipped, the report compares runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tff_sim import sweep

SWEEP = """
[sweep]
baselines = "{baselines}"
[base]
preset = "tiny"
rounds = 4
[[runs]]
name = "a"
server_optimizer = "adam"
server_lr = 0.01
[[runs]]
name = "b"
client_lr = 0.1
"""


def _write(tmp: Path, text: str) -> Path:
    path = tmp / "s.toml"
    path.write_text(text)
    return path


def test_bad_sweep_files_fail_before_any_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        sweep.load_sweep(_write(tmp_path, '[base]\n[[runs]]\nname = "a"\n[[runs]]\nname = "a"\n'))
    with pytest.raises(ValueError, match="server_optimizer"):
        sweep.load_sweep(_write(tmp_path, '[[runs]]\nname = "a"\nserver_optimizer = "rmsprop"\n'))
    with pytest.raises(ValueError, match="unknown config keys"):
        sweep.load_sweep(_write(tmp_path, '[[runs]]\nname = "a"\nlearning_rate = 1\n'))


def test_report_compares_runs_against_the_baselines(tmp_path: Path) -> None:
    baselines = tmp_path / "results.json"
    baselines.write_text(json.dumps({"rows": [{"model": "ngram-5", "split": "heldout", "top1_recall": 0.25,
                                               "top3_recall": 0.4}]}))
    base, runs, settings = sweep.load_sweep(_write(tmp_path, SWEEP.format(baselines=baselines)))
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    history = [{"round": 0, "eval_top1_recall": 0.05}, {"round": 1, "examples": 100},
               {"round": 2, "examples": 50, "eval_top1_recall": 0.2}, {"round": 3, "examples": 10},
               {"round": 4, "examples": 10, "eval_top1_recall": 0.26}]
    (out / "a" / "metrics.json").write_text(json.dumps(history))
    (out / "a" / "summary.json").write_text(json.dumps({"rounds_done": 4, "train_seconds": 9.5,
                                                        "final": {"heldout": {"top1_recall": 0.27, "top3_recall": 0.41}}}))
    assert sweep.finished(out / "a", 4) and not sweep.finished(out / "a", 5) and not sweep.finished(out / "b", 4)
    rows = sweep.collect(out, base, runs)
    assert [r["name"] for r in rows] == ["a", "b"]
    a, b = rows
    assert a["server_optimizer"] == "adam" and b["client_lr"] == 0.1 and b["rounds_done"] == 0
    assert (a["best_eval_top1"], a["best_eval_round"], a["client_examples"]) == (0.26, 4, 170)
    assert a["curve"] == [(0, 0, 0.05), (2, 150, 0.2), (4, 170, 0.26)]
    sweep.write_report(out, rows, [json.loads(baselines.read_text())["rows"][0]], "s.toml")
    text = (out / "sweep.md").read_text()
    assert "| a | adam | 0.01 |" in text and "| 27.00 | 41.00 | 1.080 | 26.00 (4) | 170 | 9.5 |" in text
    assert "| b |" in text and "| 0/4 |" in text and "ngram-5 25.00%" in text
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG" and (out / "sweep.csv").read_text().count("\n") == 3


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "docs" / "sweeps").glob("*.toml")),
                         ids=lambda p: p.name)
def test_the_documented_sweeps_are_valid(path: Path) -> None:
    """Every run of docs/sweeps/*.toml is a valid SimConfig: a typo fails here, not hours into a sweep."""
    base, runs, settings = sweep.load_sweep(path)
    assert runs and settings.get("out", "").startswith("artifacts/sweep/")
