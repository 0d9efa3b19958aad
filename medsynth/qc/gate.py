"""The quality gate between ``generate`` and ``export``: per-sample verdicts, quarantine, report.

:func:`run_qc` judges every sample of a samples folder (:mod:`medsynth.samples`) against a
reference manifest of real training cases:

1. the sample grid comes from the config (``--config`` or ``--run RUN_DIR/config.yaml``:
   ``data.shape`` on :func:`medsynth.data.transforms.target_affine`) or, without one, from the
   samples' sidecars (the most common shape + affine);
2. reference cases are resampled onto that grid with medsynth's MONAI chain
   (:func:`medsynth.data.transforms.build_transforms`) and mapped back to physical units with the
   exact inverse of the intensity normalisation; unreadable cases are reported and skipped;
3. per-volume checks (:mod:`medsynth.qc.checks`) with ranges learned from the reference;
4. the memorisation screen (:mod:`medsynth.privacy.memorisation`), calibrated on held-out real
   cases, plus a self-test with planted copies of training cases;
5. dataset metrics (:mod:`medsynth.qc.metrics`);
6. ``<id>.qc.json`` beside each sample (the verdict ``export`` reads), failing samples moved to
   ``SAMPLES_DIR/quarantine/``, and ``OUT/qc.json`` + ``OUT/report.html``.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from medsynth import __version__
from medsynth.config import (
    Config,
    DataConfig,
    IntensityConfig,
    PrivacyConfig,
    QCConfig,
    config_to_dict,
)
from medsynth.errors import MedsynthError, QCError
from medsynth.jobs import sha256_file, write_json, write_text
from medsynth.progress import progress
from medsynth.qc.checks import (
    Grid,
    artefact_score,
    check_volume,
    learn_ranges,
    volume_stats,
)
from medsynth.qc.features import (
    Standardiser,
    body_mask,
    feature_vector,
    radiomics_features,
)
from medsynth.samples import Sample, scan_samples

log = logging.getLogger("medsynth.qc.gate")

QC_FORMAT = "medsynth-qc/1"
REPORT_FORMAT = "medsynth-qc-report/1"
MIN_REFERENCE_CASES = 3


@dataclass
class QCOutcome:
    """What :func:`run_qc` did: counts, the quarantined sample ids, and where the outputs are."""

    n_samples: int
    n_passed: int
    n_failed: int
    quarantined: list[str]
    qc_json: Path
    report_html: Path
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# config and grid
# ---------------------------------------------------------------------------------------------


def load_qc_config(config: Optional[str | Path] = None, run_dir: Optional[str | Path] = None) -> tuple[Optional[Config], str]:
    """The config ``qc`` judges with: ``config`` or the run's config, or None (infer the grid).

    Returns (config or None, a sentence saying where the grid comes from).
    """
    from medsynth.config import load_config
    from medsynth.jobs import RunPaths, load_run_config

    if config is not None and run_dir is not None:
        raise QCError("give either `config` or `run_dir`, not both")
    if run_dir is not None:
        cfg = load_run_config(run_dir, error=QCError,
                              hint="pass the run directory of 'medsynth train', or `config=CONFIG`")
        return cfg, f"grid from the run's config ({RunPaths(Path(run_dir)).config.name})"
    if config is not None:
        return load_config(config), f"grid from the config {Path(config).name}"
    return None, "grid inferred from the samples' sidecars (no --config/--run given)"


def _sample_grid(s: Sample) -> tuple[tuple[int, int, int], np.ndarray]:
    meta = s.sidecar
    if isinstance(meta.get("shape"), list) and isinstance(meta.get("affine"), list):
        aff = np.asarray(meta["affine"], dtype=np.float64)
        if aff.shape == (4, 4):
            return tuple(int(x) for x in meta["shape"]), aff  # type: ignore[return-value]
    v = s.load()
    return v.shape, v.affine


def infer_grid(samples: Sequence[Sample]) -> tuple[Grid, str]:
    """The most common (shape, affine) among the samples' sidecars, and the most common modality."""
    keys: Counter = Counter()
    grids: dict[Any, tuple[tuple[int, int, int], np.ndarray]] = {}
    mods: Counter = Counter()
    for s in samples:
        try:
            shape, aff = _sample_grid(s)
        except (MedsynthError, TypeError, ValueError):  # unreadable image or a malformed sidecar grid
            continue
        key = (shape, tuple(np.round(aff, 4).ravel()))
        keys[key] += 1
        grids.setdefault(key, (shape, aff))
        mods[str(s.sidecar.get("modality", "CT"))] += 1
    if not keys:
        raise QCError("could not read the grid of any sample",
                      hint="pass `cfg=CONFIG`, the config of the run the samples came from")
    shape, aff = grids[keys.most_common(1)[0][0]]
    return Grid(shape, aff), mods.most_common(1)[0][0]


def _grid_data_config(grid: Grid, modality: str, qc: QCConfig) -> DataConfig:
    """A data config that resamples reference cases onto ``grid`` with no intensity loss beyond
    the physical range (CT) or none at all (MR: percentiles 0..100, exactly invertible)."""
    if modality == "CT":
        intensity = IntensityConfig(window=tuple(qc.ct_range), percentiles=None)  # type: ignore[arg-type]
    else:
        intensity = IntensityConfig(window=None, percentiles=(0.0, 100.0))
    return DataConfig(modality=modality, spacing=grid.spacing, shape=grid.shape,  # type: ignore[arg-type]
                      orientation=grid.orientation, intensity=intensity, cache="none")


# ---------------------------------------------------------------------------------------------
# reference cases
# ---------------------------------------------------------------------------------------------


def _why(exc: BaseException, what: str = "could not be read or resampled") -> str:
    """A one-line reason for a failed case: the MedsynthError in the chain, else ``what`` and the
    exception type (its message may quote data, so it is not repeated)."""
    e: Optional[BaseException] = exc
    while e is not None:
        if isinstance(e, MedsynthError):
            return e.message
        e = e.__cause__ or e.__context__
    return f"{what} ({type(exc).__name__})"


@dataclass
class ResampledCases:
    """Manifest cases on the sample grid in physical units: ``ids`` and ``arrays`` of the cases read,
    ``labels`` (with ``with_labels``: each case's integer label map on the grid, or None), and
    ``skipped`` (``{"id", "reason"}`` per case that could not be read)."""

    ids: list[str]
    arrays: list[np.ndarray]
    skipped: list[dict[str, str]]
    labels: list[Optional[np.ndarray]]


def resample_cases(cases: Sequence[Any], data_cfg: DataConfig, desc: str = "reference",
                   with_labels: bool = False) -> ResampledCases:
    """Resample manifest cases onto the sample grid in physical units.

    Uses :func:`medsynth.data.transforms.build_transforms` (orientation, spacing, pad/crop) and the
    exact inverse of its intensity normalisation; one bad case never sinks the run (it is
    skipped, with its reason).  ``with_labels`` also resamples each case's label map
    (nearest-neighbour on the same grid, integer).
    """
    from medsynth.data.transforms import IntensityNorm, build_transforms, case_dict

    tf = build_transforms(data_cfg)
    tf_lab = build_transforms(data_cfg, with_label=True) if with_labels else None
    out = ResampledCases([], [], [], [])
    for c in progress(cases, desc=desc, total=len(cases)):
        try:
            with_label = tf_lab is not None and c.label is not None
            d = (tf_lab if with_label else tf)(case_dict(c, with_label))
            norm = IntensityNorm(float(d["intensity_lo"]), float(d["intensity_hi"]))
            arr = np.asarray(norm.inverse(d["image"][0].detach().cpu().numpy().astype(np.float64)))
            lab = np.rint(d["label"][0].detach().cpu().numpy()).astype(np.int32) if with_label else None
        except Exception as exc:  # noqa: BLE001 - MONAI wraps reader errors in RuntimeError; report and skip
            reason = _why(exc)
            log.warning("reference case %s skipped: %s", c.id, reason)
            out.skipped.append({"id": c.id, "reason": reason})
            continue
        out.ids.append(c.id)
        out.arrays.append(arr)
        if with_labels:
            out.labels.append(lab)
    return out


# ---------------------------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------------------------


@dataclass
class _Vol:
    """One volume prepared for the dataset-level steps (reference case or usable sample)."""

    array: np.ndarray          # clipped to the analysis window
    mask: np.ndarray
    features: Optional[np.ndarray] = None
    prepared: Optional[np.ndarray] = None
    label: Optional[np.ndarray] = None   # its integer label map on the grid (the lesion screen), if any


def analysis_window(cfg: Optional[Config], modality: str, qc: QCConfig) -> Optional[tuple[float, float]]:
    """The intensity window the gate clips to before its statistics: for CT the model's HU window
    (``cfg.data.intensity.window``), else the physical range ``qc.ct_range``; None for MR."""
    if modality != "CT":
        return None
    if cfg is not None and cfg.data.intensity.window is not None:
        return (float(cfg.data.intensity.window[0]), float(cfg.data.intensity.window[1]))
    return (float(qc.ct_range[0]), float(qc.ct_range[1]))


def _unit_scale(arr: np.ndarray, window: Optional[tuple[float, float]]) -> np.ndarray:
    lo, hi = window if window is not None else tuple(np.percentile(arr, [0.5, 99.5]))
    return np.clip((arr - lo) / max(hi - lo, 1e-9), 0.0, 1.0).astype(np.float32)


def _planted_copies(arrays: Sequence[np.ndarray], idx: Sequence[int], seed: int,
                    window: Optional[tuple[float, float]]) -> list[tuple[str, int, np.ndarray]]:
    """Copies of training volumes as a memorising model might emit them: noised, shifted, rescaled."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = []
    for j in idx:
        x = np.asarray(arrays[j], dtype=np.float64)
        span = float(np.percentile(x, 99) - np.percentile(x, 1)) or 1.0
        noisy = x + rng.normal(0.0, 0.01 * span, x.shape)
        shifted = ndimage.shift(x, (1.0, -2.0, 1.0), order=0, mode="nearest")
        lo = window[0] if window else float(x.min())
        scaled = (x - lo) * 1.05 + lo
        for name, v in (("noise", noisy), ("shift", shifted), ("intensity_scale", scaled)):
            out.append((name, j, np.clip(v, *window) if window else v))
    return out


def too_few_reference_cases(reference: str | Path, n_read: int, n_cases: int) -> str:
    """Why the gate cannot run on this reference: too few cases, or too few of them readable."""
    if n_read == n_cases:
        return (f"{reference}: the reference has {n_cases} case(s); the quality gate needs at least "
                f"{MIN_REFERENCE_CASES}")
    return (f"{reference}: only {n_read} of {n_cases} reference cases could be read; the quality gate needs "
            f"at least {MIN_REFERENCE_CASES}")


def _judge(s: Sample, e: dict[str, Any], grid: Grid, modality: str, qc: QCConfig, ranges: Any,
           window: Optional[tuple[float, float]]) -> tuple[Optional[Any], Optional[Any]]:
    """Per-volume checks of one sample into its entry ``e``; returns (the Volume, its label Volume),
    the Volume None if the image cannot be read.  Anything unexpected fails the sample (never passes
    it, never stops QC)."""
    try:
        vol = s.load()
    except Exception as exc:  # noqa: BLE001 - a corrupt sample fails on its own
        e["reasons"].append(f"unreadable_image ({_why(exc, 'could not be read')})")
        return None, None
    label = None
    try:
        label = s.load_label()
    except Exception as exc:  # noqa: BLE001
        e["reasons"].append(f"unreadable_label ({_why(exc, 'could not be read')})")
    if vol.modality != modality:
        e["reasons"].append(f"modality_mismatch ({vol.modality} sample, {modality} reference grid)")
    try:
        cls = s.sidecar.get("class") if isinstance(s.sidecar, dict) else None
        res = check_volume(vol, grid, qc, ranges, label, window=window,
                           class_label=cls if isinstance(cls, int) and not isinstance(cls, bool) else None)
    except Exception as exc:  # a volume the checks cannot judge is not a pass
        log.debug("%s: checks failed", s.id, exc_info=True)
        e["reasons"].append(f"checks_failed ({_why(exc, 'the per-volume checks could not judge it')})")
        return None, None
    e["reasons"].extend(res.reasons)
    e.update(checks=res.checks, stats=res.stats, artefact=res.artefact)
    return vol, label


def _featurise_samples(featurise: Any, usable: list[tuple[int, "_Vol"]], entries: list[dict[str, Any]]
                       ) -> list[tuple[int, "_Vol"]]:
    """Features for the usable samples, in one batch; if that fails, one by one, and a sample
    whose features cannot be computed fails (it cannot be screened for memorisation)."""
    try:
        featurise([v for _, v in usable])
        return usable
    except Exception:  # find the sample(s) at fault below
        log.debug("batched features failed; computing them per sample", exc_info=True)
    kept = []
    for n, v in usable:
        try:
            featurise([v])
        except Exception as exc:  # noqa: BLE001
            entries[n]["reasons"].append(f"features_failed ({_why(exc, 'features could not be computed')})")
            continue
        kept.append((n, v))
    return kept


@dataclass
class _Setting:
    """The grid, modality and analysis window every volume is judged on, and where they come from."""

    grid: Grid
    modality: str
    data_cfg: DataConfig       # resamples reference cases onto the grid
    window: Optional[tuple[float, float]]
    source: str
    qc: QCConfig
    pc: PrivacyConfig

    def vol(self, arr: np.ndarray, affine: Optional[np.ndarray] = None) -> _Vol:
        """A volume clipped to the analysis window, with its body mask."""
        a = np.clip(arr, *self.window) if self.window else arr
        return _Vol(a, body_mask(a, self.grid.affine if affine is None else affine, self.modality,
                                 self.qc.body_threshold_hu))


@dataclass
class _Reference:
    """The reference cases on the grid: ids, volumes, ranges learned from them, what was skipped."""

    manifest: Any
    ids: list[str]
    vols: list[_Vol]
    skipped: list[dict[str, str]]
    ranges: Any
    artefact_scores: list[float]


@dataclass
class _FeatureSpace:
    """Where samples and reference cases are compared: radiomics or a local network's features."""

    name: str
    description: str
    featurise: Callable[[Sequence[_Vol]], None]
    std: Any = None  # the Standardiser fitted on the reference

    def of(self, vols: Sequence[_Vol]) -> np.ndarray:
        return self.std(np.stack([v.features for v in vols]))


@dataclass
class _Holdout:
    """The real cases that calibrate the memorisation screen."""

    vols: list[_Vol]
    calibration_train: Optional[list[int]]
    mode: str
    info: dict[str, Any]

    def training_indices(self, n_reference: int) -> list[int]:
        """The reference cases the held-out ones are compared with: all, or the internal split's rest."""
        return list(range(n_reference)) if self.calibration_train is None else list(self.calibration_train)


def _samples_to_judge(samples_dir: Path) -> tuple[list[Sample], list[str]]:
    """The readable samples and the messages of the broken ones (which get no verdict)."""
    try:
        listing = scan_samples(samples_dir)
    except MedsynthError as exc:
        raise QCError(exc.message, hint=exc.hint) from None
    broken = [str(b.error) for b in listing.broken]
    for msg in broken:
        log.warning("sample skipped, no verdict written: %s", msg)
    if not listing.samples:
        raise QCError(f"{samples_dir}: none of its {len(broken)} sample sidecar(s) can be read; first: {broken[0]}",
                      hint="regenerate the samples with 'medsynth generate'")
    return listing.samples, broken


def _setting(cfg: Optional[Config], samples: Sequence[Sample], grid_source: str) -> _Setting:
    """The grid from the config, else inferred from the samples' sidecars."""
    qc: QCConfig = cfg.qc if cfg is not None else QCConfig()
    pc: PrivacyConfig = cfg.privacy if cfg is not None else PrivacyConfig()
    if cfg is not None:
        from medsynth.data.transforms import target_affine

        grid, modality = Grid(tuple(cfg.data.shape), target_affine(cfg.data)), cfg.data.modality
        data_cfg = dataclasses.replace(cfg.data, cache="none")
    else:
        grid, modality = infer_grid(samples)
        data_cfg = _grid_data_config(grid, modality, qc)
    source = grid_source or ("grid from the config" if cfg is not None else "grid inferred from the samples")
    return _Setting(grid, modality, data_cfg, analysis_window(cfg, modality, qc), source, qc, pc)


def _reference(reference: str | Path, st: _Setting) -> _Reference:
    """Resample the reference manifest onto the grid and learn the per-volume ranges from it."""
    from medsynth.manifest import load_manifest

    manifest = load_manifest(reference)
    res = resample_cases(manifest.cases, st.data_cfg, with_labels=True)
    if len(res.ids) < MIN_REFERENCE_CASES:
        raise QCError(too_few_reference_cases(reference, len(res.ids), len(manifest.cases)),
                      hint="fix the unreadable cases (see the log) or give a larger reference manifest"
                      if res.skipped else "give a reference manifest with more cases")
    vols = [st.vol(arr) for arr in res.arrays]
    for v, lab in zip(vols, res.labels):
        v.label = lab
    classes = {c.id: c.class_label for c in manifest.cases}
    ranges = learn_ranges([volume_stats(v.array, v.mask, st.modality, v.label) for v in vols],
                          st.qc, classes=[classes.get(i) for i in res.ids])
    artefact = [float(artefact_score(v.array, v.mask, st.grid.spacing)["score"]) for v in vols]
    return _Reference(manifest, res.ids, vols, res.skipped, ranges, artefact)


def _feature_space(st: _Setting) -> _FeatureSpace:
    from medsynth.privacy.memorisation import prepare_volume

    qc, net = st.qc, None
    if qc.feature_checkpoint:
        from medsynth.qc.features import NetworkFeatures

        net = NetworkFeatures(qc.feature_checkpoint, qc.feature_network)
        name = qc.feature_network
        description = (f"global-average-pooled activations of a local {qc.feature_network} checkpoint "
                       f"({Path(qc.feature_checkpoint).name}), z-scored against the reference")
    else:
        name = "radiomics"
        description = ("radiomics-style features (first-order intensity statistics inside the body, tissue "
                       "fractions, body shape moments, gradient and grey-level co-occurrence texture), "
                       "z-scored against the reference; no network, no downloaded weights")

    def featurise(vols: Sequence[_Vol]) -> None:
        if not vols:
            return
        if net is not None:
            for v, f in zip(vols, net([v.array for v in vols], [v.mask for v in vols])):
                v.features = f
        else:
            for v in vols:
                v.features = feature_vector(radiomics_features(v.array, st.grid.affine, st.modality, v.mask,
                                                               st.window, qc.body_threshold_hu))
        for v in vols:
            v.prepared = prepare_volume(v.array, st.pc, st.window)

    return _FeatureSpace(name, description, featurise)


def _holdout(holdout: Optional[str | Path], ref: _Reference, st: _Setting, space: _FeatureSpace) -> _Holdout:
    """A hold-out manifest (less any case that is also a reference case), else an internal split."""
    from medsynth.manifest import load_manifest
    from medsynth.privacy.memorisation import holdout_split

    pc = st.pc
    if holdout is None:
        tr_idx, ho_idx = holdout_split(ref.ids, pc.holdout_fraction, pc.holdout_seed)
        return _Holdout([ref.vols[i] for i in ho_idx], tr_idx, "internal_split",
                        {"source": f"internal split: {len(ho_idx)} of {len(ref.ids)} reference cases "
                                   f"(privacy.holdout_fraction {pc.holdout_fraction})",
                         "ids": [ref.ids[i] for i in ho_idx]})
    hman = load_manifest(holdout)
    # a hold-out case must not be a training case: same file or same content (ids may repeat
    # between manifests, so they do not decide)
    cases = ref.manifest.cases
    used = {c.id for c in cases if c.id in set(ref.ids)}
    seen_paths = {Path(c.image).resolve() for c in cases if c.id in used}
    seen_sha = {c.sha256 for c in cases if c.id in used and c.sha256}
    hcases = [c for c in hman.cases if Path(c.image).resolve() not in seen_paths and not (c.sha256 and c.sha256 in seen_sha)]
    res = resample_cases(hcases, st.data_cfg, desc="hold-out", with_labels=True)
    if not res.ids:
        raise QCError(f"{holdout}: no readable hold-out case that is not also a reference case",
                      hint="the hold-out manifest must list real cases the model did not train on")
    held = [st.vol(arr) for arr in res.arrays]
    for v, lab in zip(held, res.labels):
        v.label = lab
    space.featurise(held)
    return _Holdout(held, None, "holdout_manifest",
                    {"source": Path(holdout).name, "n_cases": len(res.ids), "skipped": res.skipped,
                     "n_dropped_also_in_reference": len(hman.cases) - len(hcases)})


@dataclass
class _Judgement:
    """Per sample: its entry (verdict so far), and the volumes that go on to the dataset steps."""

    entries: list[dict[str, Any]]
    usable: list[tuple[int, _Vol]]                              # (entry index, volume) on the grid, finite
    montage_src: dict[int, tuple[np.ndarray, np.ndarray]]      # entry index -> (array, affine)

    def passing(self) -> list[_Vol]:
        return [v for n, v in self.usable if not self.entries[n]["reasons"]]


def _judge_samples(samples: Sequence[Sample], st: _Setting, ranges: Any) -> _Judgement:
    out = _Judgement([], [], {})
    for n, s in enumerate(progress(samples, desc="qc", total=len(samples))):
        e: dict[str, Any] = {"id": s.id, "file": s.image_path.name, "passed": True, "reasons": [],
                             "checks": {}, "stats": {}, "artefact": {}, "memorisation": None,
                             "lesion_memorisation": None}
        out.entries.append(e)
        vol, label = _judge(s, e, st.grid, st.modality, st.qc, ranges, st.window)
        if vol is None:
            continue
        arr = np.asarray(vol.array, dtype=np.float64)
        out.montage_src[n] = (arr, vol.affine)
        if vol.shape == st.grid.shape and np.all(np.isfinite(arr)):
            v = st.vol(arr, vol.affine)
            if label is not None and tuple(label.shape) == tuple(st.grid.shape):
                v.label = np.rint(np.asarray(label.array)).astype(np.int32)
            out.usable.append((n, v))
    return out


def _screen_samples(screen: Any, space: _FeatureSpace, j: _Judgement) -> None:
    """The memorisation screen of the usable samples; a flagged sample fails."""
    j.usable = _featurise_samples(space.featurise, j.usable, j.entries)
    if not j.usable:
        return
    results = screen.screen(np.stack([v.prepared for _, v in j.usable]), space.of([v for _, v in j.usable]))
    for (n, _), r in zip(j.usable, results):
        j.entries[n]["memorisation"] = r.to_dict()
        if r.flagged:
            j.entries[n]["reasons"].append(r.reason)


def _self_test(screen: Any, space: _FeatureSpace, ref: _Reference, hold: _Holdout, st: _Setting) -> dict[str, Any]:
    """Planted copies of training cases, screened like samples: each must be flagged."""
    pick = hold.training_indices(len(ref.vols))[:2]
    planted = _planted_copies([v.array for v in ref.vols], pick, st.pc.holdout_seed, st.window)
    pvols = [st.vol(p) for _, _, p in planted]
    space.featurise(pvols)
    pres = screen.screen(np.stack([v.prepared for v in pvols]), space.of(pvols))
    return {"description": "copies of training cases (noise 1 % of the intensity span, shift (1, -2, 1) "
                           "voxels, intensity x1.05) screened like samples; each must be flagged "
                           "and name its source case",
            "planted": len(planted),
            "flagged": int(sum(r.flagged for r in pres)),
            "named_source": int(sum(r.flagged and r.nearest_image_case == ref.ids[j]
                                    for r, (_, j, _) in zip(pres, planted))),
            "copies": [{"kind": k, "source": ref.ids[j], "flagged": r.flagged,
                        "image_distance": round(r.image_distance, 6)} for (k, j, _), r in zip(planted, pres)]}


def _lesion_value(cfg: Optional[Config], ref: _Reference, st: _Setting) -> tuple[Optional[int], str]:
    """The label value the lesion screen looks for, and the name it has (or why there is none):
    ``model.lesion_inpainter.label`` of the run, else ``privacy.lesion_label``, looked up in the
    run's label set, else in the reference manifest's ``labels`` mapping."""
    from medsynth.model.labels import label_names

    name = (cfg.model.lesion_inpainter.label if cfg is not None and cfg.model.lesion_inpainter is not None
            else st.pc.lesion_label)
    names = label_names(cfg) if cfg is not None else {}
    if not names:
        lab = ref.manifest.extra.get("labels") if isinstance(ref.manifest.extra, dict) else None
        if isinstance(lab, dict):
            names = {str(k): int(v) for k, v in lab.items() if isinstance(v, int) and not isinstance(v, bool)}
    return names.get(name), name


def _lesion_screen(cfg: Optional[Config], ref: _Reference, hold: _Holdout, st: _Setting
                   ) -> tuple[Optional[Any], dict[str, Any]]:
    """The lesion-level memorisation screen, or None with the reason it does not apply."""
    from medsynth.privacy.lesion_screen import LesionScreen

    if not st.pc.lesion_screen:
        return None, {"applied": False, "why": "privacy.lesion_screen is off"}
    value, name = _lesion_value(cfg, ref, st)
    if value is None:
        return None, {"applied": False, "why": f"no label named {name!r} in the label set (privacy.lesion_label)"}
    train = [(ref.ids[i], ref.vols[i].array, ref.vols[i].label) for i in hold.training_indices(len(ref.vols))
             if ref.vols[i].label is not None]
    if not any(np.any(lab == value) for _, _, lab in train):
        return None, {"applied": False, "why": f"the reference's label maps hold no {name!r} (value {value})"}
    pad = st.window[0] if st.window else float(min(v.array.min() for v in ref.vols))
    heldout = [(v.array, v.label) for v in hold.vols if v.label is not None]
    screen = LesionScreen(value, st.grid.spacing, st.grid.affine, pad, train, heldout, st.pc)
    log.info("lesion memorisation threshold: %s (from %d held-out lesions, %d training lesions)",
             screen.calibration.threshold, screen.calibration.n_heldout_lesions, screen.calibration.n_train_lesions)
    return screen, {"applied": True, "label": name, "value": value, "radius_mm": st.pc.lesion_radius_mm,
                    "max_shift_voxels": st.pc.lesion_max_shift}


def _screen_lesions(lscreen: Optional[Any], j: _Judgement) -> None:
    """The lesion screen of the usable samples; a flagged sample (or one it cannot judge) fails."""
    if lscreen is None:
        return
    for n, v in j.usable:
        verdict = lscreen.screen(v.array, v.label)
        if verdict is None:
            continue
        j.entries[n]["lesion_memorisation"] = verdict.to_dict()
        if verdict.flagged:
            j.entries[n]["reasons"].append(verdict.reason)


def _lesion_self_test(lscreen: Any, ref: _Reference, hold: _Holdout, st: _Setting) -> dict[str, Any]:
    """Copies of training lesions pasted into a held-out case (noised, mirrored, moved one voxel),
    screened like samples: each must be flagged and name its source case."""
    from medsynth.privacy.lesion_screen import find_lesions, plant_lesion_copy

    dst = next((v for v in hold.vols if v.label is not None), None)
    sources = [] if dst is None else [
        (i, les[0]) for i in hold.training_indices(len(ref.vols)) if ref.vols[i].label is not None
        for les in [find_lesions(ref.vols[i].label, lscreen.value)] if les][:2]
    rng = np.random.default_rng(st.pc.holdout_seed)
    copies = []
    for i, les in sources:
        src = ref.vols[i]
        for kind in ("noise", "mirror", "shift"):
            img, lab = plant_lesion_copy(src.array, src.label, dst.array, dst.label, les.centre, lscreen.half,
                                         lscreen.value, kind, lscreen.axis, rng, st.window)
            v = lscreen.screen(img, lab)
            flagged = bool(v is not None and v.flagged and v.reason.startswith("possible_lesion_copy"))
            named = flagged and any(r.get("flagged") and r.get("nearest_training_case") == ref.ids[i]
                                    for r in v.lesions)
            copies.append({"kind": kind, "source": ref.ids[i], "flagged": flagged, "named_source": named,
                           "distance": None if v is None else min((r.get("distance", 1.0) for r in v.lesions),
                                                                  default=None)})
    return {"description": "a training lesion's neighbourhood pasted into a held-out case (noise 1 % of the "
                           "intensity span, left-right mirrored, moved one voxel), screened like samples; each "
                           "must be flagged and name its source case",
            "planted": len(copies), "flagged": sum(c["flagged"] for c in copies),
            "named_source": sum(c["named_source"] for c in copies), "copies": copies}


def _lesion_summary(lscreen: Optional[Any], info: dict[str, Any], entries: Sequence[dict[str, Any]],
                    self_test: Optional[dict[str, Any]]) -> dict[str, Any]:
    if lscreen is None:
        return info
    screened = [e["lesion_memorisation"] for e in entries if e.get("lesion_memorisation")]
    return {**info, "calibration": lscreen.calibration.to_dict(),
            "n_samples_with_lesions": len(screened),
            "n_lesions_screened": sum(len(m["lesions"]) for m in screened),
            "n_flagged": sum(bool(m["flagged"]) for m in screened), "self_test": self_test}


def _metrics(space: _FeatureSpace, ref: _Reference, j: _Judgement, st: _Setting) -> dict[str, Any]:
    """The dataset figures of what export will ship: the samples that passed every check."""
    from medsynth.qc.metrics import dataset_metrics

    passing = j.passing()
    fake_feats = space.of(passing) if passing else np.zeros((0, len(space.std.mean)))
    return dataset_metrics(space.of(ref.vols), fake_feats, space.name, st.qc.knn_k,
                           np.stack([_unit_scale(v.array, st.window) for v in ref.vols]),
                           np.stack([_unit_scale(v.array, st.window) for v in passing]) if passing else None,
                           st.qc.max_pairs, st.qc.seed)


def _reference_info(ref: _Reference) -> dict[str, Any]:
    m = ref.manifest
    return {"name": m.name, "manifest": Path(m.path).name if m.path else None,
            "sha256": sha256_file(m.path) if m.path else None,
            "n_cases": len(m.cases), "n_cases_used": len(ref.ids),
            "n_cases_skipped": len(ref.skipped), "skipped": ref.skipped}


def _write_verdicts(samples: Sequence[Sample], entries: list[dict[str, Any]], qc_meta: dict[str, Any],
                    qdir: Optional[Path]) -> list[str]:
    """``<id>.qc.json`` beside every sample; failing samples moved into ``qdir`` (None: left in place)."""
    quarantined = []
    for s, e in zip(samples, entries):
        e["passed"] = not e["reasons"]
        verdict = {"format": QC_FORMAT, "id": s.id, "passed": e["passed"], "reasons": e["reasons"],
                   "image": s.image_path.name,
                   "image_sha256": sha256_file(s.image_path) if s.image_path.is_file() else None,
                   "checks": e["checks"], "stats": e["stats"], "artefact": e["artefact"],
                   "memorisation": e["memorisation"], "lesion_memorisation": e.get("lesion_memorisation"),
                   "qc": qc_meta}
        write_json(s.qc_path, verdict)
        if not e["passed"] and qdir is not None:
            e["quarantined_to"] = [str(Path("quarantine") / f) for f in _quarantine(s, qdir)]
            quarantined.append(s.id)
    return quarantined


def _memorisation_summary(screen: Any, entries: Sequence[dict[str, Any]],
                          self_test: Optional[dict[str, Any]]) -> dict[str, Any]:
    n_screened = sum(1 for e in entries if e["memorisation"])
    n_flagged = sum(1 for e in entries if e["memorisation"] and e["memorisation"]["flagged"])
    h_img = np.asarray(screen.calibration.heldout_image)
    return {"calibration": screen.calibration.to_dict(), "n_screened": n_screened, "n_flagged": n_flagged,
            "flag_rate": (n_flagged / n_screened) if n_screened else None,
            "heldout_false_positive_rate": float(np.mean(h_img < screen.calibration.image_threshold)),
            "self_test": self_test}


def _sample_rows(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": e["id"], "file": e["file"], "passed": e["passed"], "reasons": e["reasons"],
             **({"quarantined_to": e["quarantined_to"]} if "quarantined_to" in e else {}),
             "artefact_score": e["artefact"].get("score"), "stats": e["stats"],
             "memorisation": e["memorisation"], "lesion_memorisation": e.get("lesion_memorisation")}
            for e in entries]


def run_qc(samples_dir: str | Path, reference: str | Path, out_dir: str | Path,
           cfg: Optional[Config] = None, holdout: Optional[str | Path] = None,
           quarantine: bool = True, grid_source: str = "") -> QCOutcome:
    """Run the quality gate and memorisation screen on a samples folder (see the module docstring).

    Writes ``<id>.qc.json`` for every sample, moves failing samples (image, label, sidecar,
    verdict) into ``samples_dir/quarantine/`` unless ``quarantine`` is false, and writes
    ``out_dir/qc.json`` and ``out_dir/report.html``.  Raises :class:`QCError` when the run cannot
    judge anything (no samples, fewer than 3 readable reference cases); a bad sample only fails
    that sample.
    """
    from medsynth.privacy.memorisation import MemorisationScreen

    samples_dir, out_dir = Path(samples_dir), Path(out_dir)
    samples, broken = _samples_to_judge(samples_dir)
    st = _setting(cfg, samples, grid_source)
    ref = _reference(reference, st)
    space = _feature_space(st)
    space.featurise(ref.vols)
    space.std = Standardiser(np.stack([v.features for v in ref.vols]))
    hold = _holdout(holdout, ref, st, space)
    screen = MemorisationScreen(ref.ids, np.stack([v.prepared for v in ref.vols]), space.of(ref.vols),
                                np.stack([v.prepared for v in hold.vols]), space.of(hold.vols),
                                st.pc, calibration_train=hold.calibration_train, mode=hold.mode)

    lscreen, lesion_info = _lesion_screen(cfg, ref, hold, st)

    judged = _judge_samples(samples, st, ref.ranges)
    _screen_samples(screen, space, judged)
    _screen_lesions(lscreen, judged)
    self_test = _self_test(screen, space, ref, hold, st) if st.pc.self_test else None
    lesion_self_test = _lesion_self_test(lscreen, ref, hold, st) if lscreen is not None and st.pc.self_test else None
    metrics = _metrics(space, ref, judged, st)

    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    ref_info = _reference_info(ref)
    entries = judged.entries
    quarantined = _write_verdicts(samples, entries, {
        "created": created, "medsynth_version": __version__, "reference": ref.manifest.name,
        "reference_sha256": ref_info["sha256"], "report": str(out_dir / "qc.json")},
        samples_dir / "quarantine" if quarantine else None)
    n_passed = sum(e["passed"] for e in entries)
    summary: dict[str, Any] = {
        "format": REPORT_FORMAT, "created": created, "medsynth_version": __version__,
        "samples_dir": str(samples_dir),
        "grid": {**st.grid.to_dict(), "modality": st.modality, "source": st.source,
                 "analysis_window": list(st.window) if st.window else None},
        "reference": ref_info, "holdout": hold.info,
        "settings": {"qc": config_to_dict(st.qc), "privacy": config_to_dict(st.pc)},
        "feature_space": {"name": space.name, "description": space.description},
        "reference_ranges": ref.ranges.to_dict(),
        "reference_artefact_scores": [round(x, 4) for x in ref.artefact_scores],
        "metrics": metrics, "metrics_n_synthetic": len(judged.passing()),
        "memorisation": _memorisation_summary(screen, entries, self_test),
        "lesion_memorisation": _lesion_summary(lscreen, lesion_info, entries, lesion_self_test),
        "counts": {"samples": len(entries), "passed": n_passed, "failed": len(entries) - n_passed,
                   "quarantined": len(quarantined), "unreadable_sidecars": len(broken)},
        "unreadable_sidecars": broken,
        "samples": _sample_rows(entries),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    qc_json = write_json(out_dir / "qc.json", summary)
    html = _render(summary, ref.vols, ref.ids, entries, judged.montage_src, judged.usable, st.window, st.grid,
                   st.modality, st.qc, screen)
    report = write_text(out_dir / "report.html", html)
    log.info("qc: %d samples, %d passed, %d failed%s", len(entries), n_passed, len(entries) - n_passed,
             f" ({len(quarantined)} quarantined)" if quarantined else "")
    return QCOutcome(len(entries), n_passed, len(entries) - n_passed, quarantined, qc_json, report, summary)


def _quarantine(s: Sample, qdir: Path) -> list[str]:
    """Move one sample's files into ``qdir`` (same filesystem, ``os.replace``), sidecar first.

    The sidecar goes first because a sample exists only while its sidecar does: from that moment
    no stage sees it in the samples folder, even if the run dies before the rest is moved.
    """
    qdir.mkdir(parents=True, exist_ok=True)
    moved = []
    for p in (s.sidecar_path, s.image_path, s.label_path, s.qc_path):
        if p is not None and p.is_file():
            os.replace(p, qdir / p.name)
            moved.append(p.name)
    return moved


def _render(summary: dict[str, Any], ref: Sequence[_Vol], ref_ids: Sequence[str], entries: Sequence[dict[str, Any]],
            montage_src: dict[int, tuple[np.ndarray, np.ndarray]], usable: Sequence[tuple[int, _Vol]],
            window: Optional[tuple[float, float]], grid: Grid, modality: str, qc: QCConfig, screen: Any) -> str:
    from medsynth.qc.report import (
        FAIL_RGB,
        REAL_RGB,
        SYNTH_RGB,
        line_plot,
        montage,
        orthogonal_slices,
        png_bytes,
        render_html,
        strip_plot,
    )

    # CT is shown (and histogrammed) in one wide window; MR in each volume's own 1..99th percentiles
    ct_display = (-1000.0, 1000.0)

    def disp(arr: np.ndarray) -> tuple[float, float]:
        if modality == "CT":
            return ct_display
        lo, hi = np.percentile(arr[np.isfinite(arr)], [1, 99]) if np.isfinite(arr).any() else (0.0, 1.0)
        return float(lo), float(hi)

    montages = []
    for cid, v in list(zip(ref_ids, ref))[:qc.montage_count]:
        montages.append({"title": f"real: {cid}", "kind": "real", "passed": True, "reasons": [],
                         "png": png_bytes(montage(orthogonal_slices(v.array, grid.affine, disp(v.array))))})
    shown_pass = [n for n, e in enumerate(entries) if e["passed"] and n in montage_src][:qc.montage_count]
    shown_fail = [n for n, e in enumerate(entries) if not e["passed"] and n in montage_src][:qc.montage_count]
    for n in shown_pass + shown_fail:
        arr, aff = montage_src[n]
        e = entries[n]
        montages.append({"title": f"synthetic: {e['file']}", "kind": "synthetic", "passed": e["passed"],
                         "reasons": e["reasons"],
                         "png": png_bytes(montage(orthogonal_slices(arr, aff, disp(arr))))})

    # pooled intensity histograms inside the body
    if modality == "CT":
        lo, hi = ct_display
    else:
        pooled = np.concatenate([v.array[v.mask] for v in ref if v.mask.any()] or [np.zeros(1)])
        lo, hi = (float(x) for x in np.percentile(pooled, [0.5, 99.5]))
    bins = np.linspace(lo, hi, 101)

    def hist(vols: Sequence[_Vol]) -> np.ndarray:
        vals = [v.array[v.mask] for v in vols if v.mask.any()]
        if not vals:
            return np.zeros(100)
        h, _ = np.histogram(np.clip(np.concatenate(vals), lo, hi), bins=bins, density=True)
        return h

    series = [(hist(ref), REAL_RGB)]
    passing = [v for n, v in usable if entries[n]["passed"]]
    if passing:
        series.append((hist(passing), SYNTH_RGB))
    histograms = {"png": png_bytes(line_plot(series)), "range": (lo, hi),
                  "units": "HU" if modality == "CT" else "a.u."}

    cal = screen.calibration
    sample_d = [(e["memorisation"]["image_distance"], e["memorisation"]["flagged"]) for e in entries if e["memorisation"]]
    # the axis spans the held-out distances generously; farther samples sit on the right edge
    all_d = list(cal.heldout_image) + [d for d, _ in sample_d] + [cal.image_threshold]
    x_max = min(max(all_d), 3.0 * max(max(cal.heldout_image), cal.image_threshold)) * 1.1
    x_max = x_max if x_max > 0 else 1.0
    rows = [(cal.heldout_image, REAL_RGB), ([d for d, f in sample_d if not f], SYNTH_RGB)]
    img = strip_plot(rows, x_max, cal.image_threshold)
    flagged = [d for d, f in sample_d if f]
    if flagged:  # overdraw flagged samples in red on the sample strip
        flag_img = strip_plot([([], REAL_RGB), (flagged, FAIL_RGB)], x_max, cal.image_threshold)
        red = np.all(flag_img == np.array(FAIL_RGB, np.uint8), axis=-1)
        img[red] = flag_img[red]
    distance_plot = {"png": png_bytes(img), "x_max": x_max, "threshold": cal.image_threshold}
    return render_html(summary, montages, histograms, distance_plot)
