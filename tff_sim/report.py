"""What a run leaves behind: metrics.csv/json per round, TensorBoard logs, PNG plots, report.md."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

# Columns of metrics.csv, in order (missing values are left empty).
COLUMNS = (
    "round", "clients", "examples", "tokens", "train_loss", "round_seconds", "server_lr", "clip",
    "eval_top1_recall", "eval_top3_recall", "eval_loss", "eval_tokens",
    "epsilon_rdp", "epsilon_pld",
)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    _atomic_write(path, json.dumps(_jsonable(value), indent=2, sort_keys=False) + "\n")


def write_metrics(out: Path, history: Sequence[dict[str, Any]]) -> None:
    """metrics.csv (fixed columns) and metrics.json (every key) from the whole history."""
    extra = sorted({k for row in history for k in row} - set(COLUMNS))
    columns = [*COLUMNS, *extra]
    tmp = out / "metrics.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: _fmt_csv(row.get(k)) for k in columns})
    os.replace(tmp, out / "metrics.csv")
    write_json(out / "metrics.json", list(history))


def _fmt_csv(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return value


class TensorBoard:
    """Scalars per round under <run>/tensorboard (tf.summary)."""

    def __init__(self, log_dir: Path, enabled: bool = True) -> None:
        self._writer = None
        if enabled:
            import tensorflow as tf

            self._tf = tf
            self._writer = tf.summary.create_file_writer(str(log_dir))

    def log(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            return
        step = int(row["round"])
        with self._writer.as_default(step=step):
            for key, value in row.items():
                if key == "round" or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    continue
                group = ("eval" if key.startswith("eval_") else "privacy" if key.startswith("epsilon") or key == "clip"
                         else "train")  # server_lr: train/server_lr
                self._tf.summary.scalar(f"{group}/{key}", value)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# --------------------------------------------------------------------------- baselines


def load_baselines(path: str | os.PathLike | None) -> list[dict[str, Any]]:
    """Rows of models.baselines' results.json ([{model, split, top1_recall, top3_recall, ...}]), or []."""
    if not path or not Path(path).is_file():
        return []
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = data.get("rows", data.get("results", [])) if isinstance(data, dict) else data
    return [r for r in rows if isinstance(r, dict) and "model" in r and "top1_recall" in r]


def baseline_lines(baselines: Iterable[dict[str, Any]], split: str) -> list[tuple[str, float, float]]:
    """[(model, top1, top3)] of the baselines measured on `split` (falling back to any split)."""
    rows = list(baselines)
    chosen = [r for r in rows if r.get("split") == split] or rows
    seen, out = set(), []
    for r in chosen:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        out.append((str(r["model"]), float(r["top1_recall"]), float(r.get("top3_recall", math.nan))))
    return out


# --------------------------------------------------------------------------- plots


def cumulative_examples(history: Sequence[dict[str, Any]]) -> dict[int, int]:
    """round -> training examples processed by all clients up to and including that round."""
    total, out = 0, {0: 0}
    for r in sorted((r for r in history if r.get("round") is not None), key=lambda r: r["round"]):
        total += int(r.get("examples") or 0)
        out[int(r["round"])] = total
    return out


def plot_all(out: Path, history: Sequence[dict[str, Any]], baselines: Sequence[dict[str, Any]]) -> list[Path]:
    """recall.png (with the baselines as horizontal lines), loss.png and, with DP, epsilon.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []

    def save(fig, ax, name: str, ylabel: str, title: str, outside_legend: bool = False, xlabel: str = "round") -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if outside_legend:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        else:
            ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(out / name)
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)

    evals = [r for r in history if r.get("eval_top1_recall") is not None]
    fig, ax = plt.subplots(figsize=(9, 4.4))
    if evals:
        rounds = [r["round"] for r in evals]
        ax.plot(rounds, [100 * r["eval_top1_recall"] for r in evals], "o-", color="C0", label="federated top-1")
        ax.plot(rounds, [100 * r["eval_top3_recall"] for r in evals], "s-", color="C1", label="federated top-3")
    styles = ["--", ":", "-."]
    for i, (model, top1, top3) in enumerate(baseline_lines(baselines, "heldout")):
        ax.axhline(100 * top1, color="C0", linestyle=styles[i % 3], alpha=0.7, label=f"{model} top-1")
        if math.isfinite(top3):
            ax.axhline(100 * top3, color="C1", linestyle=styles[i % 3], alpha=0.7, label=f"{model} top-3")
    save(fig, ax, "recall.png", "recall on held-out users (%)", "Next-word recall vs round (lines: baselines)",
         outside_legend=True)

    if evals:  # the same curve against the work the clients did: comparable across cohort sizes and caps
        seen = cumulative_examples(history)
        fig, ax = plt.subplots(figsize=(9, 4.4))
        xs = [seen[r["round"]] for r in evals]
        ax.plot(xs, [100 * r["eval_top1_recall"] for r in evals], "o-", color="C0", label="federated top-1")
        for i, (model, top1, _) in enumerate(baseline_lines(baselines, "heldout")):
            ax.axhline(100 * top1, color="C0", linestyle=styles[i % 3], alpha=0.7, label=f"{model} top-1")
        save(fig, ax, "recall_vs_examples.png", "top-1 recall on held-out users (%)",
             "Top-1 recall vs client examples processed (lines: baselines)", outside_legend=True,
             xlabel="client examples processed")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    trained = [r for r in history if r.get("train_loss") is not None]
    if trained:
        ax.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], color="C2", label="train (sampled clients)")
    if evals:
        ax.plot([r["round"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="C3", label="eval (held-out users)")
    save(fig, ax, "loss.png", "cross-entropy per token", "Loss vs round")

    lrs = [(r["round"], r["server_lr"]) for r in history if isinstance(r.get("server_lr"), (int, float))]
    if len({lr for _, lr in lrs}) > 1:  # a schedule: show it (a constant rate says nothing a plot would add)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(*zip(*lrs), color="C4", label="server learning rate")
        save(fig, ax, "server_lr.png", "learning rate", "Server learning rate vs round")

    if any(r.get("epsilon_rdp") is not None or r.get("epsilon_pld") is not None for r in history):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for key, label in (("epsilon_rdp", "RDP"), ("epsilon_pld", "PLD")):
            pts = [(r["round"], r[key]) for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=f"epsilon ({label})")
        save(fig, ax, "epsilon.png", "epsilon", "Privacy spent vs round")
    return made


# --------------------------------------------------------------------------- report.md


def _pct(value: Any) -> str:
    return f"{100 * float(value):.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, (int, float)):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return "-" if value is None else str(value)


def write_report(out: Path, summary: dict[str, Any], history: Sequence[dict[str, Any]],
                 baselines: Sequence[dict[str, Any]], plots: Sequence[Path]) -> Path:
    cfg = summary["config"]
    final = summary.get("final", {})
    lines = [f"# Federated training report: {cfg['dataset']}, preset {cfg['preset']}", ""]
    params = summary.get("model_parameters")
    params_text = f"{params:,}" if isinstance(params, int) else "?"
    algo = "DP-FedAvg (unweighted mean of clipped, noised updates)" if cfg["dp"] else "FedAvg (weighted by examples)"
    lines += [
        f"- Algorithm: {algo}, TFF {summary.get('tff_version', '?')}; server optimizer {cfg['server_optimizer']} "
        f"(lr {summary.get('server_lr_schedule') or cfg['server_lr']}), client SGD lr {cfg['client_lr']}"
        f"{' decayed with the server lr (no warmup)' if cfg.get('client_lr_decay') else ''}"
        f"{' with dropout %g' % cfg['dropout'] if cfg.get('dropout') else ''}",
        f"- Rounds: {summary['rounds_done']} of {cfg['rounds']}, {cfg['clients_per_round']} clients per round "
        f"({summary.get('sampling')} sampling), {cfg['client_epochs']} local epoch(s), batch {cfg['batch_size']}, "
        f"at most {cfg['max_examples_per_client']} examples per client per round",
        f"- Data: {summary['data']['train_clients']} training clients, {summary['data']['heldout_clients']} held-out "
        f"clients, vocabulary {summary['data']['vocab_size']} tokens; model {params_text} parameters",
        f"- Wall time: {summary['wall_seconds']:.1f} s (training rounds {summary.get('train_seconds', 0):.1f} s, "
        f"mean {summary.get('mean_round_seconds', 0):.2f} s per round)",
        f"- Seed: {cfg['seed']}; run folder: `{summary['output']}`; model: `{summary.get('model_path', '-')}`",
    ]
    if summary.get("resumed_from"):
        lines.append(f"- Resumed from the checkpoint of round {summary['resumed_from']}")
    if summary.get("workers"):  # --workers (tff_sim/workers.py)
        w = summary["workers"]
        lines.append(f"- Clients on {w['count']} TFF worker(s) ({', '.join(w['addresses'])}) for "
                     f"{w['rounds_on_workers']} rounds: {w['mean_bytes_to_workers'] / 1e6:.2f} MB to and "
                     f"{w['mean_bytes_from_workers'] / 1e6:.2f} MB from the workers per round (mean)")
    privacy = summary.get("privacy")
    if privacy:
        eps = privacy.get("final_epsilon", {})
        eps_text = ", ".join(f"{k.upper()} {_num(v, 3)}" for k, v in eps.items())
        calibrated = (f", calibrated for epsilon {privacy['calibrated_for']}" if privacy.get("calibrated_for") else "")
        lines += [
            "",
            "## Privacy",
            "",
            f"- Noise multiplier z = {privacy['noise_multiplier']:.4g}{calibrated}; sampling probability "
            f"q = {privacy['sampling_prob']:.4g}; delta = {privacy['delta']:.3g}"
            if privacy.get("mechanism", "dp-fedavg") != "dp-ftrl" else
            f"- DP-FTRL (tree aggregation, no sampling): noise multiplier z = {privacy['noise_multiplier']:.4g}"
            f"{calibrated}; each client at most once per epoch of {privacy['rounds_per_epoch']} rounds "
            f"({'tree restarted every epoch' if privacy['ftrl_rule'] == 'restart' else 'one tree, min separation'}); "
            f"delta = {privacy['delta']:.3g}",
            f"- Clipping: {'adaptive (target quantile ' + str(cfg['target_quantile']) + ')' if cfg['adaptive_clip'] else 'fixed'}, "
            f"clip {cfg['clip']}; noise source: {cfg['dp_noise']}",
            f"- User-level epsilon after {summary['rounds_done']} rounds: {eps_text}",
        ] + ([f"- Guarantee: {privacy['guarantee']}"] if privacy.get("guarantee") else [])
    lines += ["", "## Results (top-1 / top-3 recall of the next word, %)", "",
              "| model | split | top-1 | top-3 | perplexity | tokens |", "|---|---|---|---|---|---|"]
    averaged = summary.get("final_iterate") is not None  # --average-decay: the run's model is the average
    rows = [("federated (this run" + (f", average of the rounds' models at decay {summary['average_decay']:g})"
                                       if averaged else ")"), final)]
    if averaged:
        rows.append(("federated, the last round's model (not averaged)", summary["final_iterate"]))
    for name, results in rows:
        for split in ("test", "heldout"):
            m = results.get(split)
            if m:
                lines.append(f"| {name} | {split} | {_pct(m['top1_recall'])} | {_pct(m['top3_recall'])} | "
                             f"{_num(m.get('perplexity'), 1)} | {m.get('tokens', '-')} |")
    for r in baselines:
        lines.append(f"| {r['model']} (baseline) | {r.get('split', '-')} | {_pct(r['top1_recall'])} | "
                     f"{_pct(r.get('top3_recall'))} | {_num(r.get('perplexity'), 1)} | {r.get('tokens', '-')} |")
    lines += ["", "test = the training users' later messages (seen users); heldout = users never trained on.",
              "Gboard (Hard et al. 2018) reports federated 16.4 / 27.0 vs server-trained 16.5 / 27.1 on its own logs."]
    if summary.get("baselines_note"):
        lines += ["", summary["baselines_note"]]
    evals = [r for r in history if r.get("eval_top1_recall") is not None]
    if evals:
        seen = cumulative_examples(history)
        with_lr = any("server_lr" in r for r in evals)
        lines += ["", "## Learning curve: federated evaluation on held-out clients", "",
                  "| round | client examples processed | top-1 | top-3 | loss | epsilon |" + (" server lr |" if with_lr else ""),
                  "|---|---|---|---|---|---|" + ("---|" if with_lr else "")]
        for r in evals:
            eps = r.get("epsilon_rdp", r.get("epsilon_pld"))
            lr = (f" {r['server_lr']:.4g} |" if isinstance(r.get("server_lr"), (int, float)) else " - |") if with_lr else ""
            lines.append(f"| {r['round']} | {seen.get(r['round'], 0):,} | {_pct(r['eval_top1_recall'])} | "
                         f"{_pct(r['eval_top3_recall'])} | {_num(r.get('eval_loss'))} | {_num(eps) if eps is not None else '-'} |"
                         + lr)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Configuration", "", "```json", json.dumps(_jsonable(cfg), indent=2, sort_keys=True), "```", ""]
    path = out / "report.md"
    _atomic_write(path, "\n".join(lines))
    return path
