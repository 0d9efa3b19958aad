"""The utility report: ``utility.json``, a self-contained ``utility.html`` and the printed table.

The HTML has no external resources: a table of every arm (mean ± standard deviation over repeats
and the 95% bootstrap CI), an inline SVG bar chart (bars = mean, error bars = 95% CI), the paired
differences against the reference arms, and the settings and leakage checks.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Optional

from medsynth.jobs import write_json, write_text

METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "dice": "Dice"}


def _num(x: Optional[float], nd: int = 3, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def _cell(m: dict[str, Any]) -> str:
    return f"{_num(m['mean'])} ± {_num(m['std'])} [{_num(m['ci95'][0])}, {_num(m['ci95'][1])}]"


def _dcell(d: dict[str, Any]) -> str:
    return f"{_num(d['mean'], signed=True)} [{_num(d['ci95'][0], signed=True)}, {_num(d['ci95'][1], signed=True)}]"


def _arm_label(report: dict[str, Any], name: str) -> str:
    for a in report["arms"]:
        if a["name"] == name:
            return a["label"]
    return name


def _n_train(a: dict[str, Any]) -> str:
    ns = sorted(set(a["n_train"]))
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def format_table(report: dict[str, Any]) -> str:
    """The plain-text table the CLI prints: one row per arm, then the paired differences."""
    metrics = report["metrics"]
    head = ["arm", "n train"] + [f"{METRIC_NAMES.get(m, m)} mean ± sd [95% CI]" for m in metrics]
    rows = [[a["label"], _n_train(a)] + [_cell(a["metrics"][m]) for m in metrics] for a in report["arms"]]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    diffs = []
    for a in report["arms"]:
        for ref, per in a.get("vs", {}).items():
            cells = [f"{METRIC_NAMES.get(m, m)} {_dcell(per[m])}" for m in metrics]
            diffs.append((f"{a['label']} - {_arm_label(report, ref)}", "   ".join(cells)))
    if diffs:
        w = max(len(d[0]) for d in diffs)
        lines += ["", "paired differences (mean over repeats [95% bootstrap CI]):"]
        lines += [f"  {name.ljust(w)}  {cells}" for name, cells in diffs]
    t = report["data"]["test"]
    lines += ["", (f"test set: {t['n']} real case(s); {report['repeats']} repeat(s); "
                   f"{report['budget']['steps']} optimiser steps per arm; seed {report['seed']}")]
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


def _bar_chart(report: dict[str, Any]) -> str:
    """Inline SVG: for each metric a group of bars (one per arm) with 95% CI error bars, axis 0..1."""
    metrics = report["metrics"]
    arms = report["arms"]
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    bar_w, gap, group_gap = 34, 8, 40
    left, top, plot_h = 50, 20, 220
    group_w = len(arms) * (bar_w + gap) - gap
    width = left + len(metrics) * (group_w + group_gap) + 20
    height = top + plot_h + 40 + 22 * ((len(arms) + 2) // 3)
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            'font-family="sans-serif" font-size="12" role="img" aria-label="utility bar chart">')]

    def y(v: float) -> float:
        return top + plot_h * (1.0 - max(0.0, min(1.0, v)))

    for t in range(0, 11, 2):
        v = t / 10
        out.append(f'<line x1="{left - 4}" x2="{width - 10}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    if "auc" in metrics or "accuracy" in metrics:
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(0.5):.1f}" y2="{y(0.5):.1f}" '
                   'stroke="#999" stroke-dasharray="4 3"><title>chance (0.5)</title></line>')
    for g, m in enumerate(metrics):
        x0 = left + g * (group_w + group_gap) + group_gap / 2
        for i, a in enumerate(arms):
            s = a["metrics"][m]
            x = x0 + i * (bar_w + gap)
            c = colours[i % len(colours)]
            if s["mean"] is not None:
                out.append(f'<rect x="{x:.1f}" y="{y(s["mean"]):.1f}" width="{bar_w}" '
                           f'height="{y(0) - y(s["mean"]):.1f}" fill="{c}">'
                           f'<title>{html.escape(a["label"])}: {html.escape(_cell(s))}</title></rect>')
            lo, hi = s["ci95"]
            if lo is not None and hi is not None:
                cx = x + bar_w / 2
                out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(hi):.1f}" y2="{y(lo):.1f}" stroke="#222"/>')
                for v in (lo, hi):
                    out.append(f'<line x1="{cx - 6:.1f}" x2="{cx + 6:.1f}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                               'stroke="#222"/>')
        out.append(f'<text x="{x0 + group_w / 2:.1f}" y="{top + plot_h + 18}" text-anchor="middle" '
                   f'font-weight="bold">{html.escape(METRIC_NAMES.get(m, m))}</text>')
    for i, a in enumerate(arms):
        lx = left + (i % 3) * 200
        ly = top + plot_h + 36 + 22 * (i // 3)
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{colours[i % len(colours)]}"/>')
        out.append(f'<text x="{lx + 18}" y="{ly}">{html.escape(a["label"])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_html(report: dict[str, Any]) -> str:
    """The self-contained HTML page of a utility report."""
    e = html.escape
    metrics = report["metrics"]
    head = "".join(f"<th>{e(METRIC_NAMES.get(m, m))}<br><small>mean ± sd [95% CI]</small></th>" for m in metrics)
    rows = "".join(
        f"<tr><td>{e(a['label'])}</td><td>{e(_n_train(a))}</td>"
        + "".join(f"<td>{e(_cell(a['metrics'][m]))}</td>" for m in metrics) + "</tr>"
        for a in report["arms"])
    drows = ""
    for a in report["arms"]:
        for ref, per in a.get("vs", {}).items():
            drows += (f"<tr><td>{e(a['label'])} &minus; {e(_arm_label(report, ref))}</td>"
                      + "".join(f"<td>{e(_dcell(per[m]))}<br><small>bootstrap P(Δ ≤ 0) = "
                                f"{e(_num(per[m]['bootstrap_fraction_le_0']))}</small></td>" for m in metrics)
                      + "</tr>")
    data = report["data"]
    synth = data.get("synthetic")
    items = [
        ("task", report["task"]),
        ("run", report["run_dir"]),
        ("train manifest", f"{report['train_manifest']} ({data['train']['n']} cases"
                           + (f", per class {data['train'].get('per_class')}" if data['train'].get('per_class') else "")
                           + ")"),
        ("test manifest", f"{report['test_manifest']} ({data['test']['n']} cases"
                          + (f", per class {data['test'].get('per_class')}" if data['test'].get('per_class') else "")
                          + ")"),
        ("synthetic", "not used" if synth is None else
         (f"{synth['source']}: requested {synth['requested_per_class']} per class, used {synth['used_per_class']}; "
          f"{synth['failed_qc']} failed QC, {synth['no_qc_verdict']} without verdict; "
          + ("only QC-passed samples used" if synth.get("qc_filter", True)
             else f"QC filter OFF (--include-qc-failed): {synth.get('used_without_passing_verdict')} "
                  "used without a passing verdict"))),
        ("reduced real", "not used" if data.get("reduced") is None else
         (f"{100 * data['reduced']['fraction']:g}% of the train set ({data['reduced']['n']} cases), "
          "stratified by class, redrawn per repeat")),
        ("grid", f"{report['grid']['shape']} voxels at {report['grid']['spacing']} mm, {report['grid']['orientation']}"),
        ("model", f"{report['model']['network']}, {report['model']['parameters']:,} parameters"),
        ("budget", ", ".join(f"{k} {v}" for k, v in report["budget"].items())),
        ("repeats / seed", f"{report['repeats']} / {report['seed']}"),
        ("bootstrap", (f"{report['bootstrap']['resamples']} resamples over {report['bootstrap']['over']}; "
                       f"{report['bootstrap']['statistic']}")),
        ("threshold", report.get("threshold") or "-"),
        ("leakage checks", "; ".join(f"{k}: {v}" for k, v in report["leakage"].items())),
        ("elapsed", f"{report['elapsed_s']} s on {report['device']}"),
    ]
    settings = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in items)
    notes = "".join(f"<li>{e(n)}</li>" for n in report.get("notes", [])) or "<li>none</li>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>medsynth utility: train on synthetic, test on real</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }}
small {{ color: #666; }}
</style></head><body>
<h1>Does the synthetic data help?</h1>
<p>The same small MONAI model trained under the same budget on each training set, evaluated on the
held-out real test set. Mean ± standard deviation over {report['repeats']} repeat(s); 95% bootstrap
confidence interval over test cases.</p>
<table><tr><th>arm</th><th>n train</th>{head}</tr>{rows}</table>
{_bar_chart(report)}
<h2>Paired differences</h2>
<p>Each arm minus its reference, same repeat seeds and same bootstrap resamples (mean over repeats [95% CI]).</p>
<table><tr><th>comparison</th>{''.join(f'<th>{e(METRIC_NAMES.get(m, m))}</th>' for m in metrics)}</tr>{drows or '<tr><td>none</td></tr>'}</table>
<h2>Settings</h2>
<table>{settings}</table>
<h2>Notes</h2>
<ul>{notes}</ul>
</body></html>
"""


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/utility.json`` and ``out_dir/utility.html`` atomically; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j = write_json(out / "utility.json", report)
    h = write_text(out / "utility.html", render_html(report))
    return j, h
