"""The data card of a release: ``data_card.json`` and its rendering ``DATA_CARD.md``.

Datasheet style (Gebru et al., "Datasheets for datasets"): what the data is and is not for, which
model made it from what, how it was checked, what a privacy officer needs to sign it, the licence
and how to cite it.  The cohort is described by counts, grids and class names only: no case id,
person name, date or path reaches the card (the release's PHI scan checks that too).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from medsynth import __version__

CARD_FORMAT = "medsynth-data-card/1"

INTENDED_USE = [
    "research and development of image-analysis methods: training, augmenting and testing pipelines",
    "sharing outside the hospital where the real scans cannot go",
    "teaching and demonstration",
]
NOT_FOR = [
    "clinical use: diagnosis, treatment decisions or screening (not a medical device)",
    "evidence about any real person, or about the real patients' prevalence of disease",
    "the only test set of a claim about performance on real patients",
]


def _range(values: list[Any]) -> Optional[list[Any]]:
    vals = [list(v) for v in values if v is not None]
    if not vals:
        return None
    return [[min(v[i] for v in vals) for i in range(3)], [max(v[i] for v in vals) for i in range(3)]]


def cohort(cfg: Any, train_manifest: Any, n_members: int, model_card: dict[str, Any]) -> dict[str, Any]:
    """Counts, grids and class and label names of the training cohort (never ids, dates or paths)."""
    from medsynth.data.transforms import split_cases

    train, val = split_cases(train_manifest.cases, cfg.data.val_fraction, cfg.training.seed)
    names = (model_card.get("classes") or {}).get("names") or {}
    classes = Counter(c.class_label for c in train)
    return {
        "n_cases": len(train_manifest.cases), "n_training": n_members, "n_validation": len(val),
        "modality": train_manifest.modality or cfg.data.modality,
        "source_grid": {"shape_min_max": _range([c.shape for c in train_manifest.cases]),
                        "spacing_mm_min_max": _range([c.spacing for c in train_manifest.cases])},
        "model_grid": {"shape": list(cfg.data.shape), "spacing_mm": list(cfg.data.spacing),
                       "orientation": cfg.data.orientation.upper()},
        "classes": {str(names.get(str(k), k) if k is not None else "unlabelled"): n
                    for k, n in sorted(classes.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))},
        "labels": ((model_card.get("labels") or {}).get("values") or None),
    }


def generator(model_card: dict[str, Any], export: Any) -> dict[str, Any]:
    """The model that made the samples: card, hashes, versions, initial weights, sampling settings."""
    from medsynth.model.checkpoint import weights_licenses

    ck = model_card.get("checkpoints") or {}
    gen = [((c.extra.get("provenance") or {}).get("generation") or {}) for c in export.cases]
    seeds = sorted({(c.extra.get("provenance") or {}).get("seed") for c in export.cases} - {None})
    settings = sorted({(g.get("scheduler"), g.get("steps"), g.get("guidance"), g.get("use_ema")) for g in gen},
                      key=str)
    return {
        "model": model_card.get("name"), "description": model_card.get("description"),
        "model_intended_use": model_card.get("intended_use"),
        "config_hash": model_card.get("config_hash"),
        "checkpoints_sha256": {k: (v or {}).get("sha256") for k, v in ck.items()},
        "versions": model_card.get("versions"),
        "diffusion": model_card.get("diffusion"), "latent": model_card.get("latent"),
        "initial_weights": weights_licenses(model_card),
        "sampling": [{"scheduler": s, "steps": n, "guidance": g, "ema_weights": e} for s, n, g, e in settings],
        "seeds": seeds,
    }


def synthetic_data(export: Any, export_report: dict[str, Any], dicom_index: list[dict[str, Any]]) -> dict[str, Any]:
    """What the release holds: counts per class, formats, label values present, DICOM objects."""
    from medsynth.export.seg_codes import segment_code

    labels = export.extra.get("labels") or {}
    segs = [{"label": n, "category": list(segment_code(n).category), "type": list(segment_code(n).type)}
            for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if v != 0]
    return {
        "n_samples": len(export.cases), "modality": export.modality,
        "per_class": dict(sorted(Counter(str(c.class_label) for c in export.cases).items())),
        "formats": export_report.get("formats"),
        "grid": {"shape": list(export.cases[0].shape or []), "spacing_mm": list(export.cases[0].spacing or [])},
        "with_label_map": sum(1 for c in export.cases if c.label is not None),
        "dicom": ({"instances": sum(e["instances"] for e in dicom_index),
                   "image_series": sum(1 for e in dicom_index if e["modality"] != "SEG"),
                   "seg": sum(1 for e in dicom_index if e["modality"] == "SEG"),
                   "fileset": "DICOMDIR at the top of the release, PS3.10 file IDs "
                              "(PTxxxxxx/STxxxxxx/SExxxxxx/IMxxxxxx)",
                   "seg_codes": segs, "dates": export_report.get("dicom_dates"),
                   "identity": "patient SYNTHETIC^<sample id>; Synthetic Data YES; Patient Identity Removed YES"}
                  if dicom_index else None),
    }


def qc_section(status: dict[str, str], force: bool, qc_report: Optional[dict[str, Any]]) -> dict[str, Any]:
    """QC of the released samples in words: all passed, or how many were released without (``--force``)."""
    n = len(status)
    passed = sum(1 for s in status.values() if s == "passed")
    if passed == n:
        statement = f"every released sample ({n}) has a passing QC verdict"
    else:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(s for s in status.values() if s != "passed").items()))
        statement = (f"{n - passed} of the {n} released samples do NOT have a passing QC verdict ({kinds}); they "
                     "were released anyway because the releaser overrode the quality gate (--force). Treat them "
                     "as unchecked: they may be implausible images")
    if qc_report:
        statement += (f". Over all {qc_report['n_samples']} generated samples QC passed {qc_report['passed']} "
                      f"({100 * (qc_report['pass_rate'] or 0):.0f}%)")
    return {"released": n, "released_passed": passed, "forced": bool(force and passed < n),
            "qc_report": qc_report, "statement": statement}


def memorisation_section(mem: dict[str, Any]) -> dict[str, Any]:
    """The memorisation screen's result, its threshold and where the calibration came from."""
    cal = mem["calibration"]
    where = ("held-out real cases the model did not train on" if cal["mode"] == "holdout_manifest" else
             "a split of the training cases (no hold-out manifest was given)")
    statement = (f"none of the {mem['n_screened']} released samples is a possible copy of a training case: the "
                 f"nearest is at 1-NCC {mem['min_distance']:.4g}, the threshold {cal['image_threshold']:.4g} "
                 f"({cal['threshold_scale']} x the {cal['quantile']} quantile of the distances from "
                 f"{cal['n_heldout']} {where} to the training cases)")
    return {"n_screened": mem["n_screened"], "n_flagged": mem["n_flagged"], "threshold": cal["image_threshold"],
            "nearest_distance": mem["min_distance"], "calibration": cal["mode"], "n_calibration": cal["n_heldout"],
            "statement": statement}


def membership_section(mia: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The membership audit's AUC table and verdict, or why it was not run."""
    if mia is None:
        return {"run": False, "statement": "not run: no hold-out manifest of unseen real cases was given (--holdout)"}
    rows = [{"attack": a["name"], "auc": a["auc"], "ci95": a["ci95"]} for a in mia["attacks"].values()]
    return {"run": True, "n_members": mia["n_members"], "n_nonmembers": mia["n_nonmembers"], "attacks": rows,
            "statement": mia["verdict"]}


def build_card(*, name: str, created: str, model_card: dict[str, Any], cfg: Any, train_manifest: Any, members: int,
               export: Any, export_report: dict[str, Any], status: dict[str, str], force: bool,
               qc_report: Optional[dict[str, Any]], memorisation: dict[str, Any],
               membership: Optional[dict[str, Any]], phi: dict[str, Any], utility: Optional[dict[str, Any]],
               licence: Optional[str], dicom_index: list[dict[str, Any]]) -> dict[str, Any]:
    """The data card as a dict (``data_card.json``); :func:`render_markdown` writes ``DATA_CARD.md``."""
    from medsynth.model.checkpoint import license_text, weights_licenses

    inherited = weights_licenses(model_card)
    coh = cohort(cfg, train_manifest, members, model_card)
    gen = generator(model_card, export)
    syn = synthetic_data(export, export_report, dicom_index)
    limits = [f"the generator learned from {coh['n_training']} real {coh['modality']} cases: the samples carry that "
              "cohort's scanners, protocols, population and biases, and cannot show what it lacks",
              f"volumes are on a {'x'.join(map(str, coh['model_grid']['shape']))} grid of "
              f"{'x'.join(f'{s:g}' for s in coh['model_grid']['spacing_mm'])} mm: fine anatomy is not represented",
              "QC checks plausibility (intensities, body, labels, artefacts), not anatomical correctness",
              "the memorisation screen and the membership audit have finite power; their figures, not a guarantee, "
              "are what this card reports"]
    year = created[:4]
    return {
        "format": CARD_FORMAT, "name": name, "created": created, "medsynth_version": __version__,
        "summary": (f"{syn['n_samples']} synthetic {syn['modality']} volumes generated by medsynth {__version__} "
                    f"from a model trained on {coh['n_training']} real cases. No image is a patient's scan."),
        "intended_use": {"for": INTENDED_USE, "not_for": NOT_FOR, "limits": limits},
        "generator": gen,
        "training_cohort": coh,
        "synthetic_data": syn,
        "qc": qc_section(status, force, qc_report),
        "memorisation": memorisation_section(memorisation),
        "membership_inference": membership_section(membership),
        "phi_scan": dict(phi),
        "utility": utility,
        "licence": {"data": licence or "not stated by the releasing site (ask it before any reuse)",
                    "inherited_from_initial_weights": inherited,
                    "statement": (license_text(inherited) if inherited else
                                  "none inherited: the model was trained from random initialisation")},
        "how_to_cite": (f"{name}: {syn['n_samples']} synthetic {syn['modality']} volumes, generated with medsynth "
                        f"{__version__} (model config {str(gen['config_hash'])[:16]}), {year}. Verify the files "
                        "with 'sha256sum -c SHA256SUMS'."),
        "files": {"checksums": "SHA256SUMS", "privacy_audit": "privacy_audit.json",
                  "dicomdir": "DICOMDIR" if dicom_index else None, "dicom_series": dicom_index},
    }


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _ci(x: list[Any]) -> str:
    return f"[{x[0]:.2f}, {x[1]:.2f}]" if x and x[0] is not None else "n/a"


def _md_generator(g: dict[str, Any]) -> list[str]:
    ck = g["checkpoints_sha256"] or {}
    v = g["versions"] or {}
    init = g["initial_weights"]
    sampling = "; ".join(f"{s['scheduler']} {s['steps']} steps, guidance {s['guidance']}, EMA {s['ema_weights']}"
                         for s in g["sampling"])
    return ["## Generator", "", *_table(["", ""], [
        ["model", f"{g['model']} ({g['model_intended_use']})"],
        ["config hash", g["config_hash"]],
        ["checkpoints (sha256)", ", ".join(f"{k} {str(h)[:16]}" for k, h in ck.items())],
        ["versions", ", ".join(f"{k} {val}" for k, val in v.items() if val)],
        ["initial weights", "; ".join(f"{w['component']}: {w.get('file')} ({w['license']})" for w in init)
         if init else "none: trained from random initialisation on the cohort below"],
        ["sampling", f"{sampling}; seeds {g['seeds']}"],
    ])]


def _md_cohort(coh: dict[str, Any]) -> list[str]:
    sg = coh["source_grid"]

    def span(key: str) -> str:
        return f"{sg[key][0]} to {sg[key][1]}" if sg[key] else "n/a"

    return ["## Training cohort", "",
            f"{coh['n_cases']} real {coh['modality']} cases in the training manifest: {coh['n_training']} trained "
            f"on, {coh['n_validation']} kept for validation. No case id, name, date or path is given here.", "",
            *_table(["", ""], [
                ["source grids (voxels)", span("shape_min_max")],
                ["source spacing (mm)", span("spacing_mm_min_max")],
                ["model grid", f"{coh['model_grid']['shape']} voxels of {coh['model_grid']['spacing_mm']} mm, "
                               f"{coh['model_grid']['orientation']}"],
                ["classes (training cases)", ", ".join(f"{k}: {n}" for k, n in coh["classes"].items())],
                ["labels", ", ".join(f"{k} {val}" for k, val in (coh["labels"] or {}).items()) or "none"],
            ])]


def _md_data(syn: dict[str, Any]) -> list[str]:
    per_class = ", ".join(f"class {k}: {n}" for k, n in syn["per_class"].items())
    lines = ["## The synthetic data", "",
             f"{syn['n_samples']} volumes ({per_class}), formats {', '.join(syn['formats'] or [])}, "
             f"{syn['with_label_map']} with a label map."]
    d = syn["dicom"]
    if d:
        lines += [f"DICOM: {d['instances']} instances ({d['image_series']} image series, {d['seg']} SEG) in a "
                  f"File-set with a DICOMDIR; {d['identity']}; {d['dates']}.", ""]
        lines += _table(["SEG segment", "category (SNOMED CT)", "type (SNOMED CT)"],
                        [[s["label"], f"{s['category'][1]} ({s['category'][0]})", f"{s['type'][1]} ({s['type'][0]})"]
                         for s in d["seg_codes"]])
    return lines


def _md_privacy(c: dict[str, Any]) -> list[str]:
    q, m, mia = c["qc"], c["memorisation"], c["membership_inference"]
    lines = ["## Quality control", "", q["statement"] + "."]
    if q["qc_report"] and q["qc_report"]["reasons"]:
        lines += ["", *_table(["QC failure reason (all generated samples)", "samples"],
                              [[k, n] for k, n in q["qc_report"]["reasons"].items()])]
    lines += ["", "## Memorisation screen", "", m["statement"] + ".", "", "## Membership inference", ""]
    if mia["run"]:
        lines += [f"Can an attacker tell the {mia['n_members']} training cases from {mia['n_nonmembers']} real "
                  "cases the model never saw? ROC AUC 0.5 means no; 1 means every training case is recognised "
                  "(95% bootstrap interval).", ""]
        lines += _table(["attack", "AUC", "95% CI"], [[a["attack"], f"{a['auc']:.2f}", _ci(a["ci95"])]
                                                      for a in mia["attacks"]])
        lines += ["", f"Verdict: {mia['statement']}."]
    else:
        lines += [mia["statement"] + "."]
    return lines + ["", "## PHI scan", "", str(c["phi_scan"].get("statement")) + "."]


def _md_utility(u: Optional[dict[str, Any]]) -> list[str]:
    if not u:
        return []

    def cell(m: dict[str, Any]) -> str:
        return f"{m['mean']:.3f} {_ci(m['ci95'])}"

    return ["## Utility", "", f"{u['task']}: the same model trained per arm, tested on {u['n_test']} held-out real "
            f"cases ({u['repeats']} repeats; mean [95% CI]).", "",
            *_table(["arm", *u["metrics"]], [[a["arm"], *[cell(a["metrics"][k]) for k in u["metrics"]]]
                                            for a in u["arms"]]), ""]


def render_markdown(card: dict[str, Any]) -> str:
    """``DATA_CARD.md``: the card for people, section by section."""
    c, iu, lic = card, card["intended_use"], card["licence"]
    lines = [f"# Data card: {c['name']}", "", c["summary"], "",
             "## Intended use and limits", "", "For:", *[f"- {x}" for x in iu["for"]], "", "Not for:",
             *[f"- {x}" for x in iu["not_for"]], "", "Limits:", *[f"- {x}" for x in iu["limits"]], "",
             *_md_generator(c["generator"]), "", *_md_cohort(c["training_cohort"]), "",
             *_md_data(c["synthetic_data"]), "", *_md_privacy(c), "", *_md_utility(c["utility"]),
             "## Licence", "", f"Data: {lic['data']}. Weights: {lic['statement']}.",
             "", "## How to cite", "", c["how_to_cite"],
             "", "## Files", "",
             "`SHA256SUMS` (every file), `privacy_audit.json` (every figure behind this card), `data_card.json`"
             + (", `DICOMDIR`" if c["files"]["dicomdir"] else "") + ".", ""]
    return "\n".join(lines)
