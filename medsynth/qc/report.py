"""The self-contained HTML report of ``medsynth qc``: figures, verdicts and evidence in one file.

Images are PNGs written here with ``zlib`` + ``struct`` (no imaging library needed) and embedded
as ``data:image/png;base64`` URIs, so the report can be mailed or archived as one file.

Orthogonal mid-slices are shown in one fixed display convention whatever the volume's voxel
order: the array is first reoriented to RAS (nibabel ``io_orientation`` / ``apply_orientation``),
then axial slices show anterior up and the patient's right on the image left (radiological
convention), coronal slices superior up and the patient's right on the left, sagittal slices
superior up and anterior on the left.  Each slice is resampled to square pixels from the voxel
spacing, so anatomy keeps its true aspect ratio.
"""

from __future__ import annotations

import base64
import html
import struct
import zlib
from typing import Any, Optional, Sequence

import numpy as np

REAL_RGB = (31, 119, 180)
SYNTH_RGB = (230, 120, 20)
FAIL_RGB = (200, 30, 30)


# ---------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------


def png_bytes(img: np.ndarray) -> bytes:
    """Encode an 8-bit image (H, W) greyscale or (H, W, 3) RGB as PNG bytes."""
    a = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    if a.ndim == 2:
        colour = 0
    elif a.ndim == 3 and a.shape[2] == 3:
        colour = 2
    else:
        raise ValueError(f"png_bytes needs (H, W) or (H, W, 3) uint8, got shape {a.shape}")
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[r].tobytes() for r in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI that embeds the PNG in the page."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------------------------
# orthogonal slices
# ---------------------------------------------------------------------------------------------


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient an array to RAS voxel order (axis 0 towards Right, 1 Anterior, 2 Superior).

    Returns the reoriented array and its spacing per new axis.  Only axis permutations and flips
    are applied (the closest canonical orientation); oblique rotations are not resampled.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(np.asarray(array), ornt)
    sp = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    new_sp = [0.0, 0.0, 0.0]
    for i, (axis, _flip) in enumerate(ornt):
        new_sp[int(axis)] = float(sp[i])
    return out, tuple(new_sp)  # type: ignore[return-value]


def _square_pixels(sl: np.ndarray, row_mm: float, col_mm: float, pixel_mm: float) -> np.ndarray:
    from scipy import ndimage

    zoom = (row_mm / pixel_mm, col_mm / pixel_mm)
    if np.allclose(zoom, 1.0):
        return sl
    return ndimage.zoom(sl, zoom, order=1, mode="nearest", grid_mode=True)


def orthogonal_slices(array: np.ndarray, affine: np.ndarray, window: tuple[float, float],
                      min_size: int = 160) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices as uint8 images in the display convention above.

    Intensities are mapped linearly from ``window`` (lo, hi) to 0..255; pixels are square with
    size min(spacing), enlarged so that the longest side is at least ``min_size`` pixels.
    """
    a, (sx, sy, sz) = to_ras(np.nan_to_num(np.asarray(array, dtype=np.float32)), affine)
    nx, ny, nz = a.shape
    views = [
        (a[::-1, ::-1, nz // 2].T, sy, sx),   # axial: rows anterior->posterior, cols right->left
        (a[::-1, ny // 2, ::-1].T, sz, sx),   # coronal: rows superior->inferior, cols right->left
        (a[nx // 2, ::-1, ::-1].T, sz, sy),   # sagittal: rows superior->inferior, cols anterior->posterior
    ]
    longest = max(n * s for n, s in zip(a.shape, (sx, sy, sz)))
    pixel = min(min(sx, sy, sz), longest / min_size)
    lo, hi = window
    out = []
    for sl, rmm, cmm in views:
        sq = _square_pixels(np.ascontiguousarray(sl), rmm, cmm, pixel)
        out.append(np.clip((sq - lo) / max(hi - lo, 1e-9) * 255.0, 0, 255).astype(np.uint8))
    return out


def montage(panels: Sequence[np.ndarray], gap: int = 4, background: int = 255) -> np.ndarray:
    """Panels side by side, top-aligned, on a white background (greyscale uint8)."""
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((h, w), background, np.uint8)
    x = 0
    for p in panels:
        out[:p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


# ---------------------------------------------------------------------------------------------
# plots (raster, no text: labels are in the HTML)
# ---------------------------------------------------------------------------------------------


def _draw_line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, rgb: tuple[int, int, int],
               width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    h, w = img.shape[:2]
    for dx in range(-(width // 2), width - width // 2):
        for dy in range(-(width // 2), width - width // 2):
            xx, yy = np.clip(xs + dx, 0, w - 1), np.clip(ys + dy, 0, h - 1)
            img[yy, xx] = rgb


def line_plot(series: Sequence[tuple[np.ndarray, tuple[int, int, int]]], size: tuple[int, int] = (200, 480),
              vlines: Sequence[tuple[float, tuple[int, int, int]]] = ()) -> np.ndarray:
    """An RGB line plot: each series is y values at evenly spaced x, all scaled to a common y max.

    ``vlines`` are (x fraction in [0, 1], colour) vertical markers.  Axes are drawn on the left
    and bottom; a light grid marks quarters.
    """
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    pad = 8
    ph, pw = h - 2 * pad, w - 2 * pad
    for q in (0.25, 0.5, 0.75):
        img[pad + int(q * ph), pad:pad + pw] = (225, 225, 225)
        img[pad:pad + ph, pad + int(q * pw)] = (225, 225, 225)
    ymax = max(float(np.max(y)) for y, _ in series if len(y)) if series else 1.0
    ymax = ymax if ymax > 0 else 1.0
    for frac, rgb in vlines:
        x = pad + float(np.clip(frac, 0, 1)) * (pw - 1)
        _draw_line(img, x, pad, x, pad + ph - 1, rgb, width=1)
    for y, rgb in series:
        y = np.asarray(y, dtype=np.float64)
        if y.size < 2:
            continue
        xs = pad + np.linspace(0, pw - 1, y.size)
        ys = pad + (ph - 1) * (1.0 - y / ymax)
        for i in range(y.size - 1):
            _draw_line(img, xs[i], ys[i], xs[i + 1], ys[i + 1], rgb)
    img[pad:pad + ph, pad] = 0
    img[pad + ph - 1, pad:pad + pw] = 0
    return img


def strip_plot(rows: Sequence[tuple[Sequence[float], tuple[int, int, int]]], x_max: float,
               threshold: Optional[float] = None, size: tuple[int, int] = (120, 480)) -> np.ndarray:
    """Dots on horizontal strips (one strip per row of values), x from 0 to ``x_max``; a red
    vertical line marks ``threshold``."""
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    pad = 10
    pw = w - 2 * pad
    n = max(len(rows), 1)
    if threshold is not None and x_max > 0:
        x = pad + min(threshold / x_max, 1.0) * (pw - 1)
        _draw_line(img, x, 2, x, h - 3, FAIL_RGB, width=2)
    for r, (vals, rgb) in enumerate(rows):
        yc = int((r + 0.5) * h / n)
        img[yc, pad:pad + pw] = (210, 210, 210)
        for v in vals:
            if not np.isfinite(v):
                continue
            x = int(pad + min(max(v, 0.0) / x_max, 1.0) * (pw - 1)) if x_max > 0 else pad
            img[max(yc - 4, 0):yc + 5, max(x - 2, 0):x + 3] = rgb
    img[h - 2, pad:pad + pw] = 0
    return img


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.pass{color:#1a7f37;font-weight:600}.fail{color:#c62828;font-weight:600}
.note{color:#555;font-size:13px}.fig{margin:6px 0 14px}.cap{font-size:12px;color:#444}
.sw{display:inline-block;width:12px;height:12px;vertical-align:middle;margin:0 4px 0 10px}
code{background:#f6f6f6;padding:1px 4px}
.warn{background:#fff4e5;border:1px solid #f0b46a;padding:6px 10px;font-size:13px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return _e(v)


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{data_uri(png)}" alt="{_e(alt)}">'


def _swatch(rgb: tuple[int, int, int], label: str) -> str:
    return f'<span class="sw" style="background:rgb{rgb}"></span>{_e(label)}'


def _metrics_section(s: dict[str, Any]) -> list[str]:
    """The dataset metrics table and the feature space they were computed in."""
    parts: list[str] = []
    parts.append("<h2>Dataset metrics</h2><table><tr><th>figure</th><th>value</th><th>what it is</th></tr>")
    for name, m in s["metrics"].items():
        parts.append(f"<tr><td><code>{_e(name)}</code></td><td>{_num(m.get('value'))}</td><td>{_e(m.get('description', ''))}</td></tr>")
    parts.append("</table>")
    parts.append(f"<p class=\"note\">Feature space: {_e(s['feature_space']['name'])} — {_e(s['feature_space']['description'])}. "
                 f"Computed on the {s['metrics_n_synthetic']} samples that passed QC (what export ships), "
                 f"against {s['reference']['n_cases_used']} real cases resampled onto the sample grid.</p>")
    return parts


def _memorisation_section(s: dict[str, Any], distance_plot: Optional[dict[str, Any]]) -> list[str]:
    """The memorisation screen's calibration, flags and distance plot."""
    parts: list[str] = []
    mem = s.get("memorisation")
    if mem:
        cal = mem["calibration"]
        parts.append("<h2>Memorisation screen</h2>")
        parts.append(f"<p>{_e(cal['note'])}.</p><table>"
                     f"<tr><th>image distance</th><td>{_e(cal['image_distance'])}</td></tr>"
                     f"<tr><th>feature distance</th><td>{_e(cal['feature_distance'])}</td></tr>"
                     f"<tr><th>threshold rule</th><td>{_num(cal['threshold_scale'])} × the {_num(cal['quantile'])} quantile of "
                     f"{cal['n_heldout']} held-out→train nearest-neighbour distances ({cal['n_train']} training cases)</td></tr>"
                     f"<tr><th>image threshold</th><td>{_num(cal['image_threshold'])}</td></tr>"
                     f"<tr><th>feature threshold</th><td>{_num(cal['feature_threshold'])}</td></tr>"
                     f"<tr><th>held-out NN image distances</th><td>{_e(', '.join(f'{x:.4g}' for x in cal['heldout_nn_image_distance']))}</td></tr>"
                     f"<tr><th>samples flagged possible_copy</th><td>{mem['n_flagged']} of {mem['n_screened']} "
                     f"({_num(mem['flag_rate'])})</td></tr></table>")
        if distance_plot:
            parts.append(f"<div class=\"fig\">{_img(distance_plot['png'], 'nearest training case distances')}"
                         f"<div class=\"cap\">Nearest-training-case image distance (1 − NCC), 0 to {_num(distance_plot['x_max'])} "
                         f"(farther samples are drawn at the right edge): "
                         f"top strip held-out real cases{_swatch(REAL_RGB, '')}, bottom strip samples{_swatch(SYNTH_RGB, '')}"
                         f"(flagged{_swatch(FAIL_RGB, '')}); red line: threshold {_num(distance_plot['threshold'])}.</div></div>")
    parts += _lesion_memorisation_section(s)
    return parts


def _lesion_memorisation_section(s: dict[str, Any]) -> list[str]:
    """The lesion-level screen: whether it applied, its calibration, flags and planted copies."""
    les = s.get("lesion_memorisation")
    if not les:
        return []
    parts = ["<h2>Lesion memorisation screen</h2>"]
    if not les.get("applied"):
        return parts + [f"<p>Not applied: {_e(les.get('why', ''))}.</p>"]
    cal, st = les["calibration"], les.get("self_test") or {}
    thr = cal["threshold"]
    rows = [("label", f"{les['label']} (value {les['value']})"),
            ("distance", f"{cal['distance']}, ball {les['radius_mm']} mm, shifts up to {les['max_shift_voxels']} voxel(s)"),
            ("threshold rule", f"{_num(cal['threshold_scale'])} × the {_num(cal['quantile'])} quantile of "
                               f"{cal['n_heldout_lesions']} held-out lesions' nearest-training-lesion distances "
                               f"({cal['n_train_lesions']} training lesions)"),
            ("threshold", _num(thr) if thr is not None else
             f"none: fewer than {cal['min_heldout_lesions']} held-out lesions, so every sample with a lesion fails"),
            ("held-out NN lesion distances", ", ".join(f"{x:.4g}" for x in cal["heldout_nn_distance"])),
            ("samples flagged", f"{les['n_flagged']} of {les['n_samples_with_lesions']} with a lesion "
                                f"({les['n_lesions_screened']} lesions)")]
    if st:
        rows.append(("planted lesion copies flagged", f"{st['flagged']} of {st['planted']} (source named: {st['named_source']})"))
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return parts + [f"<table>{body}</table>"]


def _histogram_section(histograms: dict[str, Any]) -> list[str]:
    """The pooled intensity histograms inside the body."""
    parts: list[str] = []
    if histograms:
        lo, hi = histograms["range"]
        parts.append("<h2>Intensity histograms (inside the body)</h2>")
        parts.append(f"<div class=\"fig\">{_img(histograms['png'], 'intensity histograms')}"
                     f"<div class=\"cap\">x: {_num(lo)} to {_num(hi)} {_e(histograms['units'])} (grid lines at quarters); "
                     f"y: density, pooled over volumes.{_swatch(REAL_RGB, 'real')}{_swatch(SYNTH_RGB, 'synthetic (passed QC)')}</div></div>")
    return parts


def _montage_section(montages: Sequence[dict[str, Any]]) -> list[str]:
    """Orthogonal mid-slices of real cases, then of synthetic samples."""
    parts: list[str] = []
    parts.append("<h2>Orthogonal mid-slices: real vs synthetic</h2>")
    parts.append("<p class=\"note\">Each row: axial (anterior up, patient right on image left), coronal (superior up, "
                 "patient right on left), sagittal (superior up, anterior on left); square pixels from the voxel spacing.</p>")
    for kind, title in (("real", "Real reference cases"), ("synthetic", "Synthetic samples")):
        items = [m for m in montages if m["kind"] == kind]
        if not items:
            continue
        parts.append(f"<h3>{_e(title)}</h3>")
        for m in items:
            verdict = ""
            if kind == "synthetic":
                verdict = (' — <span class="pass">passed</span>' if m["passed"] else
                           ' — <span class="fail">failed</span>: ' + _e("; ".join(m["reasons"])))
            parts.append(f"<div class=\"fig\">{_img(m['png'], m['title'])}<div class=\"cap\">{_e(m['title'])}{verdict}</div></div>")
    return parts


def _verdict_table(s: dict[str, Any]) -> list[str]:
    """One row per sample: verdict, reasons, artefact score, nearest training case."""
    parts: list[str] = []
    parts.append("<h2>Per-sample verdicts</h2><table><tr><th>sample</th><th>verdict</th><th>reasons</th>"
                 "<th>artefact score</th><th>nearest training case (1 − NCC)</th></tr>")
    for smp in s["samples"]:
        ok = smp["passed"]
        art = smp.get("artefact_score")
        mm = smp.get("memorisation") or {}
        near = (f"{_e(mm.get('nearest_training_case_image'))} ({_num(mm.get('image_distance'))})"
                if mm else "n/a")
        parts.append(f"<tr><td><code>{_e(smp['file'])}</code></td>"
                     f"<td class=\"{'pass' if ok else 'fail'}\">{'passed' if ok else 'failed'}</td>"
                     f"<td>{_e('; '.join(smp['reasons'])) or '—'}</td><td>{_num(art)}</td><td>{near}</td></tr>")
    parts.append("</table>")
    return parts


def _ranges_section(s: dict[str, Any]) -> list[str]:
    """The ranges learned from the reference, and its artefact scores."""
    parts: list[str] = []
    rr = s.get("reference_ranges")
    if rr:
        parts.append("<h2>Ranges learned from the reference</h2><table><tr><th>statistic</th>"
                     "<th>reference min..max</th><th>allowed</th></tr>")
        for k, (a, b) in rr["allowed"].items():
            lo_, hi_ = rr["reference_min_max"][k]
            parts.append(f"<tr><td>{_e(k)}</td><td>{_num(lo_)} .. {_num(hi_)}</td><td>{_num(a)} .. {_num(b)}</td></tr>")
        parts.append("</table>")
        rules = rr.get("class_labels") or {}
        if rules:
            parts.append("<p class=\"note\">Label values each class's samples must hold (and must not), "
                         "from the reference's label maps: " + "; ".join(
                             f"class {_e(c)} ({_num(r['cases'])} cases): requires {_e(r['required'] or 'none')}, "
                             f"forbids {_e(r['forbidden'] or 'none')}" for c, r in rules.items()) + ".</p>")
        ra = s.get("reference_artefact_scores")
        if ra:
            parts.append(f"<p class=\"note\">Artefact score of the real cases: max {_num(max(ra))}, "
                         f"median {_num(float(np.median(ra)))}; threshold {_num(s['settings']['qc']['artefact_threshold'])}.</p>")
    return parts


def render_html(summary: dict[str, Any], montages: Sequence[dict[str, Any]],
                histograms: dict[str, Any], distance_plot: Optional[dict[str, Any]]) -> str:
    """The report page.  ``summary`` is the content of qc.json; ``montages`` a list of
    ``{"title", "kind" ("real"|"synthetic"), "passed", "reasons", "png"}``; ``histograms``
    ``{"png", "range", "units"}``; ``distance_plot`` ``{"png", "x_max", "threshold"}`` or None."""
    s = summary
    counts = s["counts"]
    head = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>medsynth QC report</title><style>{_CSS}</style></head><body>")
    parts = [head, "<h1>medsynth quality gate and memorisation screen</h1>",
             ("<p class=\"warn\">This report shows slices of real reference cases (and of any sample that may copy "
              "one): treat it as patient data and keep it where the training data is allowed to be.</p>"),
             f"<p>{counts['samples']} samples: <span class=\"pass\">{counts['passed']} passed</span>, "
             f"<span class=\"fail\">{counts['failed']} failed</span>"
             + (" (moved to <code>quarantine/</code>)" if counts.get("quarantined") else "")
             + f". Reference: {_e(s['reference']['name'])} ({s['reference']['n_cases_used']} cases used"
             + (f", {s['reference']['n_cases_skipped']} unreadable and skipped" if s['reference']['n_cases_skipped'] else "")
             + f"). Grid: {_e(s['grid']['shape'])} voxels, spacing {_e(s['grid']['spacing'])} mm, "
             f"{_e(s['grid']['orientation'])}; {_e(s['grid']['source'])}.</p>"]

    parts += _metrics_section(s)
    parts += _memorisation_section(s, distance_plot)
    parts += _histogram_section(histograms)
    parts += _montage_section(montages)
    parts += _verdict_table(s)
    parts += _ranges_section(s)
    parts.append(f"<p class=\"note\">medsynth {_e(s['medsynth_version'])}, {_e(s['created'])}.</p></body></html>\n")
    return "\n".join(parts)
