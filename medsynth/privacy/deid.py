"""De-identification of DICOM and NIfTI files: ``medsynth anonymise``.

DICOM files get the Basic Application Level Confidentiality Profile of DICOM PS3.15 Annex E
(Table E.1-1, loaded as data by :mod:`medsynth.privacy.deid_profile`), applied recursively inside
sequences, plus the options the user chooses.  Everything that must be consistent across files is
derived from one secret key with HMAC-SHA256, so the same input gives the same output in every run
with that key:

* UIDs: ``2.25.<128-bit number>`` from HMAC(key, uid) (shaped as a version-8 UUID), so an instance,
  its series and study, and every reference to them inside sequences map alike in every file.
* Patients: a pseudonym ``MS-<12 base32 chars>`` from HMAC(key, issuer|patient id) replaces Patient
  ID and Patient's Name, so distinct patients stay distinct.
* Dates (option retain-long-modified-dates): one shift of 1..3650 days per patient.

After the profile, a residual sweep removes any kept value that still holds an identifier of the
input (its names, IDs, birth date, accession number, institution, original UIDs), compared as
normalised text (:mod:`medsynth.privacy.idmatch`: case-folded, accents stripped, every person-name
component and component group on its own, ideographic and phonetic names included), code meanings
and coding scheme designators included; inside a code item the value is replaced (keyed code
values and designators, the meaning without the identifier) so the item stays valid.  Private
coding scheme designators (``99...``) name their organisation and are pseudonymised always.  The
output is
marked (Patient Identity Removed, De-identification Method and its code sequence, Longitudinal
Temporal Information Modified) and the file meta is rebuilt to match.  Objects that may carry
identity in their pixels (Burned In Annotation YES, secondary capture, ultrasound, visible light,
X-ray angiography) are quarantined unless the user allows them; structured reports and
encapsulated documents always are.  NIfTI files lose descrip, aux_file, intent_name, the legacy
text fields and all extensions; their voxel bytes are copied unchanged.  NRRD and MetaImage files
(recognised by content; a detached header's data files travel with it) are rewritten by SimpleITK
as one attached, compressed file holding the voxels and the geometry only: comments, key/value
pairs and free-text fields (NRRD content, labels, units; MetaImage Comment, Name, any extra field)
are dropped, and the written header is checked to hold nothing else.

Inputs are only read.  Output names come from the keyed UIDs or the keyed content hash, never from
input names.  The audit log (JSONL) holds per input file its SHA-256, output name, actions by tag,
and the quarantine or failure reason: never an original value, never an input path.
"""

from __future__ import annotations

import base64
import datetime as _dt
import gzip
import hashlib
import hmac
import io
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsynth.dicom_series import quiet_pydicom
from medsynth.formats import sniff_itk_format
from medsynth.errors import ConfigError, PrivacyError
from medsynth.jobs import atomic_path, sha256_file
from medsynth.privacy.deid_profile import (
    BASIC_CODE,
    OPTIONS,
    check_options,
    is_curve_or_overlay,
    load_profile,
    load_safe_private,
    resolve_action,
)
from medsynth.privacy.idmatch import NormalisedIds
from medsynth.privacy.phi_scan import (
    Identifiers,
    element_text,
    identifiers_from_dataset,
    is_class_uid_keyword,
    iter_files,
    read_dicom,
)
from medsynth.volume import sniff_nifti

log = logging.getLogger("medsynth.privacy.deid")

KEY_MIN_BYTES = 16
PSEUDONYM_PREFIX = "MS-"
DUMMY_TEXT = "ANONYMOUS"
DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000D", "IS": "0", "DS": "0",
         "UR": "urn:x-medsynth:removed"}
TEXT_VRS = {"LO", "LT", "ST", "UT", "SH", "UC", "PN"}
NUMERIC_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}
BYTES_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}

# Compound codes (X/Z, X/D, X/Z/D, Z/D) depend on the attribute's type in the IOD.  medsynth keeps
# no IOD tables; these are the attributes that are Type 2 (need presence) in the IODs medsynth meets,
# and the ones that are Type 1 in enhanced multi-frame and SEG objects (Enhanced General Equipment,
# Multi-frame Functional Groups).  Everything else gets the most removing choice.
_TYPE2 = {0x00400555, 0x00102203, 0x300E0008, 0x300A00B2, 0x00080023, 0x00080033, 0x00700084, 0x00180010,
          0x00189919, 0x00081070, 0x300A0006, 0x300A0007}
_TYPE1_MULTIFRAME = {0x00080023, 0x00080033, 0x0008002A, 0x00181000}
_TYPE1_BY_SOP_PREFIX = {
    "1.2.840.10008.5.1.4.1.1.9.": {0x00080023, 0x00080033, 0x0008002A},  # waveforms: Waveform Identification
}
_PATIENT_ID, _PATIENT_NAME = 0x00100020, 0x00100010
# Inside sequences the profile replaces wholesale (action D on a sequence: Content Sequence,
# Verifying Observer Sequence, ...) only coded values survive; free text does not.
_CODE_KEYWORDS = {"CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue",
                  "URNCodeValue", "MappingResourceName", "ContextIdentifier"}

# SOP classes quarantined unless --allow-burned-in: their pixels often show names, IDs and dates.
RISKY_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "secondary capture",
    "1.2.840.10008.5.1.4.1.1.6.1": "ultrasound", "1.2.840.10008.5.1.4.1.1.3.1": "ultrasound multi-frame",
    "1.2.840.10008.5.1.4.1.1.6.2": "enhanced ultrasound volume", "1.2.840.10008.5.1.4.1.1.6.3": "photoacoustic",
    "1.2.840.10008.5.1.4.1.1.77.1": "visible light (photo, endoscopy, microscopy, video)",
    "1.2.840.10008.5.1.4.1.1.12.1": "X-ray angiography", "1.2.840.10008.5.1.4.1.1.12.2": "X-ray fluoroscopy",
}
# Quarantined always: medsynth cannot de-identify their free-text content trees or documents.
UNSUPPORTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88": "structured report (free-text content tree)",
    "1.2.840.10008.5.1.4.1.1.104": "encapsulated document (PDF, CDA, STL, ...)",
    "1.2.840.10008.5.1.4.1.1.11": None,  # presentation states are fine: listed so the prefix test stays exact
}
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


def load_key(path: str | os.PathLike) -> bytes:
    """Read the secret key file (at least 16 bytes).  The key is never logged or written anywhere."""
    p = Path(path)
    make = f"head -c 32 /dev/urandom > {p} && chmod 600 {p}"
    if not p.is_file():
        raise PrivacyError(f"key file not found: {p}",
                           hint=f"create a secret key once and keep it outside the data you share: {make}")
    data = p.read_bytes()
    if len(data) < KEY_MIN_BYTES:
        raise PrivacyError(f"key file {p} holds {len(data)} bytes; need at least {KEY_MIN_BYTES} random bytes",
                           hint=f"make a new key: {make}")
    return data


@dataclass
class _FileCtx:
    """Per-data-set state while the profile is applied."""

    pseudonym: str
    shift_days: int
    ids: Identifiers
    type1: set[int]
    names: NormalisedIds = field(default_factory=NormalisedIds)
    actions: dict[str, str] = field(default_factory=dict)

    def act(self, loc: str, code: str) -> None:
        # audit keys drop item indices: one entry per attribute path, not per item
        self.actions.setdefault(re.sub(r"\[\d+\]", "", loc), code)


class Deidentifier:
    """Applies the profile with one key and one set of options; holds no per-file state.

    ``options`` are names from :data:`medsynth.privacy.deid_profile.OPTIONS`.
    """

    def __init__(self, key: bytes, options: Iterable[str] = (), allow_burned_in: bool = False):
        if len(key) < KEY_MIN_BYTES:
            raise PrivacyError(f"de-identification key must be at least {KEY_MIN_BYTES} bytes")
        self._key = bytes(key)
        self.options = check_options(options)
        self.allow_burned_in = allow_burned_in
        self.profile = load_profile()
        self.safe_private = load_safe_private()
        self._uid_cache: dict[str, str] = {}

    # -- keyed derivations ----------------------------------------------------------------------

    def _mac(self, purpose: str, value: str) -> bytes:
        msg = f"medsynth-deid/{purpose}\0{value}".encode("utf-8", "surrogateescape")
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    @property
    def key_id(self) -> str:
        """A fingerprint that tells two runs used the same key without revealing it."""
        return self._mac("key-id", "").hex()[:16]

    def keyed_uid(self, uid: str) -> str:
        """The ``2.25.`` UID for ``uid`` under this key (a version-8 UUID as an integer)."""
        uid = str(uid).strip().rstrip("\0")
        out = self._uid_cache.get(uid)
        if out is None:
            b = bytearray(self._mac("uid", uid)[:16])
            b[6] = (b[6] & 0x0F) | 0x80
            b[8] = (b[8] & 0x3F) | 0x80
            out = "2.25." + str(int.from_bytes(bytes(b), "big"))
            if len(self._uid_cache) < 1_000_000:
                self._uid_cache[uid] = out
        return out

    def map_uid(self, uid: str) -> str:
        """Action U: the keyed UID, or the original under the Retain UIDs option."""
        if "retain-uids" in self.options:
            return str(uid)
        return self.keyed_uid(uid) if str(uid).strip() else str(uid)

    def pseudonym(self, patient_key: str) -> str:
        """The pseudonymous patient ID/name for a patient key."""
        code = base64.b32encode(self._mac("patient", patient_key)).decode("ascii")
        return PSEUDONYM_PREFIX + code[:12]

    def date_shift_days(self, patient_key: str) -> int:
        """Days subtracted from every date of this patient (retain-long-modified-dates): 1..3650."""
        return 1 + int.from_bytes(self._mac("dateshift", patient_key)[:4], "big") % 3650

    def ae_pseudonym(self, value: str) -> str:
        return "AE" + self._mac("ae", str(value).strip()).hex()[:8].upper()

    @staticmethod
    def patient_key(ds) -> str:
        """What identifies the patient of a data set: issuer + Patient ID, else name + birth date."""
        pid = str(ds.get("PatientID", "") or "").strip()
        if pid:
            return f"id:{str(ds.get('IssuerOfPatientID', '') or '').strip()}|{pid}"
        name = str(ds.get("PatientName", "") or "").strip()
        birth = str(ds.get("PatientBirthDate", "") or "").strip()
        if name or birth:
            return f"name:{name}|{birth}"
        return f"study:{str(ds.get('StudyInstanceUID', '') or '').strip()}"

    # -- screening ------------------------------------------------------------------------------

    def quarantine_reason(self, ds) -> str | None:
        """Why this data set must not be written (pixels or content may identify), or None."""
        sop = str(ds.get("SOPClassUID", "") or "").strip()
        for prefix, what in UNSUPPORTED_SOP_CLASSES.items():
            if what and (sop == prefix or sop.startswith(prefix + ".")):
                return f"{what}: not de-identified by medsynth"
        if self.allow_burned_in:
            return None
        if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
            return "Burned In Annotation is YES: pixels show identifying text (check, then --allow-burned-in)"
        if str(ds.get("RecognizableVisualFeatures", "") or "").strip().upper() == "YES":
            return "Recognizable Visual Features is YES (check, then --allow-burned-in)"
        for prefix, what in RISKY_SOP_CLASSES.items():
            if sop == prefix or sop.startswith(prefix + "."):
                return f"{what} images often carry burned-in text (check the pixels, then --allow-burned-in)"
        return None

    # -- the profile ----------------------------------------------------------------------------

    def deidentify_dataset(self, ds) -> dict[str, str]:
        """De-identify ``ds`` in place (profile, residual sweep, markers, file meta).

        Returns the actions taken as {attribute path: action code}; values never appear.
        """
        pkey = self.patient_key(ds)
        ids = identifiers_from_dataset(ds, uids="retain-uids" not in self.options,
                                       institution="retain-institution-id" not in self.options,
                                       device="retain-device-id" not in self.options)
        type1: set[int] = set()
        if "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
            type1 |= _TYPE1_MULTIFRAME
        sop = str(ds.get("SOPClassUID", "") or "")
        for prefix, tags in _TYPE1_BY_SOP_PREFIX.items():
            if sop.startswith(prefix):
                type1 |= tags
        ctx = _FileCtx(pseudonym=self.pseudonym(pkey), shift_days=self.date_shift_days(pkey), ids=ids,
                       type1=type1, names=normalised_identifiers(ds, ids, self.options))
        self._walk(ds, ctx, "", top=True, strict=False)
        self._residual_sweep(ds, ctx, "")
        self._mark(ds)
        self._rebuild_meta(ds)
        return ctx.actions

    def _walk(self, ds, ctx: _FileCtx, prefix: str, top: bool, strict: bool) -> None:
        for elem in list(ds):
            tag = elem.tag
            loc = f"{prefix}({tag.group:04X},{tag.element:04X})"
            if tag.element == 0x0000:  # group lengths are retired and would be wrong after edits
                del ds[tag]
                continue
            if tag.is_private:
                if 0x0010 <= tag.element <= 0x00FF:
                    continue  # private creators: decided after their elements, below
                if not self._keep_private(ds, elem):
                    del ds[tag]
                    ctx.act(f"{prefix}(private)", "X")
                continue
            g = tag.group
            if is_curve_or_overlay(tag):  # the profile's overlay rule: the whole group goes
                del ds[tag]
                ctx.act(f"{prefix}({g:04X},xxxx)", "X")
                continue
            row = self.profile.lookup(tag)
            if row is None:
                self._unlisted(ds, elem, ctx, loc, strict)
                continue
            code = self._concrete(resolve_action(row, self.options), tag, ctx)
            if tag == _PATIENT_ID and "X" not in code:
                value = str(elem.value or "").strip()
                elem.value = ctx.pseudonym if top else (self.pseudonym(f"id:|{value}") if value else "")
                ctx.act(loc, "D")
                continue
            if tag == _PATIENT_NAME and top:
                elem.value = ctx.pseudonym
                ctx.act(loc, "D")
                continue
            self._apply(ds, elem, code, ctx, loc)
        self._drop_orphan_private_creators(ds)

    def _concrete(self, code: str, tag: int, ctx: _FileCtx) -> str:
        if code == "X/Z/U*":
            return "U*"  # keep the references, remap the instance UIDs inside (they are U rows)
        if "/" not in code:
            return code
        parts = code.split("/")
        if "D" in parts and int(tag) in ctx.type1:
            return "D"
        if int(tag) in _TYPE2 or "X" not in parts:  # must stay present: empty if allowed, else dummy
            return "Z" if "Z" in parts else "D"
        return "X"

    def _apply(self, ds, elem, code: str, ctx: _FileCtx, loc: str) -> None:
        from pydicom.sequence import Sequence

        vr = elem.VR
        if code == "X":
            del ds[elem.tag]
        elif code == "Z":
            elem.value = Sequence([]) if vr == "SQ" else None
        elif code == "D":
            if vr == "SQ":
                self._walk_items(elem, ctx, loc, strict=True)
            else:
                elem.value = self._dummy(elem)
        elif code in ("K", "U*"):
            if vr == "SQ":
                self._walk_items(elem, ctx, loc, strict=False)
        elif code == "U":
            if vr == "SQ":
                self._walk_items(elem, ctx, loc, strict=False)
            elif vr == "UI":
                self._map_uids(elem)
            else:
                elem.value = self._dummy(elem)
        elif code == "C":
            self._clean(elem, ctx, loc)
        else:  # pragma: no cover - load_profile rejects unknown codes
            raise PrivacyError(f"internal: unknown action {code}")
        ctx.act(loc, code)

    def _walk_items(self, elem, ctx: _FileCtx, loc: str, strict: bool) -> None:
        for i, item in enumerate(elem.value or []):
            self._walk(item, ctx, f"{loc}[{i}]>", top=False, strict=strict)

    def _unlisted(self, ds, elem, ctx: _FileCtx, loc: str, strict: bool) -> None:
        if elem.VR == "SQ":
            self._walk_items(elem, ctx, loc, strict)
        elif elem.VR == "UI" and not is_class_uid_keyword(elem.keyword) and "retain-uids" not in self.options:
            # Table E.1-1 lists the instance UIDs of the standard it was made from; a UID attribute
            # it does not list (newer or private-in-public use) is remapped rather than trusted.
            before = element_text(elem)
            self._map_uids(elem)
            if element_text(elem) != before:
                ctx.act(loc, "U")
        elif strict and elem.VR in TEXT_VRS and elem.keyword not in _CODE_KEYWORDS:
            del ds[elem.tag]
            ctx.act(loc, "X")

    def _map_uids(self, elem) -> None:
        from pydicom.uid import UID_dictionary

        def one(u: Any) -> str:
            s = str(u).strip().rstrip("\0")
            if not s or s.startswith("1.2.840.10008.") or s in UID_dictionary:
                return s
            return self.map_uid(s)

        v = elem.value
        if v is None:
            return
        elem.value = [one(u) for u in v] if _is_multi(v) else one(v)

    def _dummy(self, elem) -> Any:
        vr = elem.VR
        if vr == "UI":
            v = str(elem.value or "").strip()
            return self.keyed_uid(v or "dummy")
        if vr in NUMERIC_VRS:
            return 0
        if vr in BYTES_VRS:
            return b"\x00\x00"
        if vr == "AE":
            return "ANONYMOUS"
        return DUMMY.get(vr, DUMMY_TEXT)

    def _clean(self, elem, ctx: _FileCtx, loc: str) -> None:
        vr = elem.VR
        if vr == "SQ":
            self._walk_items(elem, ctx, loc, strict=False)
            return
        v = elem.value
        if v is None or v == "":
            return
        if vr in ("DA", "DT"):
            shift = ctx.shift_days if "retain-long-modified-dates" in self.options else 0
            f = _shift_da if vr == "DA" else _shift_dt
            vals = [f(str(x), shift) for x in (v if _is_multi(v) else [v])]
            if any(x is None for x in vals):
                elem.value = None  # an unparseable date cannot be shifted; it goes
            else:
                elem.value = vals if _is_multi(v) else vals[0]
        elif vr == "AE":
            elem.value = [self.ae_pseudonym(x) for x in v] if _is_multi(v) else self.ae_pseudonym(v)
        elif vr in TEXT_VRS or vr == "CS":
            if _is_multi(v):
                elem.value = [clean_text(str(x), ctx.ids, ctx.names) for x in v]
            else:
                elem.value = clean_text(str(v), ctx.ids, ctx.names)
        # TM (times keep their clock value), numbers, AS: clean = keep

    # -- private attributes ---------------------------------------------------------------------

    def _keep_private(self, ds, elem) -> bool:
        if "retain-safe-private" not in self.options or elem.tag.element < 0x1000:
            return False
        from pydicom.tag import Tag

        creator = ds.get(Tag(elem.tag.group, elem.tag.element >> 8))
        if creator is None:
            return False
        sp = self.safe_private.get((str(creator.value).strip(), elem.tag.group, elem.tag.element & 0xFF))
        if sp is None or elem.VR not in (sp.vr, "UN"):
            return False
        v = elem.value
        if isinstance(v, (bytes, bytearray)):
            if sp.vr in ("FD", "FL"):
                return len(v) % (8 if sp.vr == "FD" else 4) == 0
            v = bytes(v).decode("latin-1")
        text = "\\".join(str(x) for x in v) if _is_multi(v) else str(v)
        if sp.vr in ("DS", "IS"):
            return re.fullmatch(r"[0-9+\-.eE \\]*", text.rstrip("\0")) is not None
        if sp.vr == "CS":
            return re.fullmatch(r"[A-Z0-9 _\\]{0,16}", text.rstrip("\0")) is not None
        return sp.vr in NUMERIC_VRS

    @staticmethod
    def _drop_orphan_private_creators(ds) -> None:
        from pydicom.tag import Tag

        used = {(e.tag.group, e.tag.element >> 8) for e in ds if e.tag.is_private and e.tag.element >= 0x1000}
        for e in list(ds):
            if e.tag.is_private and 0x0010 <= e.tag.element <= 0x00FF and (e.tag.group, e.tag.element) not in used:
                del ds[Tag(e.tag)]
        # private creators of odd groups 0x0001-0x0007, 0xFFFF are illegal anyway; nothing else to do

    # -- after the profile ----------------------------------------------------------------------

    def _residual_sweep(self, ds, ctx: _FileCtx, prefix: str) -> None:
        """Remove kept values that still contain an identifier of this data set.

        Every kept value is compared with the file's identifiers, as the PHI scanner matches them
        and as normalised text (:mod:`medsynth.privacy.idmatch`: case-folded, accents stripped,
        each person-name component and group on its own).  A hit is removed; inside a code item
        (a Type 1 triplet) it is replaced instead: code values and coding scheme designators by
        keyed pseudonyms (the same in every file), code meanings by their text without the
        identifier.  Private coding scheme designators (``99...``) name the organisation that
        made them, so they are pseudonymised always, unless the institution identity is retained.
        """
        private_schemes = "retain-institution-id" not in self.options
        for elem in list(ds):
            if elem.tag not in ds:  # removed with its private coding scheme, below
                continue
            loc = f"{prefix}({elem.tag.group:04X},{elem.tag.element:04X})"
            if elem.VR == "SQ":
                for i, item in enumerate(elem.value or []):
                    self._residual_sweep(item, ctx, f"{loc}[{i}]>")
                continue
            if elem.VR in ("IS", "DS") or elem.tag in (_PATIENT_ID, _PATIENT_NAME):
                continue
            text = element_text(elem)
            if not text:
                continue
            if private_schemes and elem.keyword == "CodingSchemeDesignator" and text.strip().startswith("99"):
                elem.value = self._code_pseudonym(elem.keyword, text)
                ctx.act(loc, "D (private coding scheme)")
                for kw in ("CodingSchemeName", "CodingSchemeResponsibleOrganization"):
                    if kw in ds:  # Type 3 texts that describe the private scheme's owner
                        del ds[kw]
                        ctx.act(f"{prefix}({ds_tag(kw)})", "X (private coding scheme)")
                continue
            if ctx.ids.find(text) or (elem.VR not in _NOT_NAME_VRS and ctx.names.found_in(text)):
                self._replace_residual(ds, elem, text, ctx, loc)

    def _replace_residual(self, ds, elem, text: str, ctx: _FileCtx, loc: str) -> None:
        """Remove one kept value that holds an identifier; in a code item, keep the item valid."""
        kw = elem.keyword
        in_code_item = any(k in ds for k in _CODE_VALUE_KEYWORDS)
        if kw in _CODE_VALUE_KEYWORDS or kw == "CodingSchemeDesignator":
            elem.value = self._code_pseudonym(kw, text)
            ctx.act(loc, "D (residual identifier)")
        elif (kw == "CodeMeaning" and in_code_item) or kw in _TYPE1_TEXT:
            cleaned = clean_text(text, ctx.ids, ctx.names)
            if not re.search(r"[^\W\d_]", cleaned) or ctx.ids.find(cleaned) or ctx.names.found_in(cleaned):
                cleaned = DUMMY_TEXT
            elem.value = cleaned
            ctx.act(loc, "C (residual identifier)")
        else:
            del ds[elem.tag]
            ctx.act(loc, "X (residual identifier)")

    def _code_pseudonym(self, keyword: str, value: str) -> str:
        """A keyed replacement for an identifying code value or coding scheme designator: the same
        input gives the same output in every file under one key, so codes still compare."""
        digest = self._mac(f"code/{keyword}", value.strip()).hex().upper()
        if keyword == "CodingSchemeDesignator":
            return "99MS" + digest[:8]  # still a private scheme (PS3.16 8.2: private designators begin '99')
        if keyword == "URNCodeValue":
            return "urn:x-medsynth:" + digest[:16].lower()
        return "MS" + digest[:10]

    def _mark(self, ds) -> None:
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        from medsynth import __version__

        ds.PatientIdentityRemoved = "YES"
        edition = self.profile.edition.replace("DICOM ", "")
        methods = [f"medsynth {__version__} {edition} E.1-1 Basic Profile"[:64]]
        methods += [OPTIONS[o].meaning[:64] for o in self.options]
        ds.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
        items = []
        for code, meaning in [BASIC_CODE] + [(OPTIONS[o].code, OPTIONS[o].meaning) for o in self.options]:
            it = Dataset()
            it.CodeValue = code
            it.CodingSchemeDesignator = "DCM"
            it.CodeMeaning = meaning
            items.append(it)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        if "retain-long-full-dates" in self.options:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif "retain-long-modified-dates" in self.options:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"

    @staticmethod
    def _rebuild_meta(ds) -> None:
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import (
            PYDICOM_IMPLEMENTATION_UID,
            ExplicitVRBigEndian,
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
        )

        from medsynth import __version__

        old = getattr(ds, "file_meta", None)
        ts = old.get("TransferSyntaxUID") if old is not None else None
        if not ts:
            implicit, little = getattr(ds, "original_encoding", (True, True))
            ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        fm = FileMetaDataset()
        fm.FileMetaInformationVersion = b"\x00\x01"
        fm.MediaStorageSOPClassUID = ds.SOPClassUID
        fm.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        fm.TransferSyntaxUID = ts
        fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        fm.ImplementationVersionName = f"MEDSYNTH_{__version__}"[:16]
        ds.file_meta = fm
        ds.preamble = b"\x00" * 128  # an input preamble may hold anything (TIFF headers, text)


# --------------------------------------------------------------------------------------------------
# value helpers
# --------------------------------------------------------------------------------------------------


def _is_multi(v: Any) -> bool:
    return isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue"


def _fmt_date(d: _dt.date) -> str:
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def _shift_date8(s: str, days: int) -> str | None:
    try:
        d = _dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
        return _fmt_date(d - _dt.timedelta(days=days))
    except (ValueError, OverflowError):
        return None


def _shift_da(value: str, days: int) -> str | None:
    """Shift a DA value (also ranges and the legacy YYYY.MM.DD form) back by ``days``."""
    value = value.strip()
    if "-" in value:  # range (query form); each side may be empty
        parts = [(_shift_da(p, days) if p else "") for p in value.split("-", 1)]
        return None if None in parts else "-".join(parts)  # type: ignore[arg-type]
    digits = value.replace(".", "") if re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", value) else value
    if not re.fullmatch(r"\d{8}", digits):
        return None
    return _shift_date8(digits, days)


def _shift_dt(value: str, days: int) -> str | None:
    """Shift the date part of a DT value; a partial date (YYYY, YYYYMM) moves with its middle."""
    value = value.strip()
    m = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?(\d{0,6}(?:\.\d{1,6})?)?([+-]\d{4})?", value)
    if not m:
        return None
    y, mo, d, rest, tz = m.groups()
    if d:
        out = _shift_date8(f"{y}{mo}{d}", days)
        return None if out is None else out + (rest or "") + (tz or "")
    anchor = _shift_date8(f"{y}{mo or '07'}{'15' if mo else '01'}", days)
    if anchor is None:
        return None
    return anchor[: 6 if mo else 4] + (tz or "")


_DATE_LIKE = re.compile(r"(?<!\d)(?:\d{8}|\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})(?!\d)")
_LONG_NUMBER = re.compile(r"(?<![\d.])\d{5,}(?![\d.])")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")


def clean_text(text: str, ids: Identifiers, names: NormalisedIds | None = None) -> str:
    """Clean a descriptor: drop this data set's identifiers, dates, e-mail addresses and long numbers.

    Used for action C on text (Clean Descriptors, Retain Patient Characteristics) and for code
    meanings that hold an identifier.  ``names`` adds the normalised-text matching of
    :mod:`medsynth.privacy.idmatch` (names in any script, accents, case).  What remains
    (e.g. 'T1 AX POST GAD') is what a descriptor is for.
    """
    out = names.cut(text) if names is not None else text
    for _, value in ids.find(out):
        out = re.sub(re.escape(value), " ", out, flags=re.IGNORECASE)
    out = _EMAIL.sub(" ", out)
    out = _DATE_LIKE.sub(" ", out)
    out = _LONG_NUMBER.sub(" ", out)
    out = re.sub(r"[\^=]+", " ", out)
    return " ".join(out.split()).strip(" ,;:-/")


# Where a file's identifiers are, beyond what the PHI scanner collects: code sequences whose items
# name the institution or a person, and a person's contact details.
_INSTITUTION_CODE_SEQUENCE = 0x00080082
_IDENTIFYING_SEQUENCES = {_INSTITUTION_CODE_SEQUENCE, 0x00401101, 0x00100024}  # institution, person, PID issuer
_CONTACT_KEYWORDS = {"PersonAddress", "PersonTelephoneNumbers", "PersonTelecomInformation",
                     "PatientTelecomInformation", "ResponsibleOrganization", "ResponsiblePerson",
                     "PatientMotherBirthName", "PatientBirthName", "OtherPatientNames"}
_SCHEME_KEYWORDS = {"CodingSchemeDesignator", "CodingSchemeVersion", "ContextIdentifier", "MappingResource"}
_CODE_VALUE_KEYWORDS = {"CodeValue", "LongCodeValue", "URNCodeValue"}
# Type 1 free text that a kept object needs (a SEG's segments): cleaned, not removed.
_TYPE1_TEXT = {"SegmentLabel"}
# Values that cannot hold a name (UIDs are matched as UIDs, dates as dates, by the scanner's rules).
_NOT_NAME_VRS = {"UI", "DA", "DT", "TM", "AS", "AT"}


def normalised_identifiers(ds, ids: Identifiers, options: Iterable[str] = ()) -> NormalisedIds:
    """The identifiers of one data set as normalised text: the PHI scanner's (names, IDs,
    institution, ...), every person name split into its groups and components, and the texts of
    identifying code sequences (institution, person, patient ID issuer) and contact details."""
    from pydicom.tag import Tag

    institution = "retain-institution-id" not in options
    names = NormalisedIds()
    names.extend(ids.tokens)
    names.extend(ids.phrases)

    def walk(d, inside: bool) -> None:
        for elem in d:
            if elem.tag.is_private or elem.value is None or elem.tag == 0x7FE00010:
                continue
            if elem.VR == "SQ":
                ident = int(elem.tag) in _IDENTIFYING_SEQUENCES and (institution or elem.tag != Tag(
                    _INSTITUTION_CODE_SEQUENCE))
                for item in elem.value:
                    walk(item, inside or ident)
                continue
            values = list(elem.value) if _is_multi(elem.value) else [elem.value]
            if elem.VR == "PN":
                for v in values:
                    names.add_person_name(str(v))
            elif (inside and elem.VR in TEXT_VRS and elem.keyword not in _SCHEME_KEYWORDS) or \
                    elem.keyword in _CONTACT_KEYWORDS:
                for v in values:
                    names.add(str(v))

    walk(ds, False)
    return names


def ds_tag(keyword: str) -> str:
    """``(gggg,eeee)`` of a keyword, for audit paths."""
    from pydicom.datadict import tag_for_keyword

    t = tag_for_keyword(keyword) or 0
    return f"{t >> 16:04X},{t & 0xFFFF:04X}"


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------

_NIFTI_FIELDS = ("descrip", "aux_file", "intent_name", "db_name", "data_type")


def _read_maybe_gzip(path: Path) -> tuple[bytes, bool]:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw), True
    return raw, False


def deidentify_nifti_bytes(raw: bytes) -> tuple[bytes, list[str]]:
    """A NIfTI file's bytes with text fields cleared and extensions dropped; voxels unchanged."""
    import nibabel as nib

    is2 = raw[4:8] == b"n+2\x00"
    cls = nib.Nifti2Header if is2 else nib.Nifti1Header
    hdr = cls.from_fileobj(io.BytesIO(raw), check=False)
    vox_offset = int(hdr["vox_offset"])
    data = raw[vox_offset:]
    actions = []
    for f in _NIFTI_FIELDS:
        if f in hdr and bytes(hdr[f].tobytes()).strip(b"\0 "):
            actions.append(f"{f}: cleared")
        if f in hdr:
            hdr[f] = b""
    if len(hdr.extensions):
        actions.append(f"extensions: {len(hdr.extensions)} dropped")
        del hdr.extensions[:]
    hdr["vox_offset"] = 0  # recomputed by write_to: header + empty extension flag
    buf = io.BytesIO()
    hdr.write_to(buf)
    return buf.getvalue() + data, actions


# NRRD and MetaImage headers are text: besides the geometry they can carry comments, key/value pairs
# (3D Slicer's segment names, ITK's metadata dictionary) and free-text fields (NRRD 'content',
# 'labels', 'units'; MetaImage 'Comment', 'Name', any extra key).  The output keeps the voxels and the
# geometry only: it is rewritten by SimpleITK from the image with its metadata dictionary emptied, and
# the written header is checked against these allow-lists (fail closed: anything else fails the file).
_NRRD_GEOMETRY = {"type", "dimension", "space", "space dimension", "sizes", "space directions", "space origin",
                  "space units", "kinds", "endian", "encoding", "spacings", "centers", "centerings",
                  "measurement frame", "thicknesses", "axis mins", "axismins", "axis maxs", "axismaxs",
                  "byte skip", "byteskip", "line skip", "lineskip", "data file", "datafile", "block size",
                  "blocksize", "old min", "oldmin", "old max", "oldmax"}
_NRRD_FREE_TEXT = ("content", "labels", "units", "sample units", "sampleunits", "number")
_NRRD_ITK_COMMENTS = {"# Complete NRRD file format specification at:", "# http://teem.sourceforge.net/nrrd/format.html"}
_META_GEOMETRY = {"ObjectType", "NDims", "BinaryData", "BinaryDataByteOrderMSB", "ElementByteOrderMSB",
                  "CompressedData", "CompressedDataSize", "TransformMatrix", "Rotation", "Orientation", "Offset",
                  "Position", "Origin", "CenterOfRotation", "AnatomicalOrientation", "ElementSpacing", "DimSize",
                  "HeaderSize", "ElementSize", "ElementNumberOfChannels", "ElementMin", "ElementMax",
                  "ElementType", "ElementDataFile"}
_META_FREE_TEXT = ("Comment", "Name", "AcquisitionDate", "Modality")


def text_header_findings(kind: str, lines: list[str]) -> list[str]:
    """What an NRRD/MetaImage header holds besides geometry, as value-free audit lines."""
    comments = pairs = other = 0
    named: list[str] = []
    for line in lines[1:] if kind == "nrrd" else lines:
        if not line.strip():
            continue
        if kind == "nrrd":
            if line.startswith("#"):
                comments += line not in _NRRD_ITK_COMMENTS
                continue
            if ":=" in line:
                pairs += 1
                continue
            name = line.split(":", 1)[0].strip().lower()
            geometry, free = _NRRD_GEOMETRY, _NRRD_FREE_TEXT
        else:
            name = line.split("=", 1)[0].strip()
            geometry, free = _META_GEOMETRY, _META_FREE_TEXT
            if "=" not in line:  # a LIST of data files after ElementDataFile
                continue
        if name in geometry:
            continue
        if name in free:
            named.append(name)
        else:
            other += 1
    out = [f"{n}: dropped" for n in dict.fromkeys(named)]
    out += [f"comments: {comments} dropped"] if comments else []
    out += [f"key/value pairs: {pairs} dropped"] if pairs else []
    out += [f"other fields: {other} dropped"] if other else []
    return out


def _detached_data_files(files: list[Path]) -> dict[Path, int]:
    """The data files named by the detached NRRD/MetaImage headers among ``files`` -> header index."""
    from medsynth.formats import read_text_header, sniff_itk_format

    out: dict[Path, int] = {}
    for i, f in enumerate(files):
        if sniff_itk_format(f) is None:
            continue
        try:
            header = read_text_header(f)
        except Exception:  # reported when the header itself is processed
            continue
        for d in header.data_files:
            out.setdefault(d.resolve(), i)
    return out


def _process_itk(deid: Deidentifier, path: Path, kind: str, out: Path, rec: dict, written: dict[str, int],
                 root: Path) -> None:
    """An NRRD or MetaImage file: voxels and geometry rewritten into one attached file, text dropped."""
    import SimpleITK as sitk

    from medsynth.formats import ITK_BY_HEADER, quiet_itk, read_itk_image, read_text_header, volume_sha256
    from medsynth.errors import ImageReadError

    fmt = ITK_BY_HEADER[kind]
    rec["kind"] = fmt.name.lower()
    try:
        header = read_text_header(path, kind)
        if any(not _inside(d, root) for d in header.data_files):
            rec.update(status="failed", reason="detached data file outside the input folder")
            return
        img = read_itk_image(path, fmt)
    except ImageReadError:
        rec.update(status="failed", reason=f"damaged {fmt.name} file (header or voxel data unreadable)")
        return
    findings = text_header_findings(kind, header.lines)
    for k in img.GetMetaDataKeys():
        img.EraseMetaData(k)
    suffix = ".nrrd" if kind == "nrrd" else ".mha"
    rel = f"{fmt.name.lower()}/{deid._mac(kind, volume_sha256(path)).hex()[:20]}{suffix}"
    if rel in written:
        rec.update(status="failed", reason=f"same content as input #{written[rel]}")
        return
    with atomic_path(out / rel) as tmp:
        writer = sitk.ImageFileWriter()
        writer.SetImageIO(fmt.image_io)
        writer.SetFileName(str(tmp))
        writer.SetUseCompression(True)
        with quiet_itk():
            writer.Execute(img)
        left = text_header_findings(kind, read_text_header(tmp, kind).lines)
        if left:  # fail closed: the writer must not have put any text back
            raise PrivacyError(f"internal: the {fmt.name} writer left header text ({', '.join(left)})")
    written[rel] = rec["index"]
    rec.update(status="processed", output=rel, actions={fmt.name.lower(): findings})


# --------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------


@dataclass
class AnonymiseReport:
    """Counts and records of one ``anonymise`` run (records are the audit lines, value-free)."""

    processed: int = 0
    quarantined: int = 0
    failed: int = 0
    outputs: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    audit: Path | None = None

    @property
    def total(self) -> int:
        return self.processed + self.quarantined + self.failed


def _inside(a: Path, b: Path) -> bool:
    try:
        a.resolve().relative_to(b.resolve())
        return True
    except ValueError:
        return False


def _truncation_problem(ds) -> str | None:
    """pydicom reads a file cut short without complaint: the last value is just shorter than declared."""
    tags = list(ds.keys())
    if not tags:
        return "empty data set"
    raw = ds.get_item(tags[-1])
    length, value = getattr(raw, "length", None), getattr(raw, "value", None)
    if isinstance(value, (bytes, bytearray)) and length not in (None, 0xFFFFFFFF) and len(value) < length:
        return f"file ends inside an element ({len(value)} of {length} bytes)"
    if "Rows" in ds and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return "image attributes without pixel data (cut short?)"
    return None


def _native_pixel_problem(ds) -> str | None:
    """A truncated native pixel data element means a damaged file."""
    if "PixelData" not in ds:
        return None
    ts = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if ts is not None and getattr(ts, "is_compressed", False):
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return "pixel data without a readable Rows/Columns/Bits Allocated"
    expected = (rows * cols * spp * frames * bits + 7) // 8
    got = len(ds.PixelData)
    return f"pixel data truncated ({got} of {expected} bytes)" if got < expected else None


def anonymise(inp: str | os.PathLike, out: str | os.PathLike, key_file: str | os.PathLike,
              options: Iterable[str] = (), allow_burned_in: bool = False,
              audit: str | os.PathLike | None = None, progress_desc: str = "anonymise") -> AnonymiseReport:
    """De-identify every DICOM and NIfTI file under ``inp`` into ``out`` (the stage behind the verb).

    Bad files are reported and skipped; quarantined files are not written.  The audit log goes to
    ``audit`` (default ``out/deid_audit.jsonl``).  Raises PrivacyError/ConfigError for unusable
    arguments (missing input, output inside input, key problems), before any file is read.
    """
    from medsynth import __version__
    from medsynth.progress import progress

    inp, out = Path(inp), Path(out)
    if not inp.exists():
        raise PrivacyError(f"input not found: {inp}", hint="pass a DICOM folder, a NIfTI file, or a folder of them")
    if _inside(out, inp) or (inp.is_dir() and _inside(inp, out)):
        raise ConfigError(f"output {out} and input {inp} overlap",
                          hint="write to a folder outside the input (inputs are never modified)")
    if _inside(Path(key_file), out) or (inp.is_dir() and _inside(Path(key_file), inp)):
        raise PrivacyError(f"key file {key_file} lies inside the input or output folder",
                           hint="keep the key outside the data: anyone holding it can link pseudonyms")
    audit_path = Path(audit) if audit is not None else out / "deid_audit.jsonl"
    if inp.is_dir() and _inside(audit_path, inp):
        raise ConfigError(f"audit file {audit_path} lies inside the input folder", hint="write it elsewhere")
    deid = Deidentifier(load_key(key_file), options, allow_burned_in)
    out.mkdir(parents=True, exist_ok=True)

    files = iter_files(inp)
    report = AnonymiseReport(audit=audit_path)
    written: dict[str, int] = {}
    data_of = _detached_data_files(files)  # a detached NRRD/MetaImage header's data file -> header index
    root = inp if inp.is_dir() else inp.parent
    with quiet_pydicom():
        for index, path in enumerate(progress(files, desc=progress_desc, total=len(files))):
            rec: dict[str, Any] = {"index": index, "sha256": None, "kind": None, "status": None}
            try:
                rec["sha256"] = sha256_file(path)
                if path.resolve() in data_of:
                    rec.update(kind="image data", header=data_of[path.resolve()])  # settled with its header
                else:
                    _process_one(deid, path, out, rec, written, root)
            except Exception as exc:  # one bad file never sinks the batch
                rec["status"] = "failed"
                rec.setdefault("reason", f"could not be processed ({type(exc).__name__})")
                rec.pop("output", None)
                log.debug("file #%d failed", index, exc_info=True)
            report.records.append(rec)
    for rec in report.records:
        if rec["kind"] == "image data" and rec["status"] is None:
            head = report.records[rec["header"]]
            if head["status"] == "processed":
                rec.update(status="processed", output=head["output"],
                           actions={"image data": f"written inside the output of input #{rec['header']}"})
            else:
                rec.update(status="failed", reason=f"data file of input #{rec['header']}, which was not written")
        if rec["status"] == "processed":
            report.processed += 1
            report.outputs.append(rec["output"])
        elif rec["status"] == "quarantined":
            report.quarantined += 1
        else:
            report.failed += 1
        if rec["status"] != "processed":
            log.warning("file #%d (sha256 %s): %s: %s", rec["index"], (rec["sha256"] or "?")[:12], rec["status"],
                        rec.get("reason", ""))

    header = {"medsynth": __version__, "profile": deid.profile.edition + " Table E.1-1",
              "options": list(deid.options), "allow_burned_in": allow_burned_in, "key_id": deid.key_id,
              "input_files": len(files), "processed": report.processed, "quarantined": report.quarantined,
              "failed": report.failed}
    with atomic_path(audit_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"run": header}) + "\n")
        for rec in report.records:
            f.write(json.dumps(rec) + "\n")
    log.info("anonymise: %d processed, %d quarantined, %d failed (of %d files); audit %s",
             report.processed, report.quarantined, report.failed, len(files), audit_path)
    return report


def _process_one(deid: Deidentifier, path: Path, out: Path, rec: dict, written: dict[str, int],
                 root: Path) -> None:
    kind = sniff_itk_format(path)
    if kind is not None:
        _process_itk(deid, path, kind, out, rec, written, root)
        return
    if sniff_nifti(path):
        rec["kind"] = "nifti"
        raw, gz = _read_maybe_gzip(path)
        data, actions = deidentify_nifti_bytes(raw)
        name = deid._mac("nifti", rec["sha256"]).hex()[:20]
        rel = f"nifti/{name}.nii" + (".gz" if gz else "")
        if rel in written:
            rec.update(status="failed", reason=f"same content as input #{written[rel]}")
            return
        with atomic_path(out / rel) as tmp:
            if gz:
                with open(tmp, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g:
                    g.write(data)
            else:
                tmp.write_bytes(data)
        written[rel] = rec["index"]
        rec.update(status="processed", output=rel, actions={"nifti": actions})
        return

    try:
        ds = read_dicom(path)
    except Exception as exc:
        rec.update(kind="dicom", status="failed", reason=f"damaged DICOM file ({type(exc).__name__})")
        return
    if ds is None:
        rec.update(kind="other", status="failed", reason="not a DICOM, NIfTI, NRRD or MetaImage file")
        return
    rec["kind"] = "dicom"
    meta_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "")) if getattr(ds, "file_meta", None) else ""
    if meta_class == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        rec.update(status="failed", reason="DICOMDIR index (holds patient names); rebuild one from the output")
        return
    if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
        rec.update(status="failed", reason="no SOP Class/Instance UID: not a composite DICOM instance")
        return
    problem = _truncation_problem(ds) or _native_pixel_problem(ds)
    if problem:
        rec.update(status="failed", reason=f"damaged DICOM file: {problem}")
        return
    reason = deid.quarantine_reason(ds)
    if reason:
        rec.update(status="quarantined", reason=reason)
        return
    # Names come from the keyed UIDs even under retain-uids: never from input names or values.
    names = [deid.pseudonym(deid.patient_key(ds))]
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        names.append(deid.keyed_uid(str(ds.get(kw, "") or "none")))
    rel = "/".join(names) + ".dcm"
    if rel in written:
        rec.update(status="failed", reason=f"duplicate SOP Instance UID (same as input #{written[rel]})")
        return
    actions = deid.deidentify_dataset(ds)
    with atomic_path(out / rel) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    written[rel] = rec["index"]
    rec.update(status="processed", output=rel, actions=actions)
