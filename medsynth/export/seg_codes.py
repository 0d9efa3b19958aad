"""SNOMED CT codes for DICOM SEG segments, looked up by label name.

A PACS or viewer shows a segment by its Segmented Property Category and Type; a generic "Tissue"
tells the reader nothing.  The table lives in ``medsynth/resources/seg_codes.csv`` (one row per
label name, with synonyms; the category from DICOM CID 7150, the type from CID 7151 anatomy,
7159 lesions or 7166 tissues); adding a label touches only that file.  A label name the table
does not know keeps the generic Tissue/Tissue coding, with a warning naming the label.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import logging
import re
from dataclasses import dataclass

log = logging.getLogger("medsynth.export.seg_codes")

CODES_FILE = "seg_codes.csv"
SCHEME = "SCT"
TISSUE = ("85756007", "Tissue")


@dataclass(frozen=True)
class SegmentCode:
    """The category and type of one segment (code value, meaning; scheme SCT)."""

    name: str
    category: tuple[str, str]
    type: tuple[str, str]
    type_cid: str = ""
    known: bool = True

    def coded(self) -> tuple[object, object]:
        """(category, type) as highdicom ``CodedConcept``s."""
        from highdicom.sr import CodedConcept

        return (CodedConcept(self.category[0], SCHEME, self.category[1]),
                CodedConcept(self.type[0], SCHEME, self.type[1]))


def normalise(name: str) -> str:
    """``"Left_Lung "`` -> ``"left lung"``: case folded, '_' and '-' as spaces, spaces collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", str(name).casefold())).strip()


@functools.lru_cache(maxsize=1)
def table() -> dict[str, SegmentCode]:
    """Every name and synonym of the table, normalised, to its :class:`SegmentCode`."""
    text = importlib.resources.files("medsynth").joinpath("resources", CODES_FILE).read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    out: dict[str, SegmentCode] = {}
    for row in rows:
        code = SegmentCode(row["name"], (row["category_code"], row["category_meaning"]),
                           (row["type_code"], row["type_meaning"]), row["type_cid"])
        for n in [row["name"], *filter(None, row["synonyms"].split("|"))]:
            key = normalise(n)
            if key in out:
                raise ValueError(f"{CODES_FILE}: name {n!r} appears twice")
            out[key] = code
    return out


def segment_code(name: str) -> SegmentCode:
    """The coding of a label name; Tissue/Tissue (``known`` False, a warning) when the table lacks it."""
    hit = table().get(normalise(name))
    if hit is not None:
        return hit
    log.warning("label %r is not in %s: its DICOM SEG segment is coded as generic Tissue; add a row for it",
                str(name)[:64], CODES_FILE)
    return SegmentCode(str(name), TISSUE, TISSUE, "7166", known=False)
