"""The synthetic training set of the utility evaluation: QC-passed samples, N per class.

Samples come either from an existing samples folder (``medsynth generate`` + ``medsynth qc``
output) or are generated here from the run directory into ``OUT/synthetic`` and passed through
the QC gate.  Only samples whose ``<id>.qc.json`` verdict says ``"passed": true`` are used; the
others are counted and reported.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from medsynth.errors import MedsynthError
from medsynth.samples import Sample, list_samples

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
    notes: list[str] = field(default_factory=list)

    @property
    def samples(self) -> list[Sample]:
        return [s for k in sorted(self.by_class) for s in self.by_class[k]]

    def summary(self) -> dict[str, Any]:
        return {"source": str(self.source), "found": self.n_found, "failed_qc": self.n_failed_qc,
                "no_qc_verdict": self.n_no_verdict, "broken": self.n_broken,
                "used_per_class": {str(k): len(v) for k, v in sorted(self.by_class.items())}}


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
                   need_labels: bool = False) -> SyntheticSet:
    """Pick up to ``n_per_class`` QC-passed samples of each class from ``samples_dir`` (lowest index first).

    ``classes`` None pools every class (key ``ANY_CLASS``; for unconditional runs).  Samples
    without a verdict or with a failing one are skipped and counted; broken samples (a sidecar
    without its image) are reported and skipped.  With ``need_labels`` a sample must carry a label
    map.
    """
    errors: list[str] = []
    samples = list_samples(Path(samples_dir), errors=errors)
    keys = [ANY_CLASS] if classes is None else [int(k) for k in classes]
    out = SyntheticSet({k: [] for k in keys}, Path(samples_dir), n_found=len(samples),
                       n_broken=len(errors), notes=list(errors))
    n_unlabelled = 0
    for s in samples:
        st = qc_status(s)
        if st is None:
            out.n_no_verdict += 1
            continue
        if not st:
            out.n_failed_qc += 1
            continue
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
    if out.n_no_verdict:
        out.notes.append(f"{out.n_no_verdict} sample(s) in {samples_dir} have no QC verdict and were not used "
                         "(run 'medsynth qc' on the folder)")
    if n_unlabelled:
        out.notes.append(f"{n_unlabelled} QC-passed sample(s) carry no label map and were not used")
    return out


def _call_with_supported(fn: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments it accepts (the engine's options may grow)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params and v is not None})


def generate_set(run_dir: Path, out_dir: Path, classes: Optional[Sequence[int]], n_per_class: int, seed: int,
                 qc_reference: Optional[Path] = None, steps: Optional[int] = None,
                 guidance: Optional[float] = None, batch_size: Optional[int] = None,
                 need_labels: bool = False, max_rounds: int = 3) -> SyntheticSet:
    """Generate ``n_per_class`` samples of each class from ``run_dir`` into ``out_dir``, QC them, select.

    ``classes`` None generates unconditionally.  Class ``classes[j]`` gets indices ``j * n * max_rounds + ...`` so sample ids (and their seeds)
    are stable; samples already in ``out_dir`` are reused.  When the QC gate rejects some, up to
    ``max_rounds - 1`` more rounds generate replacements for the shortfall.  ``qc_reference`` is
    the train manifest the QC ranges are learnt from (never the test manifest).
    """
    try:
        from medsynth.model.sample import generate
    except ImportError as exc:
        raise MedsynthError(f"generating synthetic samples needs the model engine (medsynth.model.sample): {exc}",
                            hint="generate and QC samples separately and pass their folder with --samples") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    block = n_per_class * max_rounds
    keys = [ANY_CLASS] if classes is None else [int(k) for k in classes]
    chosen = SyntheticSet({k: [] for k in keys}, out_dir)
    for rnd in range(max_rounds):
        for j, k in enumerate(keys):
            short = n_per_class - len(chosen.by_class[k])
            if short <= 0:
                continue
            start = j * block + rnd * n_per_class
            indices = list(range(start, start + short))
            log.info("generating %d sample(s) of class %s (round %d)", len(indices), k, rnd + 1)
            _call_with_supported(generate, run_dir=Path(run_dir), out_dir=out_dir, indices=indices, seed=seed,
                                 class_label=None if k == ANY_CLASS else k, steps=steps, guidance=guidance, batch_size=batch_size)
        run_qc(out_dir, run_dir, qc_reference)
        chosen = select_samples(out_dir, classes, n_per_class, need_labels=need_labels)
        if all(len(v) >= n_per_class for v in chosen.by_class.values()):
            break
    return chosen


def run_qc(samples_dir: Path, run_dir: Path, reference: Optional[Path]) -> None:
    """Run the QC gate on ``samples_dir`` (verdicts next to the samples) if the QC stage is available.

    Without a QC stage, samples that already carry verdicts are used as they are and samples
    without one are left out by :func:`select_samples`.
    """
    try:
        from medsynth.qc import run_qc as _qc  # type: ignore[attr-defined]
    except ImportError:
        log.warning("QC stage not available: using existing QC verdicts only")
        return
    _call_with_supported(_qc, samples_dir=Path(samples_dir), run_dir=Path(run_dir), reference=reference)
