"""Metrics and their uncertainty for the utility evaluation: AUC, accuracy, Dice, bootstrap CIs.

Every arm of the evaluation is trained ``R`` times (repeats) and each time predicts every test
case.  An arm's figure for a metric is the mean over repeats; its spread is the standard
deviation over repeats (training variability); its 95% confidence interval comes from a
bootstrap over test cases (test-set sampling variability): each bootstrap replicate draws the
test cases with replacement (within each class for classification, so every replicate keeps the
class counts and AUC is defined), recomputes the metric for every repeat on those cases and
averages over repeats.  The same replicates serve every arm, so the difference between an arm and
the reference arm is a paired bootstrap: its CI is taken from the replicate-wise differences of the
repeat-averaged metric.

AUC is the Mann-Whitney statistic with average ranks for ties (equal to the trapezoidal ROC area,
and to ``monai.metrics.compute_roc_auc``); with more than two classes it is the macro average of
one-vs-rest AUCs.  Accuracy uses the arg-max class, which for two classes is the fixed threshold
0.5 on the positive-class probability: nothing is tuned on the test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from scipy.stats import rankdata

from medsynth.jobs import seed_from

Metric = Callable[[np.ndarray, np.ndarray], float]


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from a base seed and labels (arm, repeat, ...): unrelated streams per label."""
    return seed_from("medsynth-utility", int(seed), *parts)


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive``; NaN if one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc(probs: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC of class probabilities ``probs`` (n, K) for integer labels ``y`` (n,).

    Two classes: the AUC of the class-1 probability.  More classes: the mean of the one-vs-rest
    AUCs over the classes present in ``y`` (macro average).
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    if probs.shape[1] == 2:
        return binary_auc(probs[:, 1], y == 1)
    vals = [binary_auc(probs[:, k], y == k) for k in range(probs.shape[1]) if np.any(y == k)]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    """Fraction of cases whose arg-max class is the true class (threshold 0.5 for two classes)."""
    probs = np.asarray(probs)
    if len(y) == 0:
        return float("nan")
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(y)))


def mean_score(scores: np.ndarray, _y: np.ndarray) -> float:
    """Mean of per-case scores ignoring NaN (cases the score is undefined for); NaN if none."""
    scores = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(scores)
    return float(scores[ok].mean()) if ok.any() else float("nan")


def dice_per_case(pred: np.ndarray, target: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Per-case Dice of integer label maps ``pred``/``target`` (n, ...), averaged over ``labels``.

    A label absent from both the prediction and the truth of a case is skipped for that case (Dice
    is undefined); one absent from the truth but predicted scores 0 (a false alarm).  A case where
    every label is skipped gets NaN and is left out of the mean.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    out = np.full(pred.shape[0], np.nan)
    for i in range(pred.shape[0]):
        vals = []
        for lab in labels:
            p = pred[i] == lab
            t = target[i] == lab
            denom = int(p.sum()) + int(t.sum())
            if denom == 0:
                continue
            vals.append(2.0 * float(np.logical_and(p, t).sum()) / denom)
        if vals:
            out[i] = float(np.mean(vals))
    return out


def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator,
                      strata: Optional[np.ndarray] = None) -> np.ndarray:
    """``n_boot`` resamples (rows) of ``range(n)`` with replacement, within each stratum if given."""
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    strata = np.asarray(strata)
    cols = []
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        cols.append(members[rng.integers(0, members.size, size=(n_boot, members.size))])
    return np.concatenate(cols, axis=1)


@dataclass
class Estimate:
    """One arm's figure for one metric: per-repeat values, mean, std over repeats, bootstrap CI."""

    values: list[float]
    mean: float
    std: float
    ci: tuple[float, float]

    def to_dict(self) -> dict:
        return {"mean": _f(self.mean), "std": _f(self.std), "ci95": [_f(self.ci[0]), _f(self.ci[1])],
                "per_repeat": [_f(v) for v in self.values]}


@dataclass
class Difference:
    """Paired difference of an arm minus the reference arm for one metric."""

    reference: str
    values: list[float]
    mean: float
    std: float
    ci: tuple[float, float]
    frac_not_better: float  # fraction of bootstrap replicates with difference <= 0

    def to_dict(self) -> dict:
        return {"reference": self.reference, "mean": _f(self.mean), "std": _f(self.std),
                "ci95": [_f(self.ci[0]), _f(self.ci[1])], "per_repeat": [_f(v) for v in self.values],
                "bootstrap_fraction_le_0": _f(self.frac_not_better)}


def _f(x: float) -> Optional[float]:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def _std(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.std(ddof=1)) if v.size > 1 else 0.0


def _nanmean(x: np.ndarray, axis: int = 0) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    cnt = ok.sum(axis=axis)
    tot = np.where(ok, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def percentile_ci(dist: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution (NaN replicates ignored)."""
    d = np.asarray(dist, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    return float(np.quantile(d, a)), float(np.quantile(d, 1.0 - a))


def replicate_matrix(metric: Metric, preds: Sequence[np.ndarray], y: np.ndarray,
                     idx: np.ndarray) -> np.ndarray:
    """Metric of each repeat's predictions on each bootstrap replicate: shape (n_boot, repeats)."""
    out = np.empty((idx.shape[0], len(preds)))
    for r, p in enumerate(preds):
        p = np.asarray(p)
        for b in range(idx.shape[0]):
            out[b, r] = metric(p[idx[b]], y[idx[b]])
    return out


def estimate(metric: Metric, preds: Sequence[np.ndarray], y: np.ndarray, boot: np.ndarray,
             level: float = 0.95) -> tuple[Estimate, np.ndarray]:
    """The arm's :class:`Estimate` and its bootstrap distribution (repeat-averaged, per replicate).

    ``preds`` holds one prediction array per repeat (rows = test cases), ``boot`` the matrix of
    :func:`bootstrap_indices`.
    """
    values = [metric(np.asarray(p), y) for p in preds]
    dist = _nanmean(replicate_matrix(metric, preds, y, boot), axis=1)
    v = np.asarray(values, dtype=np.float64)
    mean = float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")
    return Estimate(values, mean, _std(values), percentile_ci(dist, level)), dist


def difference(arm: Estimate, arm_dist: np.ndarray, ref: Estimate, ref_dist: np.ndarray,
               ref_name: str, level: float = 0.95) -> Difference:
    """Paired difference ``arm - ref``: per-repeat differences (same repeat seeds), bootstrap CI."""
    per = [a - b for a, b in zip(arm.values, ref.values, strict=True)]
    v = np.asarray(per, dtype=np.float64)
    mean = float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")
    d = arm_dist - ref_dist
    ok = d[np.isfinite(d)]
    frac = float(np.mean(ok <= 0)) if ok.size else float("nan")
    return Difference(ref_name, per, mean, _std(per), percentile_ci(d, level), frac)
