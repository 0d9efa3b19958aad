"""Volume file formats medsynth reads: names, NRRD/MetaImage text headers, hashes, reading through
SimpleITK, and :func:`read_image`, the one entry point that reads a case's image whatever its format.

* NIfTI (``.nii``, ``.nii.gz``) is read with nibabel (:meth:`medsynth.volume.Volume.load_nifti`).
* NRRD (``.nrrd``, or a detached ``.nhdr`` header with its data file) and MetaImage (``.mha``, or a
  detached ``.mhd`` header with its data file) are read with SimpleITK, whose LPS geometry is
  converted to the RAS affine once (:meth:`medsynth.volume.Volume.from_sitk`).

:data:`ITK_FORMATS` is the table of SimpleITK formats medsynth reads: adding a format is one row
there plus, for ``anonymise``, the rule that clears its free-text header (``privacy/deid.py``).
This module imports neither MONAI nor pydicom, so de-identification can use it cheaply.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from medsynth.errors import ImageReadError
from medsynth.volume import Volume, sniff_nifti

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class ItkFormat:
    """A file format read through SimpleITK: its name, the ImageIO that reads it, its header kind."""

    name: str
    image_io: str
    header: str  # "nrrd" or "meta": how :func:`read_text_header` parses it


_NRRD = ItkFormat("NRRD", "NrrdImageIO", "nrrd")
_META = ItkFormat("MetaImage", "MetaImageIO", "meta")
# .nhdr / .mhd are detached headers (voxels in separate data files); .nrrd / .mha usually attached
ITK_FORMATS: dict[str, ItkFormat] = {".nrrd": _NRRD, ".nhdr": _NRRD, ".mha": _META, ".mhd": _META}
ITK_BY_HEADER = {"nrrd": _NRRD, "meta": _META}
VOLUME_SUFFIXES = NIFTI_SUFFIXES + tuple(ITK_FORMATS)
_UNITS = {"CT": "HU", "MR": "a.u.", "SEG": "label"}
_HEADER_LIMIT = 1 << 20  # a text header longer than 1 MiB is not one
_MAX_DATA_FILES = 100_000


def is_nifti(path: str | Path) -> bool:
    """True for a NIfTI file *name* (``.nii``, ``.nii.gz``): for listing candidate files.  Whether a
    file *is* NIfTI is :func:`medsynth.volume.sniff_nifti` (by content)."""
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def itk_format(path: str | Path) -> Optional[ItkFormat]:
    """The SimpleITK format a file name says (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``), or None."""
    return ITK_FORMATS.get(Path(path).suffix.lower())


def is_volume_file(path: str | Path) -> bool:
    """True for a file name medsynth reads as one volume (NIfTI, NRRD, MetaImage)."""
    return is_nifti(path) or itk_format(path) is not None


def volume_stem(name: str) -> str:
    """A volume file name without its format suffix (``a.nii.gz`` -> ``a``, ``b.nrrd`` -> ``b``)."""
    low = name.lower()
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------------------------
# NRRD / MetaImage headers (text): what sniffing, hashing and de-identification need
# --------------------------------------------------------------------------------------------


def sniff_itk_format(path: str | Path) -> Optional[str]:
    """``"nrrd"`` or ``"meta"`` from a file's content (whatever its name says), else None.

    NRRD files start with the magic ``NRRD000``; MetaImage headers are ``Key = Value`` lines that
    name ``NDims`` and end with ``ElementDataFile``.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"NRRD000"):
        return "nrrd"
    text = head.decode("latin-1")
    first = text.split("\n", 1)[0].strip()
    if re.match(r"^[A-Za-z][A-Za-z0-9_]*\s*=", first) and re.search(r"(?m)^\s*NDims\s*=", text) \
            and re.search(r"(?m)^\s*ElementDataFile\s*=", text):
        return "meta"
    return None


@dataclass(frozen=True)
class TextHeader:
    """The text header of an NRRD or MetaImage file: its lines and where the voxel bytes begin.

    ``data_offset`` is the byte offset of attached voxel data (None for a detached header);
    ``data_files`` the detached data files, resolved against the header's folder.
    """

    kind: str  # "nrrd" or "meta"
    lines: list[str]
    data_offset: Optional[int]
    data_files: list[Path]


def read_text_header(path: str | Path, kind: Optional[str] = None) -> TextHeader:
    """Parse the header of an NRRD (``.nrrd``/``.nhdr``) or MetaImage (``.mha``/``.mhd``) file.

    Raises :class:`ImageReadError` naming the file when the header is not one of these formats or
    names its data files in a form medsynth cannot follow.
    """
    path = Path(path)
    kind = kind or sniff_itk_format(path)
    if kind is None:
        raise ImageReadError(f"{path}: not an NRRD or MetaImage file (no NRRD magic or MetaImage header)",
                             hint="check the file is complete and really NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd)")
    with open(path, "rb") as f:
        raw = f.read(_HEADER_LIMIT)
    lines: list[str] = []
    pos = 0
    offset: Optional[int] = None
    data_field: Optional[str] = None
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        if end < 0:
            end = len(raw)
        line = raw[pos:end].decode("latin-1").rstrip("\r")
        nxt = end + 1
        if kind == "nrrd":
            if line == "" and lines:  # the blank line ends an NRRD header
                offset = nxt
                break
            m = re.match(r"^(data ?file)\s*:(?!=)\s*(.*)$", line, flags=re.IGNORECASE)
            if m and data_field is None:
                data_field = m.group(2).strip()
        else:
            m = re.match(r"^\s*ElementDataFile\s*=\s*(.*)$", line)
            if m:
                lines.append(line)
                data_field = m.group(1).strip()
                offset = nxt
                pos = nxt
                if data_field.split()[:1] == ["LIST"]:  # file names follow, one a line
                    rest = raw[pos:].decode("latin-1").splitlines()
                    lines += [ln for ln in rest if ln.strip()]
                    offset = None
                break
        lines.append(line)
        pos = nxt
    if kind == "meta" and data_field is None:
        raise ImageReadError(f"{path}: MetaImage header without ElementDataFile",
                             hint="check the file is complete (the header must end with 'ElementDataFile = ...')")
    if kind == "nrrd" and not (lines and lines[0].startswith("NRRD000")):
        raise ImageReadError(f"{path}: not an NRRD file (no NRRD magic)")
    files: list[Path] = []
    if data_field is not None and not (kind == "meta" and data_field == "LOCAL"):
        files = _data_files(path, kind, data_field, lines)
        offset = None
    elif kind == "nrrd" and offset is None:
        offset = len(raw)  # a header with no blank line and no data: nothing attached
    return TextHeader(kind, lines, offset, files)


def _data_files(path: Path, kind: str, field: str, lines: list[str]) -> list[Path]:
    """The data files a detached header names: one file, a LIST of files, or a numbered pattern."""
    folder = path.parent
    words = field.split()
    if not words:
        raise ImageReadError(f"{path}: empty data file field", hint="name the voxel data file in the header")
    if words[0] == "LIST":
        if kind == "nrrd":
            start = next(i for i, ln in enumerate(lines) if re.match(r"^data ?file\s*:", ln, re.IGNORECASE)) + 1
        else:
            start = next(i for i, ln in enumerate(lines) if re.match(r"^\s*ElementDataFile\s*=", ln)) + 1
        names = [ln.strip() for ln in lines[start:] if ln.strip()]
    elif len(words) >= 4 and "%" in words[0]:
        try:
            lo, hi, step = int(words[1]), int(words[2]), int(words[3])
            if step == 0 or abs(hi - lo) // abs(step) > _MAX_DATA_FILES:
                raise ValueError
            names = [words[0] % i for i in range(lo, hi + (1 if step > 0 else -1), step)]
        except (ValueError, TypeError):
            raise ImageReadError(f"{path}: the data file pattern is not 'format min max step'",
                                 hint="list the data files explicitly (LIST) or merge them into one file") from None
    else:
        names = [field]
    return [(folder / n) for n in names]


def volume_sha256(path: str | Path) -> str:
    """Content hash of a volume file.

    A NIfTI, NRRD or MetaImage file with its voxels attached: sha256 of the file's bytes (as
    ``sha256sum`` prints it).  A detached header (``.nhdr``, ``.mhd``): sha256 of the concatenated
    sha256 digests of the header and of each data file in header order, so editing either changes it.
    """
    from medsynth.jobs import sha256_file

    path = Path(path)
    if itk_format(path) is None:
        return sha256_file(path)
    header = read_text_header(path)
    if not header.data_files:
        return sha256_file(path)
    h = hashlib.sha256(bytes.fromhex(sha256_file(path)))
    for f in header.data_files:
        if not f.is_file():
            raise ImageReadError(f"{path}: data file {f.name} not found",
                                 hint="keep the detached header's data file beside it")
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """Silence ITK's warnings while reading: they can quote header text."""
    import SimpleITK as sitk

    old = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(old)


def read_itk_image(path: str | Path, fmt: Optional[ItkFormat] = None):
    """Read an NRRD or MetaImage file into a SimpleITK image (any dimension, metadata included).

    The format comes from the content (an NRRD named ``.mha`` is read as NRRD) unless ``fmt``
    forces it.  Raises
    :class:`ImageReadError` naming the file (never quoting its header) on any failure.
    """
    import SimpleITK as sitk

    path = Path(path)
    header = read_text_header(path, fmt.header if fmt is not None else None)  # by content, not by name
    fmt = ITK_BY_HEADER[header.kind]
    missing = [f for f in header.data_files if not f.is_file()]
    if missing:
        raise ImageReadError(f"{path}: data file {missing[0].name} not found",
                             hint="keep a detached header's data file(s) beside it")
    reader = sitk.ImageFileReader()
    reader.SetImageIO(fmt.image_io)
    reader.SetFileName(str(path))
    try:
        with quiet_itk():
            return reader.Execute()
    except RuntimeError:
        raise ImageReadError(f"{path}: not a readable {fmt.name} file (header or voxel data damaged or cut short)",
                             hint="check the file (and a detached header's data file) is complete") from None


def read_itk_volume(path: str | Path, modality: str = "CT") -> Volume:
    """Read a 3D NRRD or MetaImage file as a RAS :class:`Volume` (trailing singleton axes dropped)."""
    path = Path(path)
    img = read_itk_image(path)
    while img.GetDimension() > 3 and img.GetSize()[-1] == 1:
        img = img[(slice(None),) * (img.GetDimension() - 1) + (0,)]
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{path}: expected a 3D image of one value per voxel, got "
                             f"{img.GetNumberOfComponentsPerPixel()} values per voxel (a vector or colour image)")
    if img.GetDimension() != 3:
        raise ImageReadError(f"{path}: expected a 3D image, got a {img.GetDimension()}D image of size "
                             f"{list(img.GetSize())}")
    if "complex" in img.GetPixelIDTypeAsString():
        raise ImageReadError(f"{path}: complex-valued voxels; expected real intensities",
                             hint="store the magnitude image")
    return Volume.from_sitk(img, modality=modality, units=_UNITS.get(modality, "a.u."), source=fmt_name(path))


def read_image(path: str | Path, modality: Optional[str] = None, **case_extra: Any) -> Volume:
    """Read a volume file (NIfTI, NRRD, MetaImage) or a DICOM series folder into a :class:`Volume`
    (RAS affine, physical units).

    ``case_extra`` carries manifest keys that select one series inside a folder (see
    ``data_manifests/README.md``).  Raises :class:`ImageReadError` naming the path on any failure.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: not found", hint="fix the path in the manifest (paths are relative to it)")
    if path.is_dir():
        from medsynth.dicom_series import read_series

        # reading stays permissive about modality: the manifest verifier reports mismatches
        return read_series(path, **case_extra)
    if is_nifti(path) or sniff_nifti(path):  # by name or by content; the loader checks the content
        return Volume.load_nifti(path, modality=modality or "CT")
    if itk_format(path) is not None:
        return read_itk_volume(path, modality=modality or "CT")
    raise ImageReadError(f"{path}: unsupported image type",
                         hint="use a NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd) file, "
                              "or a folder holding one DICOM series")


def fmt_name(path: str | Path) -> str:
    """The format of a volume file as a word: ``nifti``, ``nrrd``, ``metaimage`` or ``dicom``."""
    p = Path(path)
    if p.is_dir():
        return "dicom"
    if is_nifti(p):
        return "nifti"
    fmt = itk_format(p)
    return fmt.name.lower() if fmt else "unknown"
