"""Evaluations of a synthetic dataset against real data (``medsynth evaluate ...``).

``utility``: train on synthetic, test on real (:func:`medsynth.evaluate.utility.evaluate_utility`);
``split``: a deterministic, class-stratified train/test split by case
(:func:`medsynth.evaluate.split.split_manifest`).
"""
