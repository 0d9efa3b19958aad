"""Quality control between ``generate`` and ``export``: per-volume checks (:mod:`.checks`), offline
feature spaces (:mod:`.features`), dataset metrics (:mod:`.metrics`), the HTML report
(:mod:`.report`) and the gate that ties them together (:func:`medsynth.qc.gate.run_qc`)."""
