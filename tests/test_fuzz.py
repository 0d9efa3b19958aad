"""Hostile input through every verb that reads files: a seeded mutation corpus, in a few seconds.

Mutants (bits flipped, bytes cut or repeated, files truncated, element lengths, delimiters and VRs
broken) of pydicom's bundled test files and of medsynth's own export and samples go through
``manifest build``, ``manifest verify``, ``anonymise``, ``phi-scan``, ``qc`` and ``export``
(:mod:`tests.fuzz.campaign`).  Every exit code must be a documented one (never 70, never a
traceback) and every gate must fail closed.  Longer runs and the coverage-guided harness:
``docs/fuzzing.md``.
"""

from __future__ import annotations

import random

import pytest

from tests.fuzz.campaign import DOCUMENTED_EXIT_CODES, run_campaign
from tests.fuzz.corpus import (
    OPS,
    element_offsets,
    mutate,
    pydicom_seed_files,
    write_corpus,
)


def test_mutations_are_seeded_and_hit_structure(tmp_path):
    seeds = pydicom_seed_files()
    assert len(seeds) >= 12
    a = write_corpus(seeds, tmp_path / "a", 20, seed=3)
    b = write_corpus(seeds, tmp_path / "b", 20, seed=3)
    assert [p.read_bytes() for p, _, _ in a] == [p.read_bytes() for p, _, _ in b]
    data = seeds[0].read_bytes()
    assert len(element_offsets(data)) > 50  # the walk finds the elements the structural mutations need
    for op in OPS:
        out, used = mutate(data, random.Random(op), op)
        assert used == op and out != data, op


def test_campaign_no_crash_and_gates_fail_closed(tmp_path):
    res = run_campaign(tmp_path, n=48, seed=0)
    assert res.failures == [], "\n".join(res.failures)
    verbs = [" ".join(r.argv[1:3]) for r in res.runs]
    for verb in ("manifest build", "manifest verify", "phi-scan", "qc", "export"):
        assert any(v.startswith(verb) for v in verbs), verb
    assert any(v.startswith("anonymise") for v in verbs)
    assert {r.code for r in res.runs} <= DOCUMENTED_EXIT_CODES
    # the corpus really is hostile: the PHI scan found files it could not search, export refused
    scan = next(r for r in res.runs if r.argv[1] == "phi-scan")
    assert scan.code == 6 and "not scanned" in scan.out
    assert any(r.argv[1] == "export" and r.code == 6 for r in res.runs)
    assert res.n_files >= 60


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_campaign_more_seeds(tmp_path, seed):
    res = run_campaign(tmp_path, n=300, seed=seed)
    assert res.failures == [], "\n".join(res.failures)
