"""The DICOM PS3.15 Annex E confidentiality profile as data: Table E.1-1 and its options.

The table lives in ``medsynth/resources/deid_profile_ps3.15_e1-1.csv`` (every row of the standard's
table, with the edition in its header); this module loads it once and answers one question: which
action applies to an attribute, given the options the user chose.  Applying the action is
:mod:`medsynth.privacy.deid`'s job.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
from collections.abc import Iterable
from dataclasses import dataclass, field

from medsynth.errors import ConfigError

PROFILE_FILE = "deid_profile_ps3.15_e1-1.csv"
SAFE_PRIVATE_FILE = "deid_safe_private.csv"


@dataclass(frozen=True)
class ProfileOption:
    """One supported option of the profile: CLI name, table column, CID 7050 code and meaning."""

    name: str
    column: str
    code: str
    meaning: str
    help: str


# The options medsynth implements.  Clean Structured Content, Clean Graphics, Clean Pixel Data and
# Clean Recognizable Visual Features are not offered: medsynth cannot clean SR trees, overlays or
# pixels, so those objects get the (stricter) Basic Profile action or are quarantined.
OPTIONS: dict[str, ProfileOption] = {o.name: o for o in (
    ProfileOption("retain-long-modified-dates", "rtn_long_modified_dates", "113107",
                  "Retain Longitudinal Temporal Information Modified Dates Option",
                  "keep dates, shifted by one secret offset per patient (intervals preserved); times kept"),
    ProfileOption("retain-long-full-dates", "rtn_long_full_dates", "113106",
                  "Retain Longitudinal Temporal Information Full Dates Option",
                  "keep dates and times unchanged"),
    ProfileOption("retain-patient-chars", "rtn_patient_characteristics", "113108",
                  "Retain Patient Characteristics Option",
                  "keep sex, age, size, weight, ethnic group, smoking and pregnancy status"),
    ProfileOption("retain-device-id", "rtn_device_identity", "113109",
                  "Retain Device Identity Option",
                  "keep station name, device serial numbers, detector/gantry IDs; AE titles pseudonymised"),
    ProfileOption("retain-institution-id", "rtn_institution_identity", "113112",
                  "Retain Institution Identity Option",
                  "keep institution name, address and department"),
    ProfileOption("retain-uids", "rtn_uids", "113110",
                  "Retain UIDs Option",
                  "keep original UIDs (no remapping); output names still come from keyed UIDs"),
    ProfileOption("retain-safe-private", "rtn_safe_private", "113111",
                  "Retain Safe Private Option",
                  "keep the numeric private tags in the safe-private allow-list (b-values, scale factors)"),
    ProfileOption("clean-descriptors", "clean_descriptors", "113105",
                  "Clean Descriptors Option",
                  "keep descriptions and comments (series/study description, protocol name, ...) after "
                  "removing names, IDs, dates and long numbers found in them"),
)}

BASIC_CODE = ("113100", "Basic Application Confidentiality Profile")

# Option pairs that contradict each other in the standard.
_EXCLUSIVE = [("retain-long-modified-dates", "retain-long-full-dates")]

OPTION_COLUMNS = ("rtn_safe_private", "rtn_uids", "rtn_device_identity", "rtn_institution_identity",
                  "rtn_patient_characteristics", "rtn_long_full_dates", "rtn_long_modified_dates",
                  "clean_descriptors", "clean_structured_content", "clean_graphics")
BASIC_CODES = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}


@dataclass(frozen=True)
class ProfileRow:
    """One row of Table E.1-1: tag pattern, name, basic action and per-option actions."""

    tag: str
    name: str
    retired: bool
    basic: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    """Table E.1-1 loaded: exact tags, wildcard rows (``50xxxxxx``) and the private-attributes row."""

    edition: str
    rows: tuple[ProfileRow, ...]
    exact: dict[int, ProfileRow]
    wildcards: tuple[tuple[int, int, ProfileRow], ...]  # (mask, value, row)

    def lookup(self, tag: int) -> ProfileRow | None:
        """The row for a (public) tag, or None when Table E.1-1 does not list it."""
        row = self.exact.get(int(tag))
        if row is not None:
            return row
        for mask, value, r in self.wildcards:
            if int(tag) & mask == value:
                return r
        return None


def _read_resource(name: str) -> tuple[list[str], list[dict[str, str]]]:
    text = importlib.resources.files("medsynth").joinpath("resources", name).read_text(encoding="utf-8")
    lines = text.splitlines()
    comments = [ln[1:].strip() for ln in lines if ln.startswith("#")]
    rows = list(csv.DictReader(ln for ln in lines if ln and not ln.startswith("#")))
    return comments, rows


@functools.lru_cache(maxsize=1)
def load_profile() -> Profile:
    """Load Table E.1-1 from the package data (cached).  Raises ConfigError if the file is damaged."""
    comments, raw = _read_resource(PROFILE_FILE)
    edition = next((c.split(",")[0].strip() for c in comments if c.startswith("DICOM PS3.15")), "")
    if not edition:
        raise ConfigError(f"{PROFILE_FILE}: header must name the DICOM edition (e.g. 'DICOM PS3.15 2026d')")
    rows, exact, wild = [], {}, []
    for i, r in enumerate(raw, start=1):
        basic = r["basic"].strip()
        if basic not in BASIC_CODES:
            raise ConfigError(f"{PROFILE_FILE} row {i}: unknown action code {basic!r}")
        opts = {c: r[c].strip() for c in OPTION_COLUMNS if r.get(c, "").strip()}
        row = ProfileRow(tag=r["tag"].strip(), name=r["name"].strip(), retired=r["retired"] == "Y",
                         basic=basic, options=opts)
        rows.append(row)
        t = row.tag.lower()
        if t == "private":
            continue  # handled by the private-tag rule, not by tag lookup
        if "x" in t:
            mask = int("".join("0" if ch == "x" else "f" for ch in t), 16)
            value = int(t.replace("x", "0"), 16)
            wild.append((mask, value, row))
        else:
            exact[int(t, 16)] = row
    return Profile(edition=edition, rows=tuple(rows), exact=exact, wildcards=tuple(wild))


@dataclass(frozen=True)
class SafePrivate:
    """One allow-listed private element (creator, group, element offset, required VR)."""

    creator: str
    group: int
    offset: int
    vr: str
    meaning: str


@functools.lru_cache(maxsize=1)
def load_safe_private() -> dict[tuple[str, int, int], SafePrivate]:
    """The safe-private allow-list, keyed by (creator, group, offset)."""
    _, raw = _read_resource(SAFE_PRIVATE_FILE)
    out = {}
    for r in raw:
        sp = SafePrivate(r["creator"].strip(), int(r["group"], 16), int(r["offset"], 16), r["vr"].strip(),
                         r["meaning"].strip())
        out[(sp.creator, sp.group, sp.offset)] = sp
    return out


def is_curve_or_overlay(tag: int) -> bool:
    """True for an element of a curve (50xx) or overlay (60xx) repeating group.

    The profile's overlay rule: Table E.1-1 removes Overlay Data (60xx,3000) and Overlay Comments
    (60xx,4000) (X; only Clean Graphics would keep them, and medsynth does not offer it) and
    curve data with them.  An overlay group without its data is inconsistent, and its other text,
    Overlay Description (60xx,0022) and Overlay Label (60xx,1500), is free text the table does not
    list, so medsynth removes the whole group, in the data set and inside every sequence item.
    """
    g = int(tag) >> 16
    return g % 2 == 0 and (0x5000 <= g <= 0x501E or 0x6000 <= g <= 0x601E)


def check_options(options: Iterable[str]) -> tuple[str, ...]:
    """Validate option names (did-you-mean on typos) and return them in table order."""
    import difflib

    chosen = []
    for o in options:
        o = o.strip().lower().replace("_", "-")
        if not o:
            continue
        if o not in OPTIONS:
            close = difflib.get_close_matches(o, OPTIONS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown de-identification option '{o}'",
                              hint=f"{hint}choose from: {', '.join(OPTIONS)}")
        chosen.append(o)
    for a, b in _EXCLUSIVE:
        if a in chosen and b in chosen:
            raise ConfigError(f"options '{a}' and '{b}' exclude each other", hint="choose one of them")
    return tuple(o for o in OPTIONS if o in chosen)


def resolve_action(row: ProfileRow, options: tuple[str, ...]) -> str:
    """The action for ``row`` under the chosen options.

    An option replaces the basic action where its column has a value.  When several chosen options
    apply to one attribute (a calibration date under both Retain Device Identity and Retain
    Longitudinal Modified Dates), clean (C) wins over keep (K): the more protective choice.
    """
    picked = [row.options[OPTIONS[o].column] for o in options if OPTIONS[o].column in row.options]
    if not picked:
        return row.basic
    return "C" if "C" in picked else "K"
