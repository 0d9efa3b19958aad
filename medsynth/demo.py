"""``medsynth demo``: the whole engine on built-in CT phantoms, on a CPU, in minutes.

With no other input it writes phantoms to ``DIR/data/`` (with ``DIR/data/manifest.json``), trains
the built-in ``demo.yaml`` (two experts on a wavelet latent since 2026-12-02) into ``DIR/run/``,
samples a few volumes per class into ``DIR/samples/``, samples the same architecture with random
weights into ``DIR/untrained_samples/`` (the baseline), and compares both with the real phantoms (:mod:`medsynth.qc.fidelity`).  It writes
``DIR/fidelity.json`` and a ``DIR/preview.png`` of mid-axial slices (real / trained / untrained).

Running it again on the same folder reuses what is done: phantoms are rewritten identically,
finished training stages and existing samples are kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from medsynth.errors import CheckpointError, MedsynthError
from medsynth.jobs import RunPaths, load_run_config, write_json
from medsynth.volume import Volume

log = logging.getLogger("medsynth.demo")


def demo_config_path() -> Path:
    """The built-in demo config shipped inside the package (``medsynth/resources/demo.yaml``)."""
    return Path(str(resources.files("medsynth") / "resources" / "demo.yaml"))


@dataclass
class DemoResult:
    """Where the demo put everything, its fidelity figures and how long each part took."""

    out: Path
    manifest: Path
    run_dir: Path
    samples: Path
    untrained: Path
    preview: Path
    fidelity: dict[str, Any]
    table: str
    n_cases: int
    n_samples: int
    timings: dict[str, float] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    recon_qc: Optional[dict[str, Any]] = None  # stage 1's reconstructions judged by the gate (model card)

    @property
    def seconds(self) -> float:
        return sum(self.timings.values())


def run_demo(out_dir: str | Path = "medsynth-demo", seed: int = 0, n_cases: int = 128, per_class: int = 4,
             config_path: Optional[str | Path] = None, labels: Optional[bool] = None) -> DemoResult:
    """Run the demo into ``out_dir`` and return a :class:`DemoResult` (see the module docstring).

    The built-in demo config trains image and label map together (``data.use_labels: true``), so
    every sample comes with ``<id>_label.nii.gz``; the result's ``labels`` counts the label values
    the samples hold.  ``labels`` True/False overrides the config's choice (None keeps it).
    """
    from medsynth.config import load_config
    from medsynth.data.phantoms import write_phantoms
    from medsynth.manifest import load_manifest
    from medsynth.model.checkpoint import read_model_card
    from medsynth.model.sample import Sampler, generate
    from medsynth.model.train import train
    from medsynth.qc.fidelity import fidelity, format_table
    from medsynth.samples import list_samples

    if n_cases < 4 or per_class < 1:
        raise MedsynthError(f"demo needs `n_cases` >= 4 and `per_class` >= 1, got {n_cases} and {per_class}")
    out = Path(out_dir)
    cfg_path = Path(config_path) if config_path else demo_config_path()
    probe = load_config(cfg_path)  # the grid of the phantoms
    label_override = {} if labels is None else {"use_labels": bool(labels)}
    timings: dict[str, float] = {}

    t = time.perf_counter()
    manifest = write_phantoms(out / "data", n_cases, seed, tuple(probe.data.shape), tuple(probe.data.spacing))
    timings["phantoms"] = time.perf_counter() - t
    log.info("demo: %d phantoms in %s", n_cases, manifest)

    cfg = load_config(cfg_path, overrides={"data": {"manifest": str(manifest.resolve()), **label_override}})
    run_dir = out / "run"
    t = time.perf_counter()
    try:
        train(cfg, run_dir, stage="all", resume=RunPaths(run_dir).has_checkpoint())
    except CheckpointError as exc:
        raise CheckpointError(f"{run_dir}: holds a run this demo cannot continue ({exc.message})",
                              hint=f"remove {run_dir} or choose another `out_dir` folder") from None
    timings["training"] = time.perf_counter() - t

    t = time.perf_counter()
    k = cfg.model.unet.num_class_embeds or 1
    indices = range(per_class * k)  # classes in turn: index mod k
    samples, untrained_dir = out / "samples", out / "untrained_samples"
    generate(run_dir, samples, indices, seed=seed)
    # the run's resolved config (label set filled in at training) for the same architecture
    baseline = Sampler.untrained(load_run_config(run_dir), seed=seed, device="cpu")
    generate(None, untrained_dir, indices, seed=seed, sampler=baseline)
    timings["sampling"] = time.perf_counter() - t

    t = time.perf_counter()
    real = [Volume.load_nifti(c.image, modality="CT") for c in load_manifest(manifest).cases]
    trained = [s for s in list_samples(samples) if s.sidecar.get("index") in indices]
    trained_vols = [s.load() for s in trained]
    label_info = _label_info(trained) if cfg.data.use_labels else {}
    untrained_vols = [s.load() for s in list_samples(untrained_dir) if s.sidecar.get("index") in indices]
    fig = fidelity(real, {"trained": trained_vols, "untrained": untrained_vols})
    table = format_table(fig)
    write_json(out / "fidelity.json", {"figures": fig, "table": table.splitlines(), "seed": seed,
                                       "n_cases": n_cases, "per_class": per_class, "labels": label_info})
    preview = write_preview(out / "preview.png", {"real": real[: len(trained_vols)], "trained": trained_vols,
                                                  "untrained": untrained_vols})
    timings["fidelity"] = time.perf_counter() - t
    card = read_model_card(run_dir)
    return DemoResult(out, manifest, run_dir, samples, untrained_dir, preview, fig, table, n_cases,
                      len(trained_vols), timings, label_info,
                      (card.get("metrics") or {}).get("autoencoder_reconstruction_qc"))


def _label_info(trained: Sequence[Any]) -> dict[str, Any]:
    """Which label values the samples hold: per value the number of samples, overall and per class
    (with each sample's voxel count)."""
    by_class: dict[str, dict[str, Any]] = {}
    for s in trained:
        lab = s.load_label()
        cls = by_class.setdefault(str(s.sidecar.get("class")), {"n_samples": 0, "samples_with_value": {},
                                                                "voxels": {}})
        cls["n_samples"] += 1
        values, n_vox = np.unique(np.asarray(lab.array), return_counts=True) if lab is not None else ([], [])
        for v, n in zip(values, n_vox):
            key = str(int(v))
            cls["samples_with_value"][key] = cls["samples_with_value"].get(key, 0) + 1
            cls["voxels"].setdefault(key, []).append(int(n))
    counts: dict[str, int] = {}
    for cls in by_class.values():
        for key, n in cls["samples_with_value"].items():
            counts[key] = counts.get(key, 0) + n
    return {"samples_with_value": counts, "n_samples": len(trained), "by_class": by_class}


def _reasons(rq: dict[str, Any]) -> str:
    from medsynth.model.recon_check import failing

    why = failing(rq)
    return f"; failing: {why}" if why else ""


def format_summary(res: DemoResult) -> str:
    """What the CLI prints at the end of the demo: where everything is and how to look at it."""
    f = res.fidelity
    tr, un = f["trained"]["frechet"], f["untrained"]["frechet"]
    ratio = un / tr if tr > 0 else float("inf")
    mins, secs = divmod(int(round(res.seconds)), 60)
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in res.timings.items())
    first = sorted(res.samples.glob("*.nii.gz"))
    example = first[0] if first else res.samples
    lines = [
        f"medsynth demo finished in {mins} min {secs:02d} s ({parts})",
        f"  data      {res.manifest}  ({res.n_cases} CT phantoms; class 0 no lesion, class 1 lesion)",
        f"  run       {res.run_dir}  (model card {RunPaths(res.run_dir).card}, metrics */metrics.jsonl)",
        *([f"  stage 1   {res.recon_qc['n_passed']} of {res.recon_qc['n_cases']} reconstructions of real cases pass "
           f"the QC gate (the ceiling for samples){_reasons(res.recon_qc)}"] if res.recon_qc else []),
        f"  samples   {res.samples}  ({res.n_samples} volumes, classes in turn; NIfTI in HU + JSON sidecars)",
        *(["  labels    <id>_label.nii.gz beside each sample (0 background, 1 lung, 2 lesion); samples holding "
           "each value: " + ", ".join(f"{v}: {n}/{res.labels['n_samples']}"
                                      for v, n in sorted(res.labels["samples_with_value"].items()))]
          if res.labels else []),
        *([f"            class {c}: " + ", ".join(f"{v}: {n}/{info['n_samples']}"
                                                  for v, n in sorted(info["samples_with_value"].items()))
           for c, info in sorted(res.labels.get("by_class", {}).items())] if res.labels else []),
        f"  baseline  {res.untrained}  (same architecture and sampling, random weights)",
        f"  preview   {res.preview}  (mid-axial slices; rows: real, trained, untrained)",
        "",
        "fidelity against the real phantoms:",
        res.table,
        "",
        f"trained model: Frechet distance {tr:.4f}, {ratio:.0f}x smaller than the untrained model's {un:.4f} "
        f"(real split-half floor {f['real']['frechet']:.4f})",
        "",
        "look at it:",
        f"  open {res.preview}",
        f"  open {example} in 3D Slicer, ITK-SNAP or FSLeyes (HU; window -1000..400 for lungs)",
        f"  python -c \"import nibabel as nib; im = nib.load('{example}'); print(im.shape, im.header.get_zooms())\"",
        f"  more samples: medsynth generate {res.run_dir} -n 8 --out {res.out / 'more'} --seed 1 --class 1",
        "research only, not for clinical use",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Preview image (PNG from medsynth.qc.report.png_bytes: no imaging dependency)
# --------------------------------------------------------------------------------------------


def axial_slice(vol: Volume, lo: float = -1000.0, hi: float = 400.0) -> np.ndarray:
    """The middle axial slice in radiological view (anterior up, patient right on the left), uint8."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(vol.array, dtype=np.float32), vol.affine))
    arr = np.asarray(img.dataobj)
    sl = arr[::-1, ::-1, arr.shape[2] // 2].T  # rows: anterior -> posterior; columns: right -> left
    return (np.clip((sl - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)


def write_preview(path: Path, rows: dict[str, Sequence[Volume]], zoom: int = 4) -> Path:
    """A grey PNG grid: one row per set, one mid-axial slice per volume, enlarged ``zoom`` times."""
    tiles = [[axial_slice(v) for v in vols] for vols in rows.values() if len(vols)]
    h = max(t.shape[0] for r in tiles for t in r)
    w = max(t.shape[1] for r in tiles for t in r)
    ncol = max(len(r) for r in tiles)
    gap = 2
    canvas = np.zeros((len(tiles) * (h + gap), ncol * (w + gap)), np.uint8)
    for i, r in enumerate(tiles):
        for j, tile in enumerate(r):
            canvas[i * (h + gap): i * (h + gap) + tile.shape[0], j * (w + gap): j * (w + gap) + tile.shape[1]] = tile
    canvas = np.kron(canvas, np.ones((zoom, zoom), np.uint8))
    from medsynth.jobs import write_bytes
    from medsynth.qc.report import png_bytes

    return write_bytes(path, png_bytes(canvas))
