"""The status page: plain HTML with server-rendered SVG charts (no JavaScript, nothing from the internet).

Shows rounds over time, participants and dropouts per round, model versions, recall (evaluation
rounds and devices' local training metrics) and the cumulative epsilon, and release gating: the version
awaiting its evaluation, held-back versions with the reason, why training stopped. Counts only, never content.
"""
from __future__ import annotations

import datetime
import html
import math
from typing import Any, Iterable, Sequence

COLORS = {"accepted": "#2e7d32", "dropouts": "#ef6c00", "abandoned": "#9e9e9e", "candidate": "#1565c0",
          "baseline": "#6a1b9a", "local": "#00838f", "epsilon": "#c62828", "version": "#37474f",
          "closed": "#2e7d32"}

W, H = 640, 240
ML, MR, MT, MB = 56, 16, 28, 40  # margins


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float, time_axis: bool = False) -> str:
    if time_axis:
        return datetime.datetime.fromtimestamp(v).strftime("%H:%M:%S")
    if abs(v) >= 1000 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.3g}"


class _Frame:
    def __init__(self, xs: Sequence[float], ys: Sequence[float], y_zero: bool = True) -> None:
        self.x0, self.x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
        if self.x1 == self.x0:
            self.x0, self.x1 = self.x0 - 1, self.x1 + 1
        lo = min(ys) if ys else 0.0
        hi = max(ys) if ys else 1.0
        if y_zero:
            lo = min(0.0, lo)
        if hi == lo:
            hi = lo + 1.0
        hi += (hi - lo) * 0.18  # headroom for the legend
        self.yticks = _nice_ticks(lo, hi)
        self.y0, self.y1 = (min(self.yticks[0], lo), max(self.yticks[-1], hi)) if self.yticks else (lo, hi)

    def x(self, v: float) -> float:
        return ML + (v - self.x0) / (self.x1 - self.x0) * (W - ML - MR)

    def y(self, v: float) -> float:
        return H - MB - (v - self.y0) / (self.y1 - self.y0) * (H - MT - MB)


def _axes(f: _Frame, title: str, x_label: str, y_label: str, time_axis: bool, xticks: Iterable[float] | None = None) -> list[str]:
    out = [f'<text x="{W / 2}" y="16" text-anchor="middle" class="title">{_esc(title)}</text>',
           f'<line x1="{ML}" y1="{H - MB}" x2="{W - MR}" y2="{H - MB}" class="axis"/>',
           f'<line x1="{ML}" y1="{MT}" x2="{ML}" y2="{H - MB}" class="axis"/>']
    for t in f.yticks:
        y = f.y(t)
        out.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{W - MR}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{ML - 4}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_esc(_fmt(t))}</text>')
    ticks = list(xticks) if xticks is not None else _nice_ticks(f.x0, f.x1, 6)
    for t in ticks:
        if f.x0 <= t <= f.x1:
            x = f.x(t)
            out.append(f'<line x1="{x:.1f}" y1="{H - MB}" x2="{x:.1f}" y2="{H - MB + 4}" class="axis"/>')
            out.append(f'<text x="{x:.1f}" y="{H - MB + 16}" text-anchor="middle" class="tick">'
                       f'{_esc(_fmt(t, time_axis))}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 6}" text-anchor="middle" class="label">{_esc(x_label)}</text>')
    out.append(f'<text x="14" y="{H / 2}" text-anchor="middle" class="label" '
               f'transform="rotate(-90 14 {H / 2})">{_esc(y_label)}</text>')
    return out


def _legend(items: Sequence[tuple[str, str]]) -> list[str]:
    out, x = [], ML + 8
    for label, color in items:
        out.append(f'<rect x="{x}" y="{MT + 2}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + 14}" y="{MT + 11}" class="tick">{_esc(label)}</text>')
        x += 22 + 7 * len(label)
    return out


def _svg(body: list[str], chart_id: str, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" id="{_esc(chart_id)}" class="chart" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" role="img" aria-label="{_esc(title)}"><title>{_esc(title)}</title>'
            + "".join(body) + "</svg>")


def _empty(chart_id: str, title: str) -> str:
    return _svg([f'<text x="{W / 2}" y="16" text-anchor="middle" class="title">{_esc(title)}</text>',
                 f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="tick">no data yet</text>'], chart_id, title)


def line_chart(chart_id: str, title: str, series: Sequence[tuple[str, str, Sequence[tuple[float, float]]]],
               x_label: str, y_label: str, *, step: bool = False, time_axis: bool = False, y_zero: bool = True) -> str:
    """One SVG with a polyline and point markers per (label, color, points) series."""
    points = [p for _, _, pts in series for p in pts if math.isfinite(p[1])]
    if not points:
        return _empty(chart_id, title)
    f = _Frame([p[0] for p in points], [p[1] for p in points], y_zero)
    body = _axes(f, title, x_label, y_label, time_axis)
    for label, color, pts in series:
        pts = sorted(p for p in pts if math.isfinite(p[1]))
        if not pts:
            continue
        coords = []
        for i, (x, y) in enumerate(pts):
            if step and i:
                coords.append(f"{f.x(x):.1f},{f.y(pts[i - 1][1]):.1f}")
            coords.append(f"{f.x(x):.1f},{f.y(y):.1f}")
        body.append(f'<polyline points="{" ".join(coords)}" fill="none" stroke="{color}" stroke-width="2" '
                    f'class="series" data-series="{_esc(label)}"/>')
        for x, y in pts:
            body.append(f'<circle cx="{f.x(x):.1f}" cy="{f.y(y):.1f}" r="2.5" fill="{color}">'
                        f'<title>{_esc(label)}: {_esc(_fmt(y))}</title></circle>')
    body += _legend([(label, color) for label, color, pts in series if pts])
    return _svg(body, chart_id, title)


def stacked_bar_chart(chart_id: str, title: str, xs: Sequence[float],
                      stacks: Sequence[tuple[str, str, Sequence[float]]], x_label: str, y_label: str) -> str:
    if not xs:
        return _empty(chart_id, title)
    totals = [sum(s[2][i] for s in stacks) for i in range(len(xs))]
    f = _Frame([min(xs) - 0.5, max(xs) + 0.5], totals + [0.0])
    step = max(1, math.ceil(len(xs) / 10))
    body = _axes(f, title, x_label, y_label, False, xticks=list(xs)[::step])
    bar_w = max(1.0, (W - ML - MR) / max(1, len(xs) + 1) * 0.7)
    for i, x in enumerate(xs):
        base = 0.0
        for label, color, values in stacks:
            v = values[i]
            if v <= 0:
                continue
            y_top, y_bot = f.y(base + v), f.y(base)
            body.append(f'<rect x="{f.x(x) - bar_w / 2:.1f}" y="{y_top:.1f}" width="{bar_w:.1f}" '
                        f'height="{max(0.5, y_bot - y_top):.1f}" fill="{color}" class="bar" data-series="{_esc(label)}">'
                        f'<title>round {_esc(_fmt(x))} {_esc(label)}: {_esc(_fmt(v))}</title></rect>')
            base += v
    body += _legend([(label, color) for label, color, _ in stacks])
    return _svg(body, chart_id, title)


def _recall_key(metrics: dict[str, float]) -> str | None:
    for key in ("top1_recall", "recall", "top3_recall"):
        if key in metrics:
            return key
    return next((k for k in sorted(metrics) if "recall" in k), None)


def _release_rows(release: dict[str, Any]) -> list[tuple[str, Any]]:
    """Summary rows of release gating (server/versions.py ModelVersions.release_status)."""
    if not release:
        return []
    if release.get("gate") != "eval":
        return [("Release gate", "off: each trained version is served at once")]
    limit = release.get("max_rejected_versions") or 0
    return [("Release gate", "eval: each trained version is evaluated against the served one first"),
            ("Awaiting evaluation", f"version {release['awaiting_evaluation']}"
             if release.get("awaiting_evaluation") is not None else "none"),
            ("Held back in a row", f"{release.get('consecutive_held_back', 0)}"
             + (f" (training stops at {limit})" if limit else ""))]


def _version_state(v: dict[str, Any]) -> str:
    """The versions table's state: the release state where the listing has it (admin_routes adds it)."""
    state = v.get("release_state")
    if state is not None:
        return "global" if state == "served" else state.replace("_", " ")
    return "global" if v["is_global"] else ("candidate" if v["is_candidate"] else (v["candidate_state"] or ""))


def render(status: dict[str, Any], rounds: list[dict[str, Any]], versions: list[dict[str, Any]]) -> str:
    """The whole page. `rounds` are round summaries (any order), `versions` from list_versions()."""
    rounds = sorted(rounds, key=lambda r: r["id"])
    train = [r for r in rounds if r["kind"] == "train" and r["state"] in ("closed", "abandoned")]
    evals = [r for r in rounds if r["kind"] == "eval" and r["state"] == "closed" and r["outcome"]
             and "candidate" in r["outcome"]]

    # rounds over time: cumulative finished rounds by outcome
    closed_pts, abandoned_pts, n_c, n_a = [], [], 0, 0
    for r in sorted((r for r in rounds if r["closed_at"]), key=lambda r: r["closed_at"]):
        if r["state"] == "closed":
            n_c += 1
            closed_pts.append((r["closed_at"], n_c))
        elif r["state"] == "abandoned":
            n_a += 1
            abandoned_pts.append((r["closed_at"], n_a))
    chart_rounds = line_chart("chart-rounds", "Rounds over time (cumulative)",
                              [("closed", COLORS["closed"], closed_pts), ("abandoned", COLORS["abandoned"], abandoned_pts)],
                              "time", "rounds", step=True, time_axis=True)

    xs = [r["id"] for r in train]
    chart_participants = stacked_bar_chart(
        "chart-participants", "Participants per training round", xs,
        [("aggregated", COLORS["accepted"], [r["accepted"] if r["state"] == "closed" else 0 for r in train]),
         ("dropouts", COLORS["dropouts"], [(r["dropouts"] or 0) if r["state"] == "closed" else 0 for r in train]),
         ("abandoned round", COLORS["abandoned"], [r["admitted"] if r["state"] == "abandoned" else 0 for r in train])],
        "round", "devices")

    version_pts = [(v["created_at"], v["version"]) for v in versions if v["was_global"]]
    chart_versions = line_chart("chart-versions", "Global model versions", [("version", COLORS["version"], version_pts)],
                                "time", "version", step=True, time_axis=True)

    cand_pts = [(r["id"], r["outcome"]["candidate"]["recall"]) for r in evals]
    base_pts = [(r["id"], r["outcome"]["baseline"]["recall"]) for r in evals]
    local_pts = []
    for r in train:
        metrics = (r["outcome"] or {}).get("local_metrics") or {}
        key = _recall_key(metrics)
        if r["state"] == "closed" and key:
            local_pts.append((r["id"], metrics[key]))
    chart_recall = line_chart("chart-recall", "Recall", [("candidate (eval)", COLORS["candidate"], cand_pts),
                                                         ("baseline (eval)", COLORS["baseline"], base_pts),
                                                         ("devices' local (train)", COLORS["local"], local_pts)],
                              "round", "recall")

    eps_pts = [(r["id"], r["epsilon"]) for r in train if r["state"] == "closed" and r["epsilon"] is not None]
    chart_eps = line_chart("chart-epsilon", "Cumulative epsilon", [("epsilon", COLORS["epsilon"], eps_pts)],
                           "round", "epsilon")

    privacy = status.get("privacy") or {}
    devices = status.get("devices") or {}
    cur = status.get("current_round") or {}
    release = status.get("release") or {}
    stopped = release.get("training_stopped_reason") or "stopped"  # the reason is a sentence: "stopped after ..."
    summary_rows = [
        ("Global model version", status.get("global_version")),
        ("Candidate", status.get("candidate_version") or "none"),
        ("Training", "running" if status.get("training_enabled") else stopped),
        *_release_rows(release),
        ("Registered devices", devices.get("registered")),
        ("Active devices (24 h)", devices.get("active_24h")),
        ("Current round", f"#{cur.get('id')} {cur.get('state')}: {cur.get('accepted')}/{cur.get('goal')} updates, "
                          f"{cur.get('admitted')} admitted" if cur else "none"),
        ("DP mode", privacy.get("dp_mode") + (f" ({privacy['mechanism']})" if privacy.get("mechanism") else "")
         if privacy.get("dp_mode") else None),
        ("Epsilon", f"{privacy.get('epsilon'):.4g} at delta {privacy.get('delta'):.3g} ({privacy.get('accountant')})"
         if privacy.get("epsilon") is not None else "n/a"),
        ("Secure aggregation", privacy.get("secure_aggregation") or "none"),
    ]
    if privacy.get("local_epsilon_per_upload") is not None:
        summary_rows.append(("Local epsilon per upload", f"{privacy['local_epsilon_per_upload']:.4g} "
                                                         f"({privacy.get('dp_mode')} noise, one device's upload alone)"))
    if privacy.get("guarantee"):
        summary_rows.append(("Guarantee", privacy["guarantee"]))
    summary = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in summary_rows)

    def fmt_time(t: float | None) -> str:
        return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""

    round_rows = []
    for r in reversed(rounds[-50:]):
        eps = "" if r["epsilon"] is None else f"{r['epsilon']:.4g}"
        outcome = r["outcome"] or {}
        cells = [r["id"], r["kind"], r["state"], r["base_version"], r["admitted"], r["accepted"],
                 "" if r["dropouts"] is None else r["dropouts"],
                 "" if r["result_version"] is None else r["result_version"], eps,
                 outcome.get("reason") or outcome.get("decision") or "", fmt_time(r["closed_at"])]
        round_rows.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    round_rows = "".join(round_rows)
    version_rows = "".join(
        f"<tr><td>{v['version']}</td><td>{_esc(v['source'])}</td>"
        f"<td>{'' if v['parent_version'] is None else v['parent_version']}</td>"
        f"<td>{_esc(_version_state(v))}</td>"
        f"<td>{fmt_time(v['created_at'])}</td><td>{_esc(v.get('release_reason') or v['note'] or '')}</td></tr>"
        for v in reversed(versions[-50:]))
    held = [v for v in versions if v.get("release_state") == "held_back"]
    held_rows = "".join(f"<tr><td>{v['version']}</td><td>{'' if v['parent_version'] is None else v['parent_version']}"
                        f"</td><td>{_esc(v.get('release_reason') or '')}</td><td>{fmt_time(v['created_at'])}</td></tr>"
                        for v in reversed(held[-50:]))
    held_table = (f'<h2>Held-back versions</h2>\n<table id="held-back"><tr><th>version</th><th>trained from</th>'
                  f'<th>reason</th><th>created</th></tr>{held_rows}</table>' if held else "")

    telemetry = status.get("telemetry") or {}
    tele_rows = []
    for q, est in sorted((telemetry.get("questions") or {}).items()):
        if est.get("rate") is None:
            cells = [q, est.get("reports", 0), "", "", ""]
        else:
            cells = [q, est["reports"], f"{est['yes_rate']:.3f}", f"{est['rate']:.3f}",
                     f"[{est['ci_low']:.3f}, {est['ci_high']:.3f}]"]
        tele_rows.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    coins = telemetry.get("coins") or {}
    tele_note = (f"Randomized response: truth with probability {coins.get('p_first')}, else yes with probability "
                 f"{coins.get('p_second')}; local epsilon per answer {telemetry.get('local_epsilon', 0):.4g}"
                 if coins else "")
    tele_rows = "".join(tele_rows)

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="15">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Federated keyboard: aggregation server</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #212121; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 1.5em; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; font-size: 0.9em; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 12px; }}
svg.chart {{ border: 1px solid #e0e0e0; background: #fff; }}
svg .title {{ font-size: 13px; font-weight: 600; }} svg .tick {{ font-size: 10px; fill: #555; }}
svg .label {{ font-size: 11px; fill: #333; }} svg .axis {{ stroke: #555; }} svg .grid {{ stroke: #eee; }}
</style></head>
<body>
<h1>Federated keyboard: aggregation server</h1>
<table id="summary">{summary}</table>
<h2>Charts</h2>
<div class="charts">
{chart_rounds}
{chart_participants}
{chart_versions}
{chart_recall}
{chart_eps}
</div>
<h2>Recent rounds</h2>
<table id="rounds"><tr><th>round</th><th>kind</th><th>state</th><th>base</th><th>admitted</th><th>accepted</th>
<th>dropouts</th><th>new version</th><th>epsilon</th><th>outcome</th><th>finished</th></tr>{round_rows}</table>
<h2>Telemetry (randomized response)</h2>
<p>{_esc(tele_note)}</p>
<table id="telemetry"><tr><th>question</th><th>reports</th><th>yes rate (noisy)</th><th>estimated rate</th>
<th>95% CI</th></tr>{tele_rows}</table>
<h2>Model versions</h2>
<table id="versions"><tr><th>version</th><th>source</th><th>parent</th><th>state</th><th>created</th><th>note</th></tr>
{version_rows}</table>
{held_table}
<p><a href="/metrics">Prometheus metrics</a> · <a href="/docs">API docs</a> · <a href="/healthz">health</a></p>
</body></html>
"""
