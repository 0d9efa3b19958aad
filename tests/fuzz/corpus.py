"""Seeded mutation corpus for fuzzing medsynth's readers: hostile copies of real DICOM and NIfTI files.

A mutation is drawn from one ``random.Random`` and applied to the bytes of a seed file:

* ``flip``        a few bits flipped at random offsets;
* ``cut``         a few byte ranges deleted (shifts every later element);
* ``repeat``      a few byte ranges duplicated in place;
* ``truncate``    the file cut short (a partial element, a partial pixel frame);
* ``bad_length``  the length field of a parsed DICOM element replaced by an odd, huge, undefined
                  (0xFFFFFFFF) or off-by-a-few value;
* ``delimiter``   an item / item-delimitation / sequence-delimitation tag (FFFE,E000/E00D/E0DD)
                  written over, or inserted before, an element header;
* ``vr``          the two VR letters of an explicit-VR element replaced by garbage or another VR.

The element offsets the last three need come from a tolerant walk of the seed's top-level
elements (:func:`element_offsets`), so the mutations land on real structure rather than in pixel
data.  Everything is deterministic in (seed files, count, seed).
"""

from __future__ import annotations

import gzip
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: pydicom's bundled test files used as seeds: small, and between them explicit and implicit VR,
#: big endian, no preamble, RLE and deflate transfer syntaxes, private and nested sequences,
#: UN-encoded sequences, an enhanced multi-frame CT, RT and SR objects, and overlays.
PYDICOM_SEEDS = ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                 "MR_small_RLE.dcm", "ExplVR_LitEndNoMeta.dcm", "image_dfl.dcm", "nested_priv_SQ.dcm", "priv_SQ.dcm",
                 "UN_sequence.dcm", "liver_1frame.dcm", "rtplan.dcm", "test-SR.dcm", "examples_overlay.dcm",
                 "badVR.dcm", "empty_charset_LEI.dcm")

OPS = ("flip", "cut", "repeat", "truncate", "bad_length", "delimiter", "vr")
_EXPLICIT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD",
                 b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
                 b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"UV", b"SV"}
_DELIMITERS = (b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0")


def pydicom_seed_files(names: Sequence[str] = PYDICOM_SEEDS) -> list[Path]:
    """Paths of the named files in pydicom's bundled test data (never downloads anything)."""
    import pydicom.data

    root = Path(pydicom.data.DATA_ROOT) / "test_files"
    return [root / n for n in names if (root / n).is_file()]


@dataclass(frozen=True)
class Element:
    """Where one element header sits in a file: offset, header length, and where its length field is."""

    offset: int
    header: int
    length_at: int
    length_size: int
    vr_at: int | None


def element_offsets(data: bytes) -> list[Element]:
    """A tolerant walk of the top-level little-endian elements of a DICOM byte string.

    Explicit VR is recognised per element (two known VR letters after the tag); anything else is
    read as implicit VR.  The walk steps into sequences of undefined length (so item headers are
    found too) and stops at the first element that does not fit the file.
    """
    start = 132 if len(data) >= 132 and data[128:132] == b"DICM" else 0
    out: list[Element] = []
    pos = start
    while pos + 8 <= len(data) and len(out) < 4096:
        group, _ = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6]
        if group == 0xFFFE:  # item / delimiter: 4-byte tag + 4-byte length
            out.append(Element(pos, 8, pos + 4, 4, None))
            pos += 8  # into the item: its elements follow
            continue
        if vr in _EXPLICIT_VRS:
            if vr in _LONG_VRS:
                if pos + 12 > len(data):
                    break
                length = struct.unpack_from("<I", data, pos + 8)[0]
                el = Element(pos, 12, pos + 8, 4, pos + 4)
            else:
                length = struct.unpack_from("<H", data, pos + 6)[0]
                el = Element(pos, 8, pos + 6, 2, pos + 4)
        else:
            length = struct.unpack_from("<I", data, pos + 4)[0]
            el = Element(pos, 8, pos + 4, 4, None)
        out.append(el)
        if length == 0xFFFFFFFF:  # undefined length: the items follow directly
            pos += el.header
            continue
        if pos + el.header + length > len(data):
            break
        pos += el.header + length
    return out


def _spans(data: bytearray, rng: random.Random, k: int) -> list[tuple[int, int]]:
    return [(p, p + rng.randint(1, 64)) for p in sorted(rng.randrange(len(data)) for _ in range(k))]


def mutate(data: bytes, rng: random.Random, op: str | None = None) -> tuple[bytes, str]:
    """One mutation of ``data`` (``op`` drawn from :data:`OPS` if not given); returns (bytes, op)."""
    op = op or rng.choice(OPS)
    b = bytearray(data)
    if not b:
        return bytes(b), op
    k = rng.randint(1, 4)
    if op == "flip":
        for _ in range(k):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == "cut":
        for s, e in reversed(_spans(b, rng, k)):
            del b[s:e]
    elif op == "repeat":
        for s, e in reversed(_spans(b, rng, k)):
            b[s:s] = b[s:e] * rng.randint(1, 3)
    elif op == "truncate":
        del b[rng.randrange(1, len(b)):]
    else:
        elems = element_offsets(data)
        if not elems:
            return mutate(data, rng, "flip")
        for _ in range(k):
            el = rng.choice(elems)
            if op == "bad_length":
                size = el.length_size
                top = (1 << (8 * size)) - 1
                old = int.from_bytes(b[el.length_at:el.length_at + size], "little")
                new = rng.choice((top, top - 1, old + 1, max(old - 1, 0), old + rng.randint(2, 400), 1, 3,
                                  len(b), rng.randrange(top)))
                b[el.length_at:el.length_at + size] = (new & top).to_bytes(size, "little")
            elif op == "delimiter":
                delim = rng.choice(_DELIMITERS) + rng.choice((b"\x00\x00\x00\x00", b"\xff\xff\xff\xff"))
                if rng.random() < 0.5:
                    b[el.offset:el.offset + 8] = delim
                else:
                    b[el.offset:el.offset] = delim
            else:  # vr
                if el.vr_at is None:
                    continue
                b[el.vr_at:el.vr_at + 2] = rng.choice((bytes([rng.randrange(256), rng.randrange(256)]),
                                                       rng.choice(sorted(_EXPLICIT_VRS)), b"\x00\x00", b"XX"))
    return bytes(b), op


def mutate_gzip_member(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Mutate the uncompressed payload of a ``.nii.gz`` (so the NIfTI header is hit, not just the
    deflate stream) or, one time in three, the compressed bytes themselves."""
    if rng.random() < 1 / 3:
        out, op = mutate(data, rng, rng.choice(("flip", "cut", "repeat", "truncate")))
        return out, f"gz-{op}"
    raw = gzip.decompress(data)
    head, rest = raw[:352], raw[352:]  # the NIfTI-1 header and extension area get the mutations
    new_head, op = mutate(head, rng, rng.choice(("flip", "cut", "repeat", "truncate")))
    return gzip.compress(new_head + rest, mtime=0), f"nifti-{op}"


def write_corpus(seeds: Sequence[Path], out_dir: Path, n: int, seed: int,
                 mutator: Callable[[bytes, random.Random], tuple[bytes, str]] = mutate,
                 suffix: str | None = None) -> list[tuple[Path, Path, str]]:
    """Write ``n`` mutants of ``seeds`` into ``out_dir``; returns (mutant, seed file, op) per file.

    Names are ``f<index>_<op>_<seed stem>`` plus the seed's suffix (or ``suffix``).
    """
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = {p: p.read_bytes() for p in seeds}
    made = []
    for i in range(n):
        src = seeds[rng.randrange(len(seeds))]
        data, op = mutator(cache[src], rng)
        stem = src.name.split(".")[0]
        ext = suffix if suffix is not None else "".join(src.suffixes)
        path = out_dir / f"f{i:03d}_{op}_{stem}{ext}"
        path.write_bytes(data)
        made.append((path, src, op))
    return made
