"""Quality control between ``generate`` and ``export``: per-volume checks (:mod:`.checks`), offline
feature spaces (:mod:`.features`), dataset metrics (:mod:`.metrics`), the HTML report
(:mod:`.report`) and the gate that ties them together (:func:`medsynth.qc.gate.run_qc`).

The package is callable: ``medsynth.qc(samples, reference, out)`` is :func:`qc`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from medsynth.callable_module import make_callable


def qc(samples_dir: str | Path, reference: str | Path, out_dir: str | Path, *, run_dir: Optional[str | Path] = None,
       config: Optional[str | Path] = None, holdout: Optional[str | Path] = None, quarantine: bool = True) -> Any:
    """Judge a samples folder against the real ``reference`` manifest (what ``medsynth qc`` does).

    The grid, intensity window and thresholds come from ``run_dir``'s config or from ``config``
    (neither: inferred from the samples).  Writes ``<id>.qc.json`` beside every sample, moves failing
    samples into ``quarantine/`` (unless ``quarantine`` is false), and writes ``out_dir/qc.json`` and
    ``out_dir/report.html``; returns the :class:`~medsynth.qc.gate.QCOutcome`.  ``holdout`` (real
    cases the model never saw) calibrates the memorisation screen.
    """
    from medsynth.qc.gate import load_qc_config, run_qc

    cfg, source = load_qc_config(config, run_dir)
    return run_qc(samples_dir, reference, out_dir, cfg, holdout=holdout, quarantine=quarantine, grid_source=source)


make_callable(__name__, qc)
