"""Process-level helpers (``medsynth.runtime``): the launcher's rank and the OpenMP wait policy."""

from __future__ import annotations

import os
import sys

from medsynth import progress, runtime


def test_rank_zero_is_the_only_process_or_torchruns_first(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert runtime.launcher_rank() == 0 and runtime.is_rank_zero()
    monkeypatch.setenv("RANK", "3")
    assert runtime.launcher_rank() == 3 and not runtime.is_rank_zero()
    monkeypatch.setattr(progress, "_ENABLED", True)
    assert not progress.progress_enabled()  # other ranks draw no progress bars, whatever was asked


def test_openmp_waits_passive_only_on_a_busy_cpu_before_torch(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    runtime.passive_openmp_waits()
    assert "OMP_WAIT_POLICY" not in os.environ  # a quiet CPU keeps libgomp's default
    monkeypatch.setattr(os, "getloadavg", lambda: (1e6, 1e6, 1e6))
    monkeypatch.setitem(sys.modules, "torch", object())
    runtime.passive_openmp_waits()
    assert "OMP_WAIT_POLICY" not in os.environ  # torch already loaded: too late to matter
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    runtime.passive_openmp_waits()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # an explicit policy wins
    monkeypatch.delenv("OMP_WAIT_POLICY")
    runtime.passive_openmp_waits()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
