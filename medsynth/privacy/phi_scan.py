"""PHI scan: look for identifiers of the reference patients in everything an output folder holds.

Identifiers (names, patient and other IDs, birth dates, accession numbers, institutions, original
UIDs) are collected from the DICOM headers of the reference inputs: a medsynth manifest (each case's
``image`` is a NIfTI file or a DICOM series folder) or a folder of DICOM files.  Every output is then
searched: all DICOM values (file meta, sequences, private tags, including UN/OB bytes), NIfTI header
text fields and extensions, JSON sidecars, other text files, and every file and folder name.

A hit never carries the identifier itself: it names the file, the location and the kind of
identifier, with a masked form (first character and length), so the report does not leak.

The scan fails closed.  A file that cannot be searched completely — a DICOM, NIfTI or JSON file
that does not parse, an element whose value cannot be decoded, a compressed archive or PDF, a
symbolic link, a file over 64 MiB — is reported as a ``not scanned`` hit with the reason, and so
is a reference file whose identifiers could not be read (they could not be searched for).  The
scan goes on through every other file, and any such hit makes the verdict "not clean".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsynth.dicom_series import DICOM_BARE, DICOM_MARKER, quiet_pydicom, sniff_dicom
from medsynth.formats import VOLUME_SUFFIXES, is_nifti
from medsynth.errors import PrivacyError
from medsynth.volume import sniff_nifti

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
#: The kind of a hit for something that could not be searched (the verdict fails closed on it).
NOT_SCANNED = "not scanned"
MAX_RAW_BYTES = 64 << 20  # larger files of no known type are not searched byte by byte
# Containers whose bytes do not show their text: searching them raw would pass them unseen.
_OPAQUE_MAGIC = ((b"\x1f\x8b", "gzip archive"), (b"PK\x03\x04", "zip archive"), (b"BZh", "bzip2 archive"),
                 (b"\xfd7zXZ\x00", "xz archive"), (b"7z\xbc\xaf\x27\x1c", "7z archive"),
                 (b"\x28\xb5\x2f\xfd", "zstd archive"), (b"Rar!", "rar archive"), (b"%PDF", "PDF document"))
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_FIX_OUTPUT = "remove the file or replace it with a readable copy, then scan again"
_FIX_REFERENCE = ("repair the file (e.g. re-save it with dcmconv or gdcmconv) or remove it from the reference; "
                  "its identifiers cannot be searched for otherwise")


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

    @property
    def not_scanned(self) -> bool:
        """True for a place that could not be searched (not an identifier found)."""
        return self.kind == NOT_SCANNED


class _Unrecognised(ValueError):
    """A file whose name claims a type its content does not have (the message is the reason)."""


def not_scanned_hit(path: str, location: str, reason: str, fix: str = _FIX_OUTPUT) -> Hit:
    """The hit for a file or element that could not be searched: reason and fix, no value."""
    return Hit(path, location, NOT_SCANNED, f"({reason}; {fix})")


def read_error_reason(exc: BaseException, with_tag: bool = True) -> str:
    """Why a file could not be parsed, in words that never quote a value (only a tag, if named
    and ``with_tag``).

    pydicom's messages can quote element values (which may be PHI), so they are not passed on.
    """
    from pydicom.errors import BytesLengthException, InvalidDicomError

    text = str(exc)
    if isinstance(exc, NotImplementedError) and "Value Representation" in text:
        why = "unknown value representation"
    elif isinstance(exc, BytesLengthException):
        why = "value length does not fit its value representation"
    elif isinstance(exc, (EOFError,)) or "truncat" in text.lower():
        why = "file ends inside an element (truncated)"
    elif isinstance(exc, InvalidDicomError):
        why = "not a valid DICOM file"
    elif isinstance(exc, struct.error):
        why = "malformed element header"
    elif isinstance(exc, zlib.error):
        why = "deflated data cannot be inflated"
    elif isinstance(exc, (UnicodeError, LookupError)):
        why = "text in an unknown or broken character set"
    elif isinstance(exc, MemoryError):
        why = "an element length larger than memory"
    elif isinstance(exc, OSError) and "No tag to read" in text:
        why = "file ends inside an element or sequence (truncated or a wrong length)"
    elif isinstance(exc, OSError):
        why = f"cannot be read ({exc.strerror or type(exc).__name__})"
    elif isinstance(exc, (json.JSONDecodeError,)):
        why = f"not valid JSON (line {exc.lineno})"
    elif isinstance(exc, _Unrecognised):
        why = str(exc)
    else:
        why = f"parse error ({type(exc).__name__})"
    tag = re.search(r"\(([0-9A-Fa-f]{4}), ?([0-9A-Fa-f]{4})\)", text)
    return f"{why} in tag ({tag.group(1).upper()},{tag.group(2).upper()})" if tag and with_tag else why


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
    #: reference files (display path, reason) whose identifiers could not all be read
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens) + len(self.phrases) + len(self.uids) + len(self.dates)

    def merge(self, other: Identifiers) -> Identifiers:
        for name in ("tokens", "phrases", "uids", "dates", "vendors"):
            getattr(self, name).update(getattr(other, name))
        self.sources += other.sources
        self.unreadable += other.unreadable
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


def read_dicom(path: Path, *, stop_before_pixels: bool = False, defer_size: int | None = None):
    """Read a DICOM file (with or without preamble/extension) or return None if it is not DICOM.

    Files without the 'DICM' marker are accepted only if they parse into a dataset that has a
    SOP Class UID and a SOP Instance UID: force-reading an arbitrary file yields garbage otherwise.
    Read errors propagate for files that claim to be DICOM (the marker, or a preamble-less start
    with a group 0002/0008 element, :func:`medsynth.dicom_series.sniff_dicom`): such a file that
    does not parse is corrupt, not 'not DICOM'.
    """
    import pydicom

    kind = sniff_dicom(path)
    if kind == DICOM_MARKER:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
    if kind is None:
        return None
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
        if "SOPClassUID" in ds and "SOPInstanceUID" in ds:
            return ds
    except Exception:
        if kind == DICOM_BARE:  # it claims to be DICOM: a parse failure means a corrupt file
            raise
        return None
    return None


def _loc(prefix: str, tag) -> str:
    return f"{prefix}({tag.group:04X},{tag.element:04X})"


def walk_dataset(ds, prefix: str = "", unread: list[tuple[str, str, bytes]] | None = None,
                 tolerate=None, skip=None) -> Iterator[tuple[str, Any]]:
    """Yield (location, element) for every element, depth first, sequences included.

    With ``unread`` (a list), an element whose value cannot be decoded (unknown VR, a length that
    does not fit, a broken sequence) is not fatal: ``(location, reason, raw value bytes)`` is
    appended there and the walk goes on.  Without it the error propagates.  ``tolerate(tag, vr)``
    True (``vr`` as written in the file) drops such an element without recording it; ``skip(tag)``
    True leaves an element out before its value is read at all.
    """
    try:
        tags = sorted(ds.keys())
    except Exception as exc:  # a data set that cannot even list its tags (re-raised without 'unread')
        if unread is None:
            raise
        unread.append((prefix.rstrip(">") or "(data set)", read_error_reason(exc), b""))
        return
    for tag in tags:
        loc = _loc(prefix, tag)
        if skip is not None and skip(tag):
            continue
        try:
            elem = ds[tag]
            value = elem.value
            if elem.VR == "SQ" and value is not None:
                items = list(value)
        except Exception as exc:  # pydicom raises many types for damaged values
            if unread is None:
                raise
            if tolerate is not None and tolerate(tag, _raw_vr(ds, tag)):
                log.debug("%s: undecodable element ignored (%s)", loc, read_error_reason(exc, with_tag=False))
                continue
            unread.append((loc, read_error_reason(exc, with_tag=False), _raw_bytes(ds, tag)))
            continue
        name = elem.keyword or ("private" if tag.is_private else "")
        yield (f"{loc} {name}".rstrip(), elem)
        if elem.VR == "SQ" and value is not None:
            for i, item in enumerate(items):
                yield from walk_dataset(item, f"{loc}[{i}]>", unread, tolerate, skip)


def _raw_vr(ds, tag) -> str:
    try:
        return str(getattr(ds.get_item(tag, keep_deferred=True), "VR", "") or "")
    except Exception:  # noqa: BLE001
        return ""


def _raw_bytes(ds, tag) -> bytes:
    """The undecoded value bytes of an element that failed to convert (empty if unavailable)."""
    try:
        raw = ds.get_item(tag, keep_deferred=True)
        value = getattr(raw, "value", None)
        return bytes(value) if isinstance(value, (bytes, bytearray)) else b""
    except Exception:  # noqa: BLE001
        return b""


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


def _bulk_data(tag) -> bool:
    """Pixel and waveform data: never a source of identifiers, so not even read (they are deferred)."""
    return tag.group in (0x7FE0, 0x5400)


def _holds_no_identifiers(tag, vr: str) -> bool:
    """True for attributes :func:`identifiers_from_dataset` never reads identifiers from: private
    ones, pixel data, and public ones that are neither names, UIDs, sequences nor listed keywords
    (judged by the dictionary and by the VR written in the file; an unknown public tag holds some)."""
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    if tag.is_private or tag == 0x7FE00010:
        return True
    if vr in ("PN", "UI", "SQ"):
        return False
    if tag.element == 0x0000:  # group length: a number
        return True
    try:
        dvr, kw = dictionary_VR(tag), keyword_for_tag(tag)
    except KeyError:
        return False
    listed = kw in ID_KEYWORDS or kw in PHRASE_KEYWORDS or kw in DATE_KEYWORDS
    return not ({"PN", "UI", "SQ"} & set(dvr.split(" or ")) or listed)


def identifiers_from_dataset(ds, ids: Identifiers | None = None, *, uids: bool = True,
                             institution: bool = True, device: bool = True,
                             unread: list[tuple[str, str, bytes]] | None = None) -> Identifiers:
    """Add the identifiers held by one DICOM data set (recursively) to ``ids``.

    ``uids``, ``institution`` and ``device`` switch off categories the user chose to retain.
    With ``unread`` (a list), attributes that hold identifiers but cannot be decoded are appended
    there as ``(location, reason, raw bytes)`` instead of raising; damage in private attributes
    and in public ones that never hold identifiers does not matter and is not recorded.
    """
    ids = ids if ids is not None else Identifiers()
    ids.sources += 1
    datasets = [ds]
    if getattr(ds, "file_meta", None) is not None:
        datasets.append(ds.file_meta)
    for kw in ("Manufacturer", "ManufacturerModelName"):
        try:
            vendor = " ".join(str(ds.get(kw, "") or "").split()).upper()
        except Exception as exc:  # an undecodable vendor only prunes less
            if unread is None:
                raise
            vendor = ""
            log.debug("vendor attribute unreadable (%s)", read_error_reason(exc))
        if vendor:
            ids.vendors.add(vendor)
    if unread is None:
        elements: Iterator[Any] = (e for d in datasets for e in _iter_elements(d))
    else:
        elements = (e for d in datasets
                    for _, e in walk_dataset(d, unread=unread, tolerate=_holds_no_identifiers, skip=_bulk_data))
    for elem in elements:
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


def _display(f: Path, base: Path) -> str:
    """A reference file's path as reports show it: relative to the reference folder if inside it."""
    try:
        return f.relative_to(base).as_posix() if f != base else f.name
    except ValueError:
        return str(f)


def _reference_file(f: Path, shown: str, ids: Identifiers) -> None:
    """Add one reference file's identifiers to ``ids``; record it in ``ids.unreadable`` if they
    could not all be read (the scan then fails closed)."""
    unread: list[tuple[str, str, bytes]] = []
    with _watch_pydicom() as trouble:
        try:
            # large values (pixel data) are deferred, never read: the whole file is still parsed, so
            # a data set that stops early shows (pydicom stops quietly at some damage)
            ds = read_dicom(f, defer_size=1 << 16)
            tail = _unparsed_tail(ds, f) if ds is not None else None
        except Exception as exc:  # noqa: BLE001 - corrupt DICOM: pydicom raises many types
            ids.unreadable.append((shown, f"not read: {read_error_reason(exc)}"))
            return
        if ds is None:
            return  # not DICOM: nothing to collect
        try:
            identifiers_from_dataset(ds, ids, unread=unread)
        except Exception as exc:  # noqa: BLE001 - e.g. a data set that cannot be iterated at all
            unread.append(("(data set)", read_error_reason(exc), b""))
    if tail is None and trouble.errors:
        tail = "pydicom skipped damaged elements while reading"
    if tail is not None:
        ids.unreadable.append((shown, f"not read completely: {tail}"))
    elif unread:
        loc, reason, _ = unread[0]
        more = f" (and {len(unread) - 1} more element(s))" if len(unread) > 1 else ""
        ids.unreadable.append((shown, f"not read: {reason} at {loc}{more}"))


def collect_identifiers(reference: str | os.PathLike | Identifiers) -> Identifiers:
    """Identifiers from the DICOM headers of a reference: manifest JSON, DICOM folder or file.

    NIfTI (and NRRD/MetaImage) cases in a manifest carry no DICOM header and contribute nothing;
    files that are not DICOM are ignored.  A DICOM file whose identifying attributes cannot be
    decoded, or a DICOM case the manifest lists that is missing, is recorded in
    :attr:`Identifiers.unreadable`: :func:`scan_phi` reports it and the verdict fails closed.
    Raises PrivacyError if the reference does not exist or is not a readable manifest.
    """
    if isinstance(reference, Identifiers):
        return reference
    ref = Path(reference)
    if not ref.exists():
        raise PrivacyError(f"reference not found: {ref}",
                           hint="pass the manifest.json or DICOM folder the outputs were made from")
    is_manifest = ref.is_file() and ref.suffix.lower() == ".json"
    roots = _reference_images(ref) if is_manifest else [ref]
    base = ref.parent if is_manifest or ref.is_file() else ref
    ids = Identifiers()
    with quiet_pydicom():
        for root in roots:
            if not root.exists():
                if root.name.lower().endswith(VOLUME_SUFFIXES):
                    log.warning("reference image missing, skipped: %s", _display(root, base))
                else:
                    ids.unreadable.append((_display(root, base), "not read: listed in the manifest but missing"))
                continue
            for f in iter_files(root):
                if f.name.lower().endswith(VOLUME_SUFFIXES + (".json",)):
                    continue
                _reference_file(f, _display(f, base), ids)
    ids.prune_vendors()
    if ids.sources == 0 and not ids.unreadable:
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


def _safe_get(ds, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "")
    except Exception:  # noqa: BLE001 - undecodable: already reported as not scanned by the walk
        return ""


class _ParseTrouble(logging.Handler):
    """Counts what pydicom reports while it reads past damage instead of raising (its messages may
    quote values, so only the fact is kept): errors it logs and swallows, files ending before a
    sequence delimiter."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.errors += 1


@contextlib.contextmanager
def _watch_pydicom() -> Iterator[_ParseTrouble]:
    """Inside :func:`quiet_pydicom`: note (never print) the errors pydicom swallows while reading."""
    lg = logging.getLogger("pydicom")
    trouble = _ParseTrouble()
    old = lg.disabled, lg.propagate
    lg.disabled, lg.propagate = False, False
    lg.addHandler(trouble)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield trouble
        trouble.errors += sum("End of file" in str(w.message) for w in caught)
    finally:
        lg.removeHandler(trouble)
        lg.disabled, lg.propagate = old


def _unparsed_tail(ds, path: Path) -> str | None:
    """Why pydicom's data set does not cover the whole file, or None: it stops quietly at damage
    (a value cut short, an element it cannot read), leaving the rest of the bytes unparsed."""
    from pydicom.dataelem import RawDataElement

    tags = sorted(ds.keys())
    if not tags:
        return "no data elements"
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) if "TransferSyntaxUID" in \
        getattr(ds, "file_meta", {}) else None
    if ts is not None and getattr(ts, "is_deflated", False):
        return None  # offsets are in the inflated stream; inflation errors raise instead
    last = ds.get_item(tags[-1], keep_deferred=True)
    if not isinstance(last, RawDataElement) or last.value_tell is None:
        return None
    value = last.value
    if last.length == 0xFFFFFFFF:
        if value is None:  # deferred: pydicom found its delimiter (or warned, which is watched)
            return None
        end = last.value_tell + len(value) + 8  # + the sequence delimiter
    else:
        if isinstance(value, (bytes, bytearray)) and len(value) < last.length:
            return f"file ends inside an element ({len(value)} of {last.length} bytes)"
        end = last.value_tell + last.length
    size = path.stat().st_size
    if end > size:
        return "file ends inside an element (truncated)"
    if end < size:
        return f"{size - end} byte(s) after the last element were not parsed"
    return None


def _scan_dicom(ds, rel: str, ids: Identifiers, structural: bool) -> list[Hit]:
    hits: list[Hit] = []
    for d, pre in ((getattr(ds, "file_meta", None), "meta:"), (ds, "")):
        if d is None:
            continue
        unread: list[tuple[str, str, bytes]] = []
        for loc, elem in walk_dataset(d, unread=unread):
            try:
                text = element_text(elem)
            except Exception as exc:  # noqa: BLE001 - a value that cannot be shown as text
                unread.append((loc, read_error_reason(exc, with_tag=False), b""))
                continue
            hits += _hits(ids, rel, pre + loc, text)
            if structural and elem.tag.is_private and elem.tag.element >= 0x0100:
                hits.append(Hit(rel, loc, "private attribute", "(not checked)"))
        for loc, reason, raw in unread:
            hits.append(not_scanned_hit(rel, pre + loc, f"undecodable element: {reason}"))
            hits += _hits(ids, rel, pre + loc, printable_runs(raw))  # what its raw bytes show
    if structural:
        if _safe_get(ds, "PatientIdentityRemoved").upper() != "YES":
            hits.append(Hit(rel, "(0012,0062) PatientIdentityRemoved", "not marked de-identified", "(missing)"))
        if _safe_get(ds, "BurnedInAnnotation").upper() == "YES":
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


def _scan_jsonl(path: Path, rel: str, ids: Identifiers) -> list[Hit]:
    hits: list[Hit] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0]) if lines and lines[0].strip() else None
    audit = isinstance(first, dict) and isinstance(first.get("run"), dict) and "medsynth" in first["run"]
    skip = frozenset(AUDIT_VOCABULARY_KEYS) if audit else frozenset()
    for i, line in enumerate(lines):
        if line.strip():
            hits += _scan_json(json.loads(line), rel, ids, f"line {i + 1}", skip)
    return hits


def _opaque_kind(path: Path) -> str | None:
    """'gzip archive', 'PDF document', ... for containers whose text raw bytes do not show."""
    with open(path, "rb") as f:
        head = f.read(8)
    return next((kind for magic, kind in _OPAQUE_MAGIC if head.startswith(magic)), None)


def _scan_raw(path: Path, rel: str, ids: Identifiers) -> list[Hit]:
    """Search the bytes of a file of no parsed type: UTF-8 text, else its printable ASCII runs."""
    if path.stat().st_size > MAX_RAW_BYTES:
        return [not_scanned_hit(rel, "content", "file over 64 MiB of no known type",
                                "split or remove it, then scan again")]
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = printable_runs(data)
    return _hits(ids, rel, "content", text)


def _scan_dicom_file(path: Path, rel: str, ids: Identifiers, structural: bool) -> list[Hit] | None:
    """Hits of a DICOM file (None if it is not one), plus a not-scanned hit if pydicom read it only
    in part; parse errors propagate."""
    with _watch_pydicom() as trouble:
        ds = read_dicom(path, defer_size=1 << 20)
        if ds is None:
            return None
        tail = _unparsed_tail(ds, path)
        found = _scan_dicom(ds, rel, ids, structural)
    if tail is None and trouble.errors:
        tail = "pydicom skipped damaged elements while reading"
    if tail is not None:
        found.append(not_scanned_hit(rel, "file", f"incompletely parsed DICOM file: {tail}"))
        if path.stat().st_size <= MAX_RAW_BYTES:  # what the raw bytes show is reported too
            found += _hits(ids, rel, "content", printable_runs(path.read_bytes()))
    return found


def scan_file(path: Path, rel: str, ids: Identifiers, structural: bool = False) -> list[Hit]:
    """Scan one output file (its name, then its content by type) and return the hits.

    A NIfTI, JSON/JSONL or DICOM file that does not parse, and an archive or PDF, give a
    :data:`NOT_SCANNED` hit (with whatever their raw bytes show): their content was not searched.
    """
    hits: list[Hit] = []
    found_in_name = ids.find(rel)
    for _, value in found_in_name:  # the report names the file without repeating what it found
        rel = re.sub(re.escape(value), mask(value), rel, flags=re.IGNORECASE)
    hits += [Hit(rel, "file name", kind, mask(value)) for kind, value in found_in_name]
    name = path.name.lower()
    what = "DICOM file"
    try:
        if is_nifti(name) or sniff_nifti(path):  # by name or content: a misnamed NIfTI is scanned as one
            what = "NIfTI file"
            return hits + _scan_nifti(path, rel, ids, structural)
        if name.endswith(".json"):
            what = "JSON file"
            return hits + _scan_json(json.loads(path.read_text(encoding="utf-8")), rel, ids)
        if name.endswith(".jsonl"):
            what = "JSON lines file"
            return hits + _scan_jsonl(path, rel, ids)
        found = _scan_dicom_file(path, rel, ids, structural)
        if found is not None:
            return hits + found
        if name.endswith(_DICOM_SUFFIXES):  # named as DICOM but not recognised as such
            raise _Unrecognised("named as DICOM but not a DICOM data set")
        what = "file"
        opaque = _opaque_kind(path)
        if opaque:
            hits.append(not_scanned_hit(rel, "content", f"{opaque}: its contents are not searched",
                                        "unpack it and scan the unpacked files, or remove it"))
        return hits + _scan_raw(path, rel, ids)
    except Exception as exc:  # noqa: BLE001 - unreadable as its type: fail closed
        log.debug("%s: not scanned (%s)", rel, type(exc).__name__)
        hits.append(not_scanned_hit(rel, "file", f"unreadable {what}: {read_error_reason(exc)}"))
    try:  # what the raw bytes show is reported too (the verdict has already failed)
        hits += _scan_raw(path, rel, ids)
    except OSError:
        pass
    return hits


def _scan_entries(root: Path) -> Iterator[tuple[Path, str | None]]:
    """Every entry to scan under ``root``, sorted: (path, None) for regular files, (path, reason)
    for what cannot be scanned (symbolic links, special files), (folder, 'empty folder') for
    folders whose names would otherwise not be searched."""
    if root.is_file() and not root.is_symlink():
        yield root, None
        return
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames.sort()
        for dn in dirnames:
            if (d / dn).is_symlink():
                yield d / dn, "symbolic link to a folder (not followed)"
        if not dirnames and not filenames and d != root:
            yield d, "empty folder"
        for fn in sorted(filenames):
            p = d / fn
            if p.is_symlink():
                yield p, "symbolic link (not followed)"
            elif not p.is_file():
                yield p, "not a regular file"
            else:
                yield p, None


def scan_phi(directory: str | os.PathLike, reference: str | os.PathLike | Identifiers | None = None
             ) -> list[Hit]:
    """Scan every file under ``directory`` for identifiers of the ``reference`` inputs.

    ``reference`` is a medsynth manifest, a DICOM folder/file, or :class:`Identifiers` collected
    earlier with :func:`collect_identifiers`.  Without a reference only structural checks run (DICOM
    not marked de-identified, private attributes, burned-in flags, NIfTI extensions).  Returns the
    hits (empty = clean), :data:`NOT_SCANNED` hits included for what could not be searched (in the
    outputs or in the reference); raises PrivacyError if ``directory`` does not exist.
    """
    root = Path(directory)
    if not root.exists():
        raise PrivacyError(f"folder to scan not found: {root}", hint="pass the output folder of anonymise/export")
    structural = reference is None
    ids = Identifiers() if reference is None else collect_identifiers(reference)
    hits: list[Hit] = []
    for shown, reason in ids.unreadable:
        for _, value in ids.find(shown):
            shown = re.sub(re.escape(value), mask(value), shown, flags=re.IGNORECASE)
        hits.append(not_scanned_hit(f"reference {shown}", "identifiers", reason, _FIX_REFERENCE))
    n_files = 0
    with quiet_pydicom():
        for f, problem in _scan_entries(root):
            rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
            if problem is None:
                n_files += 1
                hits += scan_file(f, rel, ids, structural)
                continue
            found = ids.find(rel)
            for _, value in found:
                rel = re.sub(re.escape(value), mask(value), rel, flags=re.IGNORECASE)
            hits += [Hit(rel, "folder name" if problem == "empty folder" else "file name", kind, mask(value))
                     for kind, value in found]
            if problem != "empty folder":
                hits.append(not_scanned_hit(rel, "file", problem, "replace it with the file it stands for, "
                                                                  "or remove it"))
    log.info("phi-scan: %d files, %d identifiers from %d reference headers, %d hits (%d not scanned)",
             n_files, len(ids), ids.sources, len(hits), sum(h.not_scanned for h in hits))
    return hits


def summarise_hits(hits: list[Hit]) -> str:
    """'3 identifier hit(s) and 2 place(s) not scanned': the counts a verdict line states."""
    n_out = sum(h.not_scanned for h in hits)
    parts = [f"{len(hits) - n_out} identifier hit(s)"] if len(hits) > n_out or not n_out else []
    if n_out:
        parts.append(f"{n_out} place(s) not scanned")
    return " and ".join(parts)
