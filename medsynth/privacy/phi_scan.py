"""PHI scan: look for identifiers of the reference patients in everything an output folder holds.

Identifiers (names, patient and other IDs, birth dates, accession numbers, institutions, original
UIDs) are collected from the DICOM headers of the reference inputs: a medsynth manifest (each case's
``image`` is a NIfTI file or a DICOM series folder) or a folder of DICOM files.  Every output is then
searched: all DICOM values (file meta, sequences, private tags, including UN/OB bytes), NIfTI header
text fields and extensions, JSON sidecars, other text files, and every file and folder name.

A hit never carries the identifier itself: it names the file, the location and the kind of
identifier, with a masked form (first character and length), so the report does not leak.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsynth.errors import PrivacyError

log = logging.getLogger("medsynth.privacy.phi_scan")

# Attributes whose values identify a patient or the people and places around them.
NAME_VRS = {"PN"}
ID_KEYWORDS = {
    "PatientID": "patient ID", "OtherPatientIDs": "patient ID", "IssuerOfPatientID": "institution",
    "AccessionNumber": "accession number", "AdmissionID": "admission ID", "MedicalRecordLocator": "record locator",
    "StudyID": "study ID", "RequestedProcedureID": "procedure ID", "PerformedProcedureStepID": "procedure ID",
    "ScheduledProcedureStepID": "procedure ID", "ServiceEpisodeID": "episode ID",
    "FillerOrderNumberImagingServiceRequest": "order number",
    "PlacerOrderNumberImagingServiceRequest": "order number",
    "ClinicalTrialSubjectID": "trial subject ID", "DeviceSerialNumber": "device serial number",
    "PatientTelephoneNumbers": "telephone", "PatientAddress": "address", "MilitaryRank": "rank",
}
PHRASE_KEYWORDS = {
    "InstitutionName": "institution", "InstitutionAddress": "institution",
    "InstitutionalDepartmentName": "institution", "PatientAddress": "address",
    "PatientTelephoneNumbers": "telephone", "StationName": "station name",
}
DATE_KEYWORDS = {"PatientBirthDate": "birth date"}
# UIDs that name a class or an encoding, not an instance: never identifying.
_CLASS_UID_WORDS = ("Class", "TransferSyntax", "CodingScheme", "MappingResource", "ContextUID",
                    "ImplementationClass", "ContextGroupExtensionCreator", "PrivateInformationCreator")

_UID_RE = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+){3,}(?![0-9.])")
_TOKEN_RE = re.compile(r"(?<![0-9]\.)(?<![A-Za-z0-9])[A-Za-z0-9]+(?![A-Za-z0-9])(?!\.[0-9])")
_COARSE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-_/]*[A-Za-z0-9]")
_DATE_RES = (
    (re.compile(r"(?<![0-9])((?:19|20)[0-9]{2})([01][0-9])([0-3][0-9])(?![0-9])"), "ymd"),
    (re.compile(r"(?<![0-9])((?:19|20)[0-9]{2})[-./]([01]?[0-9])[-./]([0-3]?[0-9])(?![0-9])"), "ymd"),
    (re.compile(r"(?<![0-9])([0-3]?[0-9])[-./]([01]?[0-9])[-./]((?:19|20)[0-9]{2})(?![0-9])"), "dmy"),
    (re.compile(r"(?<![0-9])([01]?[0-9])[-./]([0-3]?[0-9])[-./]((?:19|20)[0-9]{2})(?![0-9])"), "mdy"),
)
MIN_TOKEN = 3  # shorter name parts / IDs ("LI", "42") match everything; they are not searched
MIN_NUMERIC_ID = 5  # all-digit IDs shorter than this ("204", "1234") collide with ordinary numbers
# Placeholders that de-identifiers, test data and forms put into name fields: not identities.
PLACEHOLDER_NAMES = {"ANONYMOUS", "ANONYMIZED", "ANONYMISED", "ANON", "REMOVED", "UNKNOWN", "NONE", "NULL",
                     "TEST", "PATIENT", "PHANTOM", "FIRST", "LAST", "MIDDLE", "NAME", "ENTER", "DUMMY", "SAMPLE",
                     "DOCTOR", "MRS", "MISS", "PROF", "PHD", "SYNTHETIC", "MEDSYNTH"}
# Keys of medsynth's own audit log whose values are fixed vocabulary, not data.
AUDIT_VOCABULARY_KEYS = {"reason", "status", "kind"}


def mask(value: str) -> str:
    """A form of an identifier that can be printed: first character and length only."""
    value = str(value)
    return f"{value[:1]}{'*' * 3}(len {len(value)})" if value else "(empty)"


@dataclass(frozen=True)
class Hit:
    """One identifier found in an output: file (relative), location inside it, kind, masked value."""

    path: str
    location: str
    kind: str
    masked: str

    def __str__(self) -> str:
        return f"{self.path}: {self.location}: {self.kind} {self.masked}"


@dataclass
class Identifiers:
    """The identifiers to look for, grouped by how they are matched.

    ``tokens`` are single words/IDs matched as whole tokens (case-insensitive); ``phrases`` contain
    spaces or punctuation and are matched as case-insensitive substrings on word boundaries;
    ``uids`` are matched as whole dotted numbers; ``dates`` (YYYYMMDD) in any common spelling.
    """

    tokens: dict[str, str] = field(default_factory=dict)
    phrases: dict[str, str] = field(default_factory=dict)
    uids: dict[str, str] = field(default_factory=dict)
    dates: dict[str, str] = field(default_factory=dict)
    sources: int = 0
    vendors: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.tokens) + len(self.phrases) + len(self.uids) + len(self.dates)

    def merge(self, other: Identifiers) -> Identifiers:
        for name in ("tokens", "phrases", "uids", "dates", "vendors"):
            getattr(self, name).update(getattr(other, name))
        self.sources += other.sources
        return self.prune_vendors()

    def prune_vendors(self) -> Identifiers:
        """Drop institution entries that are (part of) a device vendor or model name: not identities.

        Test data and some devices write the vendor into Institution Name.
        """
        for table in (self.tokens, self.phrases):
            for k in [k for k, kind in table.items() if kind == "institution"]:
                if any(k in v for v in self.vendors):
                    del table[k]
        return self

    # -- building ---------------------------------------------------------------------------

    def add_name(self, value: Any, kind: str = "person name") -> None:
        text = str(value or "").strip()
        if not text:
            return
        for part in re.split(r"[\^=,\s]+", text):
            part = part.strip(".-'").upper()
            alnum = re.sub(r"[^A-Z0-9]", "", part)
            if len(alnum) >= MIN_TOKEN and not part.isdigit() and part not in PLACEHOLDER_NAMES:
                self.tokens.setdefault(part, kind)

    def add_id(self, value: Any, kind: str) -> None:
        text = str(value or "").strip()
        if len(text) < MIN_TOKEN or (text.isdigit() and len(text) < MIN_NUMERIC_ID):
            return
        key = text.upper()
        if key in PLACEHOLDER_NAMES:
            return
        if re.fullmatch(r"[A-Z0-9]+", key):
            self.tokens.setdefault(key, kind)
        else:
            self.phrases.setdefault(key, kind)

    def add_phrase(self, value: Any, kind: str) -> None:
        text = " ".join(str(value or "").split()).upper()
        if len(text) < 4 or text in PLACEHOLDER_NAMES or (text.isdigit() and len(text) < MIN_NUMERIC_ID):
            return
        if re.fullmatch(r"[A-Z0-9]+", text):
            self.tokens.setdefault(text, kind)
        else:
            self.phrases.setdefault(text, kind)

    def add_uid(self, value: Any, kind: str = "original UID") -> None:
        text = str(value or "").strip().rstrip("\0")
        if _UID_RE.fullmatch(text) and not _is_registered_uid(text):
            self.uids.setdefault(text, kind)

    def add_date(self, value: Any, kind: str = "birth date") -> None:
        text = str(value or "").strip()
        if re.fullmatch(r"[0-9]{8}", text) and text[:2] in ("18", "19", "20"):
            self.dates.setdefault(text, kind)

    # -- matching ---------------------------------------------------------------------------

    def find(self, text: str) -> list[tuple[str, str]]:
        """All identifiers in ``text`` as (kind, identifier) pairs (identifiers are for masking only)."""
        if not text:
            return []
        found: list[tuple[str, str]] = []
        if self.uids:
            for m in _UID_RE.finditer(text):
                k = self.uids.get(m.group(0))
                if k:
                    found.append((k, m.group(0)))
        up = text.upper()
        if self.tokens:
            seen = set()
            for rx in (_TOKEN_RE, _COARSE_RE):
                for m in rx.finditer(up):
                    t = m.group(0)
                    if t in seen:
                        continue
                    seen.add(t)
                    k = self.tokens.get(t)
                    if k:
                        found.append((k, t))
        if self.phrases:
            norm = " ".join(up.split())
            for p, k in self.phrases.items():
                i = norm.find(p)
                while i >= 0:
                    before = norm[i - 1] if i > 0 else " "
                    after = norm[i + len(p)] if i + len(p) < len(norm) else " "
                    if not (before.isalnum() or after.isalnum()):
                        found.append((k, p))
                        break
                    i = norm.find(p, i + 1)
        if self.dates:
            for rx, order in _DATE_RES:
                for m in rx.finditer(text):
                    a, b, c = m.groups()
                    y, mo, d = {"ymd": (a, b, c), "dmy": (c, b, a), "mdy": (c, a, b)}[order]
                    key = f"{y}{int(mo):02d}{int(d):02d}"
                    k = self.dates.get(key)
                    if k:
                        found.append((k, key))
        return list(dict.fromkeys(found))



# ------------------------------------------------------------------------------------------------
# DICOM helpers shared with deid
# ------------------------------------------------------------------------------------------------


def _is_registered_uid(uid: str) -> bool:
    from pydicom.uid import UID_dictionary

    return uid.startswith("1.2.840.10008.") or uid in UID_dictionary


def is_class_uid_keyword(keyword: str) -> bool:
    """True for UI attributes that name a class, encoding or scheme rather than an instance."""
    return any(w in keyword for w in _CLASS_UID_WORDS)


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's value warnings while reading patient files: they quote the values."""
    import pydicom.config as cfg

    lg = logging.getLogger("pydicom")
    old_disabled, old_mode = lg.disabled, cfg.settings.reading_validation_mode
    lg.disabled = True
    cfg.settings.reading_validation_mode = cfg.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.disabled = old_disabled
        cfg.settings.reading_validation_mode = old_mode


def looks_like_dicom(path: Path) -> bool:
    """Cheap test: the 'DICM' marker at byte 128 (files written with a preamble)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_dicom(path: Path, *, stop_before_pixels: bool = False, defer_size: int | None = None):
    """Read a DICOM file (with or without preamble/extension) or return None if it is not DICOM.

    Files without the 'DICM' marker are accepted only if they parse into a dataset that has a
    SOP Class UID and a SOP Instance UID: force-reading an arbitrary file yields garbage otherwise.
    Read errors propagate (a file with the marker that does not parse is corrupt, not 'not DICOM').
    """
    import pydicom

    if looks_like_dicom(path):
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        # implicit/explicit VR little endian data sets start with an even group, usually 0x0008
        if len(head) < 8 or head[1] != 0x00 or head[0] % 2:
            return None
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
        if "SOPClassUID" in ds and "SOPInstanceUID" in ds:
            return ds
    except Exception:
        return None
    return None


def walk_dataset(ds, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (location, element) for every element, depth first, sequences included."""
    for elem in ds:
        loc = f"{prefix}({elem.tag.group:04X},{elem.tag.element:04X})"
        name = elem.keyword or ("private" if elem.tag.is_private else "")
        yield (f"{loc} {name}".rstrip(), elem)
        if elem.VR == "SQ" and elem.value is not None:
            for i, item in enumerate(elem.value):
                yield from walk_dataset(item, f"{loc}[{i}]>")


def _iter_elements(ds) -> Iterator[Any]:
    """Every element, depth first, without building location strings (the fast path)."""
    for elem in ds:
        yield elem
        if elem.VR == "SQ" and elem.value is not None:
            for item in elem.value:
                yield from _iter_elements(item)


def element_text(elem) -> str | None:
    """The searchable text of an element (strings, names, UIDs, text in UN/OB bytes), else None."""
    if elem.VR == "SQ" or elem.tag == 0x7FE00010 or elem.value is None:
        return None
    v = elem.value
    if isinstance(v, (bytes, bytearray)):
        if len(v) > (16 << 20):
            return None
        return printable_runs(bytes(v))
    if elem.VR in ("US", "SS", "UL", "SL", "FL", "FD", "OF", "OD", "OL", "OV", "UV", "SV", "AT", "IS", "DS"):
        return None  # numbers: an ID would not survive being stored as one
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v)


def printable_runs(data: bytes, min_len: int = 4) -> str:
    """Printable ASCII runs of ``data`` (like ``strings``), newline-joined."""
    return "\n".join(m.group(0).decode("ascii") for m in re.finditer(rb"[\x20-\x7e]{%d,}" % min_len, data))


def identifiers_from_dataset(ds, ids: Identifiers | None = None, *, uids: bool = True,
                             institution: bool = True, device: bool = True) -> Identifiers:
    """Add the identifiers held by one DICOM data set (recursively) to ``ids``.

    ``uids``, ``institution`` and ``device`` switch off categories the user chose to retain.
    """
    ids = ids if ids is not None else Identifiers()
    ids.sources += 1
    datasets = [ds]
    if getattr(ds, "file_meta", None) is not None:
        datasets.append(ds.file_meta)
    for kw in ("Manufacturer", "ManufacturerModelName"):
        vendor = " ".join(str(ds.get(kw, "") or "").split()).upper()
        if vendor:
            ids.vendors.add(vendor)
    for d in datasets:
        for elem in _iter_elements(d):
            if elem.tag.is_private or elem.VR == "SQ" or elem.tag == 0x7FE00010 or elem.value is None:
                continue
            kw = elem.keyword
            values = elem.value if type(elem.value).__name__ == "MultiValue" else [elem.value]
            if elem.VR == "PN":
                for v in values:
                    ids.add_name(v)
            if kw in ID_KEYWORDS and (device or kw != "DeviceSerialNumber") and \
                    (institution or ID_KEYWORDS[kw] != "institution"):
                for v in values:
                    ids.add_id(v, ID_KEYWORDS[kw])
            if kw in PHRASE_KEYWORDS:
                if not institution and PHRASE_KEYWORDS[kw] == "institution":
                    continue
                if not device and kw == "StationName":
                    continue
                for v in values:
                    ids.add_phrase(v, PHRASE_KEYWORDS[kw])
            if kw in DATE_KEYWORDS:
                for v in values:
                    ids.add_date(v, DATE_KEYWORDS[kw])
            if elem.VR == "UI" and uids and not is_class_uid_keyword(kw):
                for v in values:
                    ids.add_uid(v)
    return ids.prune_vendors()


# ------------------------------------------------------------------------------------------------
# reference identifiers
# ------------------------------------------------------------------------------------------------


def iter_files(root: Path) -> list[Path]:
    """All regular files under ``root`` (or ``root`` itself), sorted, symlinks not followed."""
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if p.is_file() and not p.is_symlink():
                out.append(p)
    return out


def _reference_images(path: Path) -> list[Path]:
    """The image paths a manifest lists (medsynth 'cases' or Decathlon 'training')."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PrivacyError(f"{path}: reference manifest is not readable JSON ({type(exc).__name__})",
                           hint="pass a medsynth manifest.json or a folder of DICOM files") from None
    items = raw.get("cases") if isinstance(raw, dict) else None
    if items is None and isinstance(raw, dict):
        items = raw.get("training")
    if not isinstance(items, list):
        raise PrivacyError(f"{path}: reference manifest has no 'cases' list",
                           hint="pass a medsynth manifest.json or a folder of DICOM files")
    out = []
    for c in items:
        img = c.get("image") if isinstance(c, dict) else None
        if isinstance(img, str):
            p = Path(img)
            out.append(p if p.is_absolute() else path.parent / p)
    return out


def collect_identifiers(reference: str | os.PathLike | Identifiers) -> Identifiers:
    """Identifiers from the DICOM headers of a reference: manifest JSON, DICOM folder or file.

    NIfTI cases in a manifest carry no DICOM header and contribute nothing.  Unreadable files are
    skipped.  Raises PrivacyError if the reference does not exist or is not a readable manifest.
    """
    if isinstance(reference, Identifiers):
        return reference
    ref = Path(reference)
    if not ref.exists():
        raise PrivacyError(f"reference not found: {ref}",
                           hint="pass the manifest.json or DICOM folder the outputs were made from")
    roots = _reference_images(ref) if ref.is_file() and ref.suffix.lower() == ".json" else [ref]
    ids = Identifiers()
    with quiet_pydicom():
        for root in roots:
            if not root.exists():
                log.warning("reference image missing, skipped: %s", root)
                continue
            for f in iter_files(root):
                if f.name.endswith((".nii", ".nii.gz", ".json")):
                    continue
                try:
                    ds = read_dicom(f, stop_before_pixels=True)
                except Exception:
                    ds = None
                if ds is not None:
                    identifiers_from_dataset(ds, ids)
    ids.prune_vendors()
    if ids.sources == 0:
        log.warning("reference %s holds no DICOM headers: only generic checks are possible", ref)
    return ids


# ------------------------------------------------------------------------------------------------
# scanning outputs
# ------------------------------------------------------------------------------------------------

_NIFTI_TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name", "data_type")


def _hits(ids: Identifiers, rel: str, location: str, text: str | None) -> list[Hit]:
    if not text:
        return []
    return [Hit(rel, location, kind, mask(value)) for kind, value in ids.find(text)]


def _scan_dicom(ds, rel: str, ids: Identifiers, structural: bool) -> list[Hit]:
    hits: list[Hit] = []
    for d, pre in ((getattr(ds, "file_meta", None), "meta:"), (ds, "")):
        if d is None:
            continue
        for loc, elem in walk_dataset(d):
            hits += _hits(ids, rel, pre + loc, element_text(elem))
            if structural and elem.tag.is_private and elem.tag.element >= 0x0100:
                hits.append(Hit(rel, loc, "private attribute", "(not checked)"))
    if structural:
        if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
            hits.append(Hit(rel, "(0012,0062) PatientIdentityRemoved", "not marked de-identified", "(missing)"))
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            hits.append(Hit(rel, "(0028,0301) BurnedInAnnotation", "burned-in annotation", "YES"))
    return hits


def _scan_nifti(path: Path, rel: str, ids: Identifiers, structural: bool) -> list[Hit]:
    import nibabel as nib

    hits: list[Hit] = []
    hdr = nib.load(str(path)).header
    for f in _NIFTI_TEXT_FIELDS:
        if f in hdr:
            raw = hdr[f].tobytes() if hasattr(hdr[f], "tobytes") else bytes(hdr[f])
            hits += _hits(ids, rel, f"nifti:{f}", raw.split(b"\0")[0].decode("latin-1"))
    for i, ext in enumerate(getattr(hdr, "extensions", []) or []):
        content = ext.get_content()
        data = content if isinstance(content, (bytes, bytearray)) else str(content).encode("utf-8", "replace")
        hits += _hits(ids, rel, f"nifti:extension[{i}]", printable_runs(bytes(data)))
        if structural:
            hits.append(Hit(rel, f"nifti:extension[{i}]", "NIfTI header extension", "(present)"))
    return hits


def _scan_json(obj: Any, rel: str, ids: Identifiers, loc: str = "$", skip_keys: frozenset = frozenset()
               ) -> list[Hit]:
    hits: list[Hit] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            hits += _hits(ids, rel, f"{loc} key", str(k))
            if k not in skip_keys:
                hits += _scan_json(v, rel, ids, f"{loc}.{k}", skip_keys)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            hits += _scan_json(v, rel, ids, f"{loc}[{i}]", skip_keys)
    elif obj is not None:
        hits += _hits(ids, rel, loc, str(obj))
    return hits


def scan_file(path: Path, rel: str, ids: Identifiers, structural: bool = False) -> list[Hit]:
    """Scan one output file (its name, then its content by type) and return the hits."""
    hits: list[Hit] = []
    found_in_name = ids.find(rel)
    for _, value in found_in_name:  # the report names the file without repeating what it found
        rel = re.sub(re.escape(value), mask(value), rel, flags=re.IGNORECASE)
    hits += [Hit(rel, "file name", kind, mask(value)) for kind, value in found_in_name]
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            return hits + _scan_nifti(path, rel, ids, structural)
        if name.endswith(".json"):
            return hits + _scan_json(json.loads(path.read_text(encoding="utf-8")), rel, ids)
        if name.endswith(".jsonl"):
            lines = path.read_text(encoding="utf-8").splitlines()
            first = json.loads(lines[0]) if lines and lines[0].strip() else None
            audit = isinstance(first, dict) and isinstance(first.get("run"), dict) and "medsynth" in first["run"]
            skip = frozenset(AUDIT_VOCABULARY_KEYS) if audit else frozenset()
            for i, line in enumerate(lines):
                if line.strip():
                    hits += _scan_json(json.loads(line), rel, ids, f"line {i + 1}", skip)
            return hits
        ds = read_dicom(path, defer_size=1 << 20)
        if ds is not None:
            return hits + _scan_dicom(ds, rel, ids, structural)
    except Exception as exc:  # unreadable as its type: fall back to raw text below
        log.debug("%s: parsed scan failed (%s); scanning raw bytes", rel, type(exc).__name__)
    size = path.stat().st_size
    if size <= (64 << 20):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = printable_runs(data)
        hits += _hits(ids, rel, "content", text)
    else:
        hits.append(Hit(rel, "content", "not scanned (file over 64 MiB)", "(unknown)"))
    return hits


def scan_phi(directory: str | os.PathLike, reference: str | os.PathLike | Identifiers | None = None
             ) -> list[Hit]:
    """Scan every file under ``directory`` for identifiers of the ``reference`` inputs.

    ``reference`` is a medsynth manifest, a DICOM folder/file, or :class:`Identifiers` collected
    earlier with :func:`collect_identifiers`.  Without a reference only structural checks run (DICOM
    not marked de-identified, private attributes, burned-in flags, NIfTI extensions).  Returns the
    hits (empty = clean); raises PrivacyError if ``directory`` does not exist.
    """
    root = Path(directory)
    if not root.exists():
        raise PrivacyError(f"folder to scan not found: {root}", hint="pass the output folder of anonymise/export")
    structural = reference is None
    ids = Identifiers() if reference is None else collect_identifiers(reference)
    hits: list[Hit] = []
    with quiet_pydicom():
        for f in iter_files(root):
            rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
            hits += scan_file(f, rel, ids, structural)
    log.info("phi-scan: %d files, %d identifiers from %d reference headers, %d hits",
             len(iter_files(root)), len(ids), ids.sources, len(hits))
    return hits
