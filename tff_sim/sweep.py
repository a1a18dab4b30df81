"""A documented hyperparameter sweep: run tff_sim configurations one after another, resumably,
and compare them in one report.

    .venv/bin/python -m tff_sim.sweep docs/sweeps/chitchat-small.toml            # runs what is not done
    .venv/bin/python -m tff_sim.sweep docs/sweeps/chitchat-small.toml --report   # only rewrite the report
    .venv/bin/python -m tff_sim.sweep docs/sweeps/chitchat-small.toml --only fedadam-lr1e-2

The sweep file (TOML) has a [base] table of SimConfig fields shared by every run, an optional
[sweep] table (out = the sweep folder, baselines = results.json of models.baselines), and one
[[runs]] table per configuration: `name` plus the fields it changes. Each run is
`python -m tff_sim --config <out>/<name>.json` in its own folder <out>/<name>, so a stopped
sweep resumes where it stopped (tff_sim resumes a run from its checkpoint; finished runs are
skipped). After every run, <out>/sweep.md, sweep.csv and sweep.png (held-out top-1 against
rounds and against client examples processed, one curve per run) are rewritten.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from tff_sim.config import SimConfig
from tff_sim.report import baseline_lines, cumulative_examples, load_baselines

ROOT = Path(__file__).resolve().parents[1]
_SHOWN = ("server_optimizer", "server_lr", "server_lr_schedule", "client_lr", "client_lr_decay", "dropout",
          "average_decay", "clients_per_round",
          "client_epochs", "batch_size", "max_examples_per_client", "rounds")


def load_sweep(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(base fields, [run fields incl. name], sweep settings); every run is validated as a SimConfig."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    base, runs, settings = dict(data.get("base", {})), list(data.get("runs", [])), dict(data.get("sweep", {}))
    names = [r.get("name") for r in runs]
    if not runs or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{path}: needs [[runs]] tables with unique, non-empty names")
    for run in runs:
        SimConfig.from_dict(run_fields(base, run))  # fail before hours of compute, not in the middle
    return base, runs, settings


def run_fields(base: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    return {**base, **{k: v for k, v in run.items() if k != "name"}}


def finished(folder: Path, rounds: int) -> bool:
    summary = folder / "summary.json"
    if not summary.exists():
        return False
    data = json.loads(summary.read_text())
    return data.get("rounds_done") == rounds and bool(data.get("final"))


def run_one(out: Path, name: str, fields: dict[str, Any], baselines: str | None) -> int:
    """tff_sim in a child process (its own log); Ctrl-C reaches it, it checkpoints and we stop too."""
    config = out / f"{name}.json"
    config.write_text(json.dumps({**fields, "output": str(out / name), "progress": False,
                                  "baselines": baselines or ""}, indent=2))
    with open(out / f"{name}.log", "ab") as log:
        child = subprocess.Popen([sys.executable, "-m", "tff_sim", "--config", str(config)], cwd=ROOT,
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
            child.wait()
            raise


def collect(out: Path, base: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: its settings, progress, final and best held-out recall, and its curve."""
    rows = []
    for run in runs:
        fields, folder = run_fields(base, run), out / run["name"]
        cfg = SimConfig.from_dict(fields)
        history = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else []
        summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
        evals = [r for r in history if r.get("eval_top1_recall") is not None]
        seen = cumulative_examples(history)
        best = max(evals, key=lambda r: r["eval_top1_recall"], default=None)
        final = (summary.get("final") or {}).get("heldout", {})
        rows.append({
            "name": run["name"], **{k: getattr(cfg, k) for k in _SHOWN},
            "rounds_done": max((r["round"] for r in history), default=0),
            "final_heldout_top1": final.get("top1_recall"), "final_heldout_top3": final.get("top3_recall"),
            "best_eval_top1": best["eval_top1_recall"] if best else None, "best_eval_round": best["round"] if best else None,
            "client_examples": seen.get(max(seen), 0) if seen else 0,
            "train_seconds": summary.get("train_seconds"),
            "curve": [(r["round"], seen.get(r["round"], 0), r["eval_top1_recall"]) for r in evals],
        })
    return rows


def write_report(out: Path, rows: list[dict[str, Any]], baselines: list[dict[str, Any]], source: str) -> None:
    fields = [k for k in rows[0] if k != "curve"]
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r[k] for k in fields} for r in rows)
    refs = baseline_lines(baselines, "heldout")
    kn = next((top1 for model, top1, _ in refs if model.startswith("ngram")), None)
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [f"# Sweep: {source}", "", "Held-out top-1 is the final evaluation on every held-out user's sentences "
             "(models.baselines' sample); 'best eval' is the periodic federated evaluation on a sample of them.", "",
             "| run | server opt | server lr | client lr | clients | epochs | batch | ex/client | rounds | "
             "held-out top-1 | top-3 | x KN | best eval top-1 (round) | client examples | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['final_heldout_top1'] / kn:.3f}" if kn and r["final_heldout_top1"] else "-"
        lines.append(
            f"| {r['name']} | {r['server_optimizer']} | {r['server_lr']:g}{_schedule_note(r)} | {r['client_lr']:g}{' (decayed)' if r.get('client_lr_decay') else ''}"
            f"{', dropout %g' % r['dropout'] if r.get('dropout') else ''}"
            f"{', served: average at decay %g' % r['average_decay'] if r.get('average_decay') else ''} | "
            f"{r['clients_per_round']} | "
            f"{r['client_epochs']} | {r['batch_size']} | {r['max_examples_per_client']} | {r['rounds_done']}/{r['rounds']} | "
            f"{pct(r['final_heldout_top1'])} | {pct(r['final_heldout_top3'])} | {ratio} | {pct(r['best_eval_top1'])} "
            f"({r['best_eval_round'] or '-'}) | {r['client_examples']:,} | {r['train_seconds'] or '-'} |")
    if refs:
        lines += ["", "Baselines (held-out): " + ", ".join(f"{m} {100 * t:.2f}%" for m, t, _ in refs)]
    lines += ["", "![curves](sweep.png)", ""]
    (out / "sweep.md").write_text("\n".join(lines))
    _plot(out / "sweep.png", rows, refs)


def _schedule_note(row: dict[str, Any]) -> str:
    """" (cosine)" after the server lr when the run decays it; nothing for the constant rate."""
    name = row.get("server_lr_schedule", "constant")
    return "" if name == "constant" else f" ({name})"


def _plot(path: Path, rows: list[dict[str, Any]], refs: list[tuple[str, float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    for i, r in enumerate(rows):
        if r["curve"]:
            rounds, seen, top1 = zip(*r["curve"])
            axes[0].plot(rounds, [100 * t for t in top1], "-", color=f"C{i % 10}", label=r["name"])
            axes[1].plot(seen, [100 * t for t in top1], "-", color=f"C{i % 10}", label=r["name"])
    for ax, xlabel in zip(axes, ("round", "client examples processed")):
        for j, (model, top1, _) in enumerate(refs):
            ax.axhline(100 * top1, color="gray", linestyle=("--", ":", "-.")[j % 3], label=f"{model}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 recall on held-out users (%)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tff_sim.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="the sweep's TOML file")
    ap.add_argument("--out", help="sweep folder (default: [sweep] out, else artifacts/sweep/<file stem>)")
    ap.add_argument("--only", action="append", help="run only this run name (repeatable)")
    ap.add_argument("--report", action="store_true", help="do not train: rewrite the report from the run folders")
    args = ap.parse_args(argv)
    from models import interrupts

    base, runs, settings = load_sweep(args.sweep)
    out = Path(args.out or settings.get("out") or Path("artifacts/sweep") / Path(args.sweep).stem)
    out.mkdir(parents=True, exist_ok=True)
    baselines_path = settings.get("baselines")
    interrupts.install()
    try:
        for run in runs:
            if args.report or (args.only and run["name"] not in args.only):
                continue
            fields = run_fields(base, run)
            if finished(out / run["name"], SimConfig.from_dict(fields).rounds):
                continue
            print(f"sweep: {run['name']} (log {out / (run['name'] + '.log')})", flush=True)
            code = run_one(out, run["name"], fields, baselines_path)
            print(f"sweep: {run['name']} exited {code}", flush=True)
            write_report(out, collect(out, base, runs), load_baselines(baselines_path), args.sweep)
    except BaseException as exc:
        code = interrupts.stop_code(exc)
        print("sweep: stopped; the same command resumes it", file=sys.stderr)
        return code
    write_report(out, collect(out, base, runs), load_baselines(baselines_path), args.sweep)
    print(f"sweep: report in {out / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
