"""The synthetic training set of the utility evaluation: QC-passed samples, N per class.

Samples come either from an existing samples folder (``medsynth generate`` + ``medsynth qc``
output) or are generated here from the run directory into ``OUT/synthetic`` and passed through
the QC gate.  Only samples whose ``<id>.qc.json`` verdict says ``"passed": true`` are used; the
others are counted and reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from medsynth.errors import MedsynthError
from medsynth.samples import Sample, scan_samples

log = logging.getLogger("medsynth.evaluate.synthetic")


@dataclass
class SyntheticSet:
    """The samples chosen per class and what was left out, with the reasons."""

    by_class: dict[int, list[Sample]]
    source: Path
    n_found: int = 0
    n_failed_qc: int = 0
    n_no_verdict: int = 0
    n_broken: int = 0
    include_failed: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def samples(self) -> list[Sample]:
        return [s for k in sorted(self.by_class) for s in self.by_class[k]]

    def summary(self) -> dict[str, Any]:
        used = self.samples
        return {"source": str(self.source), "found": self.n_found, "failed_qc": self.n_failed_qc,
                "no_qc_verdict": self.n_no_verdict, "broken": self.n_broken,
                "used_per_class": {str(k): len(v) for k, v in sorted(self.by_class.items())},
                "qc_filter": not self.include_failed,
                "used_without_passing_verdict": sum(1 for s in used if qc_status(s) is not True)}


def qc_status(sample: Sample) -> Optional[bool]:
    """True/False from the sample's QC verdict, None when it has none (or an unreadable one)."""
    try:
        v = sample.qc_verdict()
    except (OSError, ValueError):
        return None
    if not isinstance(v, dict) or not isinstance(v.get("passed"), bool):
        return None
    return v["passed"]


ANY_CLASS = -1  # the key of the one pool of an unconditional selection


def select_samples(samples_dir: Path, classes: Optional[Sequence[int]], n_per_class: int,
                   need_labels: bool = False, include_failed: bool = False) -> SyntheticSet:
    """Pick up to ``n_per_class`` QC-passed samples of each class from ``samples_dir`` (lowest index first).

    ``classes`` None pools every class (key ``ANY_CLASS``; for unconditional runs).  Samples
    without a verdict or with a failing one (in the folder, or moved to ``quarantine/`` by the QC
    gate) are counted and skipped, unless ``include_failed`` is set: then they are used too (the
    caller records that the QC gate was bypassed).  Broken samples (a sidecar without its image)
    are reported and skipped.  With ``need_labels`` a sample must carry a label map.
    """
    samples_dir = Path(samples_dir)
    qdir = samples_dir / "quarantine"
    errors: list[str] = []
    try:
        listing = scan_samples(samples_dir)
        samples, errors = listing.samples, [str(b.error) for b in listing.broken]
    except MedsynthError:
        if not qdir.is_dir():
            raise
        samples = []  # every sample failed QC and was moved to quarantine/
    quarantined: list[Sample] = []
    if qdir.is_dir():  # the QC gate moves failing samples here
        try:
            quarantined = scan_samples(qdir).samples
        except MedsynthError:
            quarantined = []
    keys = [ANY_CLASS] if classes is None else [int(k) for k in classes]
    out = SyntheticSet({k: [] for k in keys}, samples_dir, n_found=len(samples) + len(quarantined),
                       n_failed_qc=len(quarantined), n_broken=len(errors), include_failed=include_failed,
                       notes=list(errors))
    candidates = []
    for s in samples:
        st = qc_status(s)
        if st is None:
            out.n_no_verdict += 1
        elif not st:
            out.n_failed_qc += 1
        if st or include_failed:
            candidates.append(s)
    if include_failed:
        candidates += quarantined
        candidates.sort(key=lambda s: (s.sidecar.get("index", 0), s.id))
    n_unlabelled = 0
    for s in candidates:
        cls = s.sidecar.get("class")
        if classes is None:
            key = ANY_CLASS
        elif cls is None or int(cls) not in out.by_class:
            continue
        else:
            key = int(cls)
        if need_labels and s.label_path is None:
            n_unlabelled += 1
            continue
        if len(out.by_class[key]) < n_per_class:
            out.by_class[key].append(s)
    if out.n_no_verdict and not include_failed:
        out.notes.append(f"{out.n_no_verdict} sample(s) in {samples_dir} have no QC verdict and were not used "
                         "(run 'medsynth qc' on the folder)")
    if n_unlabelled:
        out.notes.append(f"{n_unlabelled} sample(s) carry no label map and were not used")
    return out


def generate_set(run_dir: Path, out_dir: Path, classes: Optional[Sequence[int]], n_per_class: int, seed: int,
                 qc_reference: Path, qc_out: Optional[Path] = None, steps: Optional[int] = None,
                 guidance: Optional[float] = None, batch_size: Optional[int] = None, device: Optional[str] = None,
                 need_labels: bool = False, include_failed: bool = False, max_rounds: int = 3) -> SyntheticSet:
    """Generate ``n_per_class`` samples of each class from ``run_dir`` into ``out_dir``, QC them, select.

    ``classes`` None generates unconditionally.  Class ``classes[j]`` gets the indices
    ``j * n * max_rounds + round * n + i``, so sample ids (and their seeds) are stable and a rerun
    resumes: samples already in ``out_dir`` are reused and indices already quarantined by QC are
    not generated again.  When the QC gate rejects some samples, up to ``max_rounds - 1`` more
    rounds generate replacements for the shortfall.  ``qc_reference`` is the train manifest the QC
    ranges and the memorisation screen are calibrated on (never the test manifest); the QC report
    goes to ``qc_out`` (default ``out_dir/../synthetic_qc``).  With ``include_failed`` the gate still
    runs and records its verdicts, but failing samples are used as well (no replacement rounds).
    """
    from medsynth.jobs import sample_id
    from medsynth.model.sample import Sampler, generate

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    qc_out = Path(qc_out) if qc_out is not None else out_dir.parent / "synthetic_qc"
    sampler = Sampler.from_run(run_dir, device=device)
    keys = [ANY_CLASS] if classes is None else [int(k) for k in classes]
    block = n_per_class * max_rounds
    chosen = SyntheticSet({k: [] for k in keys}, out_dir, include_failed=include_failed)
    for rnd in range(max_rounds):
        for j, k in enumerate(keys):
            short = n_per_class - len(chosen.by_class[k])
            if short <= 0:
                continue
            start = j * block + rnd * n_per_class
            indices = [i for i in range(start, start + short)
                       if not (out_dir / "quarantine" / f"{sample_id(sampler.run, i)}.json").is_file()]
            if indices:
                log.info("generating %d sample(s) of class %s (round %d)", len(indices),
                         "any" if k == ANY_CLASS else k, rnd + 1)
                generate(run_dir, out_dir, indices, seed=seed, class_label=None if k == ANY_CLASS else k,
                         steps=steps, guidance=guidance, batch_size=batch_size, sampler=sampler)
        if _unjudged(out_dir):
            run_gate(out_dir, run_dir, qc_reference, qc_out)
        chosen = select_samples(out_dir, None if classes is None else keys, n_per_class, need_labels=need_labels,
                                include_failed=include_failed)
        if all(len(v) >= n_per_class for v in chosen.by_class.values()):
            break
    return chosen


def _unjudged(samples_dir: Path) -> bool:
    """Whether any sample in the folder still lacks a QC verdict."""
    try:
        return any(qc_status(s) is None for s in scan_samples(samples_dir).samples)
    except MedsynthError:
        return False


def run_gate(samples_dir: Path, run_dir: Path, reference: Path, out_dir: Path) -> None:
    """Run ``medsynth qc`` on ``samples_dir`` with the run's config: verdicts beside the samples,
    failing samples moved to ``quarantine/``, the QC report in ``out_dir``.  The memorisation
    screen is calibrated on a hold-out of ``reference`` (the train manifest), never on test cases."""
    from medsynth.qc.gate import load_qc_config, run_qc

    cfg, where = load_qc_config(run_dir=run_dir)
    outcome = run_qc(samples_dir, reference, out_dir, cfg=cfg, grid_source=where)
    log.info("QC: %d of %d synthetic sample(s) passed", outcome.n_passed, outcome.n_samples)
