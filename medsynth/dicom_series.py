"""Find DICOM series in a folder tree and read one series as a :class:`~medsynth.volume.Volume`.

DICOM files are recognised by content, never by name: a file is DICOM if it carries the ``DICM``
marker after the 128-byte preamble, or (old preamble-less files) starts with a group 0002/0008
tag and pydicom can parse it.  Files are grouped into series by SeriesInstanceUID, and slices are
ordered by the position of ImagePositionPatient along the slice normal (the cross product of the
ImageOrientationPatient row and column cosines) — never by file name or InstanceNumber.

A series is accepted only if it is one regular 3D grid: the same rows/columns/pixel spacing and
orientation in every slice, at least two slices, no two slices at the same position, slice gaps
uniform within :data:`GAP_REL_TOL` (a missing slice is named as such), and slice origins stacked
along the normal (a gantry-tilted, sheared stack is refused).  Enhanced (multi-frame) CT/MR files
are read too: each frame's position and orientation come from the functional groups.

Geometry is built in DICOM's LPS world and converted to medsynth's RAS affine by
:meth:`Volume.from_sitk`, the one place that conversion lives.  CT values are Hounsfield units
(RescaleSlope/RescaleIntercept or the Modality LUT applied).  Nothing identifying from the headers
(names, IDs, dates, UIDs, institution) leaves this module: UIDs are used in memory to group files
and never appear in results, logs or messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

import medsynth.notices  # noqa: F401  (MONAI's reader notices go to DEBUG, not the terminal)
from medsynth.errors import ImageReadError
from medsynth.volume import Volume

log = logging.getLogger("medsynth.dicom_series")

#: Modalities medsynth reads as images.
IMAGE_MODALITIES = ("CT", "MR")
#: Relative tolerance on slice gaps (fraction of the median gap), plus :data:`GAP_ABS_TOL` mm.
GAP_REL_TOL = 0.01
GAP_ABS_TOL = 0.01
#: Two direction cosines are "the same" if no component differs by more than this.
COS_TOL = 1e-3
#: Two slices closer than this (mm) along the normal are at the same position.
DUPLICATE_TOL = 1e-3

_NOT_DICOM_SUFFIXES = (".nii", ".nii.gz", ".json", ".csv", ".txt", ".md", ".yaml", ".yml", ".png", ".jpg")
_FIX_IRREGULAR = ("convert the series with a tool that resamples irregular stacks (e.g. dcm2niix) and list "
                  "the NIfTI file instead, or remove the series from the source folder")


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass
class DicomProblem:
    """Something found while scanning that did not become a series.

    ``kind`` is ``"corrupt"`` (looks like DICOM but cannot be parsed), ``"rejected"`` (an image
    series that is not one regular CT/MR 3D grid) or ``"skipped"`` (valid DICOM that is not an image:
    structured report, presentation state, DICOMDIR, segmentation, ...).  ``path`` is a file or, for
    a rejected series, the folder holding it.
    """

    path: Path
    kind: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        s = f"{self.path}: {self.kind}: {self.message}"
        return f"{s} (fix: {self.fix})" if self.fix else s


@dataclass
class SeriesInfo:
    """One readable DICOM series found by :func:`scan_dicom` (no UID or patient value kept).

    ``files`` are in slice order (a multi-frame file appears once); ``folder`` is the deepest
    folder holding all of them; ``exclusive`` is True when the files lie directly in ``folder`` and
    nothing else there would be read as DICOM, so the folder alone names the series.
    """

    files: list[Path]
    folder: Path
    modality: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    exclusive: bool = True
    n_frames: int = 0

    def relative_files(self) -> list[str]:
        """File paths relative to :attr:`folder` (POSIX separators), in slice order."""
        return [f.relative_to(self.folder).as_posix() for f in self.files]


@dataclass
class _Frame:
    """One 2D image: a single-frame file or one frame of an enhanced multi-frame file."""

    path: Path
    frame: Optional[int]
    rows: int
    cols: int
    pixel_spacing: Optional[tuple[float, float]]
    iop: Optional[np.ndarray]
    ipp: Optional[np.ndarray]
    slope: float = 1.0
    intercept: float = 0.0


@dataclass
class _Geometry:
    frames: list[_Frame]          # in slice order
    direction: np.ndarray         # 3x3 LPS, columns = i (row cosine), j (column cosine), k (normal)
    spacing: tuple[float, float, float]
    origin: np.ndarray            # LPS position of voxel (0, 0, 0)


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom while reading patient files: its warnings and log lines quote element values,
    which may be PHI.  Validation is off (``reading_validation_mode`` IGNORE), the ``pydicom`` logger
    disabled and warnings ignored inside the block; all three are restored after it.  The one
    silencer: every module that reads hospital DICOM uses it."""
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


class _NotAnImage(Exception):
    """Valid DICOM that holds no image medsynth reads (kind 'skipped')."""


class _Rejected(Exception):
    """An image that cannot be part of a regular CT/MR volume (kind 'rejected')."""


# --------------------------------------------------------------------------------------------
# recognising and parsing files
# --------------------------------------------------------------------------------------------


#: What :func:`sniff_dicom` says about a file's first bytes.
DICOM_MARKER, DICOM_BARE, DICOM_MAYBE = "marker", "bare", "maybe"


def sniff_dicom(path: str | os.PathLike) -> Optional[str]:
    """What a file's first bytes say about it being DICOM (names and extensions are ignored):

    * ``"marker"``: the ``DICM`` marker after the 128-byte preamble (a DICOM file);
    * ``"bare"``: no preamble, but it starts with a little-endian (0002,xxxx) or (0008,xxxx) element,
      as old ACR-NEMA style files do (it claims to be DICOM);
    * ``"maybe"``: it starts with some other even (standard) group: DICOM only if it parses into a
      composite instance (SOP Class and Instance UIDs), which the PHI scanner checks;
    * None: not DICOM.

    The one owner of these byte patterns (:func:`is_dicom_file`, ``privacy.phi_scan.read_dicom``).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return DICOM_MARKER
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3] == 0:
        return DICOM_BARE
    # implicit/explicit VR little endian data sets start with an even group, usually 0x0008
    if len(head) >= 8 and head[1] == 0x00 and head[0] % 2 == 0:
        return DICOM_MAYBE
    return None


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Cheap content test: the ``DICM`` marker at byte 128, or a leading group 0002/0008 tag.

    A True answer means "try to parse it as DICOM"; a file that then fails to parse is reported as
    corrupt.  Names and extensions are ignored (DICOM files often have none).
    """
    return sniff_dicom(path) in (DICOM_MARKER, DICOM_BARE)


def _parse(path: Path, data: Optional[bytes] = None, pixels: bool = False):
    """pydicom dataset of ``path`` (from ``data`` if given); raises ImageReadError if corrupt."""
    import pydicom

    src: Any = io.BytesIO(data) if data is not None else str(path)
    try:
        ds = pydicom.dcmread(src, force=True, stop_before_pixels=not pixels)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise ImageReadError(f"{path}: not a readable DICOM file ({type(exc).__name__})",
                             hint="check the file is complete (not truncated); remove it if it is not needed") from None
    if len(ds) == 0 or not any(tag.group >= 0x0008 for tag in ds.keys()):
        raise ImageReadError(f"{path}: not a readable DICOM file (no data elements)",
                             hint="check the file is complete (not truncated); remove it if it is not needed")
    return ds


def _floats(value: Any, n: int) -> Optional[np.ndarray]:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _sop_name(ds) -> str:
    uid = ds.get("SOPClassUID")
    name = getattr(uid, "name", "") if uid is not None else ""
    # A standard SOP class has a name; a private or unknown one would print the UID itself, which
    # is not patient data, but we keep messages UID-free anyway.
    return name if name and not name[0].isdigit() else "unknown SOP class"


def _frames(ds, path: Path) -> list[_Frame]:
    """The 2D images in ``ds`` with their geometry; raises _NotAnImage / _Rejected."""
    if "Rows" not in ds or "Columns" not in ds:
        raise _NotAnImage(f"not an image ({_sop_name(ds)})")
    modality = str(ds.get("Modality", "")).upper()
    if modality == "SEG":
        raise _NotAnImage("a segmentation object (Modality SEG), not an image")
    if modality not in IMAGE_MODALITIES:
        raise _Rejected(f"modality {modality or 'missing'} is not supported (CT and MR only)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise _Rejected(f"colour image ({ds.get('PhotometricInterpretation', '?')}); CT/MR must be greyscale")
    rows, cols = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds, path, rows, cols, n_frames)
    if n_frames > 1:
        raise _Rejected(f"multi-frame image with {n_frames} frames but no per-frame functional groups "
                        "(only enhanced CT/MR multi-frame files are supported)")
    ps = _floats(ds.get("PixelSpacing", []), 2)
    return [_Frame(path, None, rows, cols,
                   tuple(ps) if ps is not None and np.all(ps > 0) else None,  # type: ignore[arg-type]
                   _floats(ds.get("ImageOrientationPatient", []), 6),
                   _floats(ds.get("ImagePositionPatient", []), 3),
                   float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))]


def _enhanced_frames(ds, path: Path, rows: int, cols: int, n_frames: int) -> list[_Frame]:
    """Frames of an enhanced multi-frame file: per-frame groups override the shared ones."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    per = ds.PerFrameFunctionalGroupsSequence
    if len(per) != n_frames:
        raise _Rejected(f"multi-frame file lists {len(per)} frame groups for {n_frames} frames")

    def pick(item, seq: str, attr: str):
        for src in (item, shared):
            items = src.get(seq) if src is not None else None
            if items and attr in items[0]:
                return items[0].get(attr)
        return None

    out = []
    for f, item in enumerate(per):
        ps = _floats(pick(item, "PixelMeasuresSequence", "PixelSpacing") or [], 2)
        slope = pick(item, "PixelValueTransformationSequence", "RescaleSlope")
        icpt = pick(item, "PixelValueTransformationSequence", "RescaleIntercept")
        out.append(_Frame(path, f, rows, cols,
                          tuple(ps) if ps is not None and np.all(ps > 0) else None,  # type: ignore[arg-type]
                          _floats(pick(item, "PlaneOrientationSequence", "ImageOrientationPatient") or [], 6),
                          _floats(pick(item, "PlanePositionSequence", "ImagePositionPatient") or [], 3),
                          float(slope) if slope is not None else 1.0, float(icpt) if icpt is not None else 0.0))
    return out


# --------------------------------------------------------------------------------------------
# geometry: one regular grid or a clear reason why not
# --------------------------------------------------------------------------------------------


def _geometry(frames: list[_Frame]) -> _Geometry:
    """Sort ``frames`` along the slice normal and check they form one regular grid (raises _Rejected)."""
    for fr in frames:
        where = fr.path.name if fr.frame is None else f"{fr.path.name} frame {fr.frame + 1}"
        missing = [n for n, v in (("ImagePositionPatient", fr.ipp), ("ImageOrientationPatient", fr.iop),
                                  ("PixelSpacing", fr.pixel_spacing)) if v is None]
        if missing:
            raise _Rejected(f"{where} has no valid {' / '.join(missing)} (not a cross-sectional image?)")
    sizes = sorted({(fr.rows, fr.cols) for fr in frames})
    if len(sizes) > 1:
        raise _Rejected("mixed image sizes " + ", ".join(f"{r}x{c}" for r, c in sizes) + " (rows x columns)")
    ps = np.array([fr.pixel_spacing for fr in frames])
    if np.any(np.abs(ps - ps[0]) > 1e-3 * ps[0]):
        raise _Rejected(f"mixed pixel spacing ({ps.min():.4g} to {ps.max():.4g} mm)")
    iop0: np.ndarray = frames[0].iop  # type: ignore[assignment]  (checked above)
    row, col = iop0[:3], iop0[3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2
            or abs(float(row @ col)) > 1e-2):
        raise _Rejected("ImageOrientationPatient is not two orthogonal unit vectors")
    iops = np.array([fr.iop for fr in frames])
    if np.any(np.abs(iops - iop0) > COS_TOL):
        raise _Rejected("orientation varies between slices (e.g. a localizer or a reformat mixed into the series)")
    if len(frames) < 2:
        raise _Rejected("a single slice is not a 3D volume")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)

    ipps = np.array([fr.ipp for fr in frames])
    pos = ipps @ normal
    order = np.argsort(pos, kind="stable")
    pos, ipps = pos[order], ipps[order]
    frames = [frames[i] for i in order]
    gaps = np.diff(pos)
    n_dup = int(np.sum(gaps < DUPLICATE_TOL))
    if n_dup:
        raise _Rejected(f"{n_dup} pair(s) of slices share a position "
                        "(several echoes, phases or time points in one series?)")
    med = float(np.median(gaps))
    tol = GAP_REL_TOL * med + GAP_ABS_TOL
    bad = np.flatnonzero(np.abs(gaps - med) > tol)
    if bad.size:
        ratio = gaps[bad] / med
        if np.all(np.abs(ratio - np.rint(ratio)) * med <= tol) and np.all(np.rint(ratio) >= 2):
            missing = int(np.sum(np.rint(ratio) - 1))
            k = int(bad[0])
            raise _Rejected(f"missing slice(s): gap of {gaps[k]:.4g} mm after slice {k + 1} of {len(frames)} "
                            f"where slices are {med:.4g} mm apart (about {missing} slice(s) missing)")
        raise _Rejected(f"non-uniform slice spacing: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm "
                        f"(median {med:.4g} mm, tolerance {tol:.2g} mm)")
    # In-plane drift of the slice origins means a sheared stack (gantry tilt), not a rectangular grid.
    inplane = (ipps - ipps[0]) - np.outer(pos - pos[0], normal)
    drift = float(np.max(np.linalg.norm(inplane, axis=1)))
    if drift > GAP_ABS_TOL + 0.01 * float(ps[0].min()):
        angle = float(np.degrees(np.arctan2(np.linalg.norm(inplane[-1]), pos[-1] - pos[0])))
        raise _Rejected(f"slice origins drift {drift:.3g} mm sideways across the stack (gantry tilt of about "
                        f"{angle:.2g} degrees?): the slices are sheared, not a rectangular grid")
    dz = (pos[-1] - pos[0]) / (len(frames) - 1)
    direction = np.stack([row, col, normal], axis=1)
    spacing = (float(ps[0][1]), float(ps[0][0]), float(dz))  # PixelSpacing is (row gap, column gap)
    return _Geometry(frames, direction, spacing, ipps[0].copy())


def _ras_affine(geom: _Geometry) -> np.ndarray:
    """RAS affine of an LPS grid, via Volume.from_sitk (the one home of the LPS<->RAS flip)."""
    import SimpleITK as sitk

    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)  # geometry carrier only: the flip needs no voxels
    probe.SetSpacing([float(s) for s in geom.spacing])
    probe.SetOrigin([float(x) for x in geom.origin])
    probe.SetDirection([float(x) for x in geom.direction.ravel()])
    return Volume.from_sitk(probe).affine


# --------------------------------------------------------------------------------------------
# scanning
# --------------------------------------------------------------------------------------------


def _candidate_files(folder: Path, recursive: bool, exclude: Sequence[Path] = ()) -> list[Path]:
    """Regular, non-hidden files under ``folder`` (sorted) that are not obviously something else."""
    excl = [Path(e).resolve() for e in exclude]
    out: list[Path] = []
    if recursive:
        walker: Iterable = os.walk(folder)
    else:
        walker = [(str(folder), [], [p.name for p in folder.iterdir() if p.is_file()])]
    for dirpath, dirnames, filenames in walker:
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")
                             and (d / n).resolve() not in excl)
        for name in sorted(filenames):
            if name.startswith(".") or name.lower().endswith(_NOT_DICOM_SUFFIXES):
                continue
            p = d / name
            if p.is_file():
                out.append(p)
    return out


@dataclass
class _Group:
    frames: list[_Frame] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    modality: str = ""
    problem: Optional[str] = None


def _group_headers(files: Sequence[Path], problems: list[DicomProblem]) -> dict[str, _Group]:
    """Parse headers of ``files`` and group image frames by SeriesInstanceUID (kept in memory only)."""
    from medsynth.progress import progress

    groups: dict[str, _Group] = {}
    for path in progress(files, desc="scanning DICOM", total=len(files)):
        if not is_dicom_file(path):
            continue  # not DICOM: skipped quietly
        try:
            ds = _parse(path)
        except ImageReadError as exc:
            problems.append(DicomProblem(path, "corrupt", exc.message, exc.hint or ""))
            continue
        try:
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            modality = str(ds.get("Modality", "") or "").upper()
            frames = _frames(ds, path)
        except _NotAnImage as exc:
            problems.append(DicomProblem(path, "skipped", str(exc)))
            continue
        except _Rejected as exc:
            g = groups.setdefault(uid or f"<no-uid:{path}>", _Group())
            g.files.append(path)
            g.problem = g.problem or str(exc)
            continue
        except Exception as exc:  # malformed values (a number that is not one, a broken sequence, ...)
            problems.append(DicomProblem(path, "corrupt", f"malformed DICOM header ({_header_error(exc)})",
                                         "check the file; remove it if it is not needed"))
            continue
        if not uid:
            g = groups.setdefault(f"<no-uid:{path}>", _Group())
            g.files.append(path)
            g.problem = "no SeriesInstanceUID, so the file cannot be grouped into a series"
            continue
        g = groups.setdefault(uid, _Group())
        g.files.append(path)
        g.frames.extend(frames)
        g.modality = g.modality or modality
    return groups


def _header_error(exc: BaseException) -> str:
    """The exception type, plus the tag pydicom names (its messages may quote values: not repeated)."""
    import re

    tag = re.search(r"\(([0-9A-Fa-f]{4}), ?([0-9A-Fa-f]{4})\)", str(exc))
    return f"{type(exc).__name__} in tag ({tag.group(1).upper()},{tag.group(2).upper()})" if tag \
        else type(exc).__name__


def _common_folder(files: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(f.parent) for f in files]))


def scan_dicom(folder: str | os.PathLike, recursive: bool = True,
               exclude: Sequence[str | os.PathLike] = ()) -> tuple[list[SeriesInfo], list[DicomProblem]]:
    """Find every DICOM series under ``folder`` and check each is one regular CT/MR 3D grid.

    Returns the readable series (headers checked; pixels not decoded yet) in a stable order — by
    folder, then first file — and the problems met: corrupt files, rejected series (with the reason:
    orientation varies, missing slice, non-uniform gaps, mixed sizes, gantry tilt, single slice,
    unsupported modality) and skipped non-image objects.  Non-DICOM files are ignored quietly.
    Folders in ``exclude`` (e.g. a labels folder) and hidden files/folders are not scanned.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ImageReadError(f"{root}: not a folder", hint="pass the folder that holds the DICOM files")
    files = _candidate_files(root, recursive, [Path(e) for e in exclude])
    problems: list[DicomProblem] = []
    with quiet_pydicom():
        groups = _group_headers(files, problems)
    # Files per folder that reading the folder on its own would try to use (all but 'skipped').
    skipped = {p.path for p in problems if p.kind == "skipped"}
    dicom_in: dict[Path, set[Path]] = {}
    for g in groups.values():
        for f in g.files:
            dicom_in.setdefault(f.parent, set()).add(f)
    for p in problems:
        if p.kind == "corrupt":
            dicom_in.setdefault(p.path.parent, set()).add(p.path)
    series: list[SeriesInfo] = []
    for g in groups.values():
        where = _common_folder(g.files)
        if g.problem:
            where = g.files[0] if len(g.files) == 1 else where
            problems.append(DicomProblem(where, "rejected", f"series of {len(g.files)} file(s): {g.problem}",
                                         _FIX_IRREGULAR))
            continue
        try:
            geom = _geometry(g.frames)
        except _Rejected as exc:
            problems.append(DicomProblem(where, "rejected", f"series of {len(g.files)} file(s): {exc}",
                                         _FIX_IRREGULAR))
            continue
        ordered = list(dict.fromkeys(fr.path for fr in geom.frames))  # a multi-frame file once
        exclusive = all(f.parent == where for f in g.files) and dicom_in.get(where, set()) - skipped == set(g.files)
        fr0 = geom.frames[0]
        series.append(SeriesInfo(files=ordered, folder=where, modality=g.modality,
                                 shape=(fr0.cols, fr0.rows, len(geom.frames)), spacing=geom.spacing,
                                 exclusive=exclusive, n_frames=len(geom.frames)))
    series.sort(key=lambda s: (s.folder.as_posix(), s.files[0].as_posix()))
    problems.sort(key=lambda p: (p.kind != "corrupt", p.kind != "rejected", p.path.as_posix()))
    return series, problems


# --------------------------------------------------------------------------------------------
# reading one series
# --------------------------------------------------------------------------------------------


def read_series(source: str | os.PathLike | Sequence[str | os.PathLike],
                series_files: Optional[Sequence[str]] = None, modality: Optional[str] = None,
                **case_extra: Any) -> Volume:
    """Read one DICOM series (a folder, or a list of files) as a RAS :class:`Volume`.

    ``source`` is a folder holding exactly one image series directly (not in subfolders), or a list
    of the series' files.  ``series_files`` (the manifest key of the same name) lists the files of
    the series relative to the folder, for folders that hold more than one series.  Slices are
    sorted by position along the normal; irregular series raise :class:`ImageReadError` naming the
    folder and the reason.  CT values are HU; the array is int16 when every value is an integer in
    int16 range, else float32.  ``modality`` overrides the Modality tag; other manifest keys in
    ``case_extra`` are ignored.  ``meta`` gets ``sha256`` (see :func:`series_sha256`) and ``n_files``.
    """
    del case_extra  # other manifest keys (class names, notes, ...) do not affect reading
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.exists():
            raise ImageReadError(f"{folder}: not found", hint="fix the path in the manifest (paths are relative to it)")
        if series_files is not None:
            if isinstance(series_files, str) or not all(isinstance(s, str) for s in series_files):
                raise ImageReadError(f"{folder}: 'series_files' must be a list of file names")
            files = [folder / s for s in series_files]
            absent = [f for f in files if not f.is_file()]
            if absent:
                raise ImageReadError(f"{folder}: {len(absent)} of {len(files)} series file(s) missing, "
                                     f"first {absent[0].relative_to(folder).as_posix()}",
                                     hint="restore the files or rebuild the manifest with 'medsynth manifest build'")
        elif folder.is_dir():
            files = _candidate_files(folder, recursive=False)
        else:
            files = [folder]
    else:
        files = [Path(f) for f in source]
        folder = _common_folder(files) if files else Path(".")
    with quiet_pydicom():
        return _read_files(folder, files, modality, strict=series_files is not None or not folder.is_dir())


@dataclass
class _Headers:
    """The headers of one series' files: datasets, content digests, image frames, series UIDs seen."""

    datasets: dict[Path, Any] = field(default_factory=dict)
    digests: dict[Path, bytes] = field(default_factory=dict)
    groups: dict[str, list[Path]] = field(default_factory=dict)
    frames: list[_Frame] = field(default_factory=list)


def _read_headers(folder: Path, files: Sequence[Path], strict: bool) -> _Headers:
    """Parse every file's header (``strict``: a non-DICOM or non-image file is an error, else skipped)."""
    h = _Headers()
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageReadError(f"{path}: cannot be read ({exc.strerror})") from None
        if not is_dicom_file(path):
            if strict:
                raise ImageReadError(f"{path}: not a DICOM file", hint="list only the files of the series")
            continue
        ds = _parse(path, data)
        try:
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            fr = _frames(ds, path)
        except _NotAnImage:
            if strict:
                raise ImageReadError(f"{path}: {_sop_name(ds)} is not an image",
                                     hint="list only the image files of the series") from None
            continue
        except _Rejected as exc:
            raise ImageReadError(f"{folder}: cannot read the series: {path.name}: {exc}", hint=_FIX_IRREGULAR) from None
        except Exception as exc:  # malformed values
            raise ImageReadError(f"{path}: malformed DICOM header ({_header_error(exc)})",
                                 hint="check the file; remove it if it is not needed") from None
        h.groups.setdefault(uid, []).append(path)
        h.datasets[path] = ds
        h.digests[path] = hashlib.sha256(data).digest()
        h.frames.extend(fr)
    if not h.frames:
        raise ImageReadError(f"{folder}: no DICOM image files found",
                             hint="point 'image' at the folder that directly holds the series files")
    if len(h.groups) > 1:
        raise ImageReadError(f"{folder}: holds {len(h.groups)} DICOM series; a case must name one",
                             hint="list the series' files in the case's 'series_files' key "
                                  "('medsynth manifest build' does this)")
    return h


def _series_modality(folder: Path, first: Any, path: Path, modality: Optional[str]) -> str:
    try:
        mod = (modality or str(first.get("Modality", "") or "").upper())
    except Exception as exc:  # noqa: BLE001 - an undecodable Modality element
        raise ImageReadError(f"{path}: malformed DICOM header ({_header_error(exc)})",
                             hint="check the file; remove it if it is not needed") from None
    if mod not in IMAGE_MODALITIES:
        raise ImageReadError(f"{folder}: modality {mod or 'missing'} is not supported (CT and MR only)")
    return mod


def _read_pixels(folder: Path, geom: _Geometry, datasets: dict[Path, Any]) -> np.ndarray:
    """The volume (i, j, k) in physical units, read one file at a time: int16 when every value fits
    exactly, else float32."""
    pixel_cache: dict[Path, np.ndarray] = {}
    # Filled slice-major (k, row, column) so each slice is one contiguous write; transposed to
    # (i, j, k) at the end.  float32 holds every int16/uint16 HU exactly; the dtype is chosen below.
    try:
        out = np.empty((len(geom.frames), geom.frames[0].rows, geom.frames[0].cols), dtype=np.float32)
    except (MemoryError, ValueError):
        raise ImageReadError(f"{folder}: a {geom.frames[0].cols} x {geom.frames[0].rows} x {len(geom.frames)} "
                             "volume does not fit in memory", hint="check Rows/Columns/NumberOfFrames "
                             "in the headers; a damaged file can claim an impossible size") from None
    fits_int16 = True
    for k, fr in enumerate(geom.frames):
        if fr.path not in pixel_cache:
            pixel_cache = {fr.path: _pixels(_parse(fr.path, pixels=True), fr.path)}  # one file at a time
        px = pixel_cache[fr.path]
        px = px if fr.frame is None else px[fr.frame]
        if px.shape != (fr.rows, fr.cols):
            raise ImageReadError(f"{fr.path}: pixel data of shape {px.shape} does not match Rows x Columns")
        try:
            phys = _to_physical(px, datasets[fr.path], fr)
        except Exception as exc:  # noqa: BLE001 - a broken Modality LUT
            raise ImageReadError(f"{fr.path}: the Modality LUT cannot be applied ({_header_error(exc)})",
                                 hint="check the file; remove it if it is not needed") from None
        # Checked per slice, while it is small: finite, and whether int16 can hold it exactly.
        if not np.all(np.isfinite(phys)):
            raise ImageReadError(f"{fr.path}: non-finite values after rescaling", hint="check RescaleSlope/Intercept")
        fits_int16 = fits_int16 and bool(phys.min() >= -32768 and phys.max() <= 32767
                                         and np.array_equal(phys, np.rint(phys)))
        out[k] = phys
    arr = out.astype(np.int16) if fits_int16 else out
    return arr.transpose(2, 1, 0)  # (k, row, column) -> (i = column, j = row, k)


def _read_files(folder: Path, files: Sequence[Path], modality: Optional[str], strict: bool) -> Volume:
    """Headers of all files first (grouping, geometry, hashes), then pixels one file at a time, so
    peak memory is the output volume plus one file, not every file's pixel data at once."""
    h = _read_headers(folder, files, strict)
    try:
        geom = _geometry(h.frames)
    except _Rejected as exc:
        raise ImageReadError(f"{folder}: not one regular 3D grid: {exc}", hint=_FIX_IRREGULAR) from None
    mod = _series_modality(folder, h.datasets[geom.frames[0].path], geom.frames[0].path, modality)
    arr = _read_pixels(folder, geom, h.datasets)
    ordered = list(dict.fromkeys(fr.path for fr in geom.frames))
    sha = hashlib.sha256(b"".join(h.digests[p] for p in ordered)).hexdigest()
    return Volume(arr, _ras_affine(geom), modality=mod, units="HU" if mod == "CT" else "a.u.",
                  meta={"source": "dicom", "n_files": len(ordered), "sha256": sha})


def _pixels(ds, path: Path) -> np.ndarray:
    """Stored pixel values; pydicom first, GDCM (via SimpleITK) for codecs pydicom lacks."""
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # missing codec, truncated data, ...
        first_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: no pixel data")
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        img = reader.Execute()
        arr = sitk.GetArrayFromImage(img)
        # GDCM already applied the rescale; undo it so _to_physical applies it exactly once.
        slope = float(ds.get("RescaleSlope", 1) or 1)
        icpt = float(ds.get("RescaleIntercept", 0) or 0)
        arr = np.rint((arr.astype(np.float64) - icpt) / slope)  # stored values are integers
        single = int(ds.get("NumberOfFrames", 1) or 1) == 1
        return arr[0] if single and arr.ndim == 3 else arr
    except Exception:
        raise ImageReadError(f"{path}: pixel data cannot be decoded ({first_error[:120]})",
                             hint="the file may be truncated, or compressed with a codec that is not installed "
                                  "(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)") from None


def _to_physical(px: np.ndarray, ds, fr: _Frame) -> np.ndarray:
    """Stored values -> physical values (HU for CT): Modality LUT if present, else slope/intercept."""
    if fr.frame is None:
        from pydicom.pixels import apply_modality_lut

        if ds.get("ModalityLUTSequence"):
            return np.asarray(apply_modality_lut(px, ds), dtype=np.float64)
    return px.astype(np.float64) * fr.slope + fr.intercept


def series_sha256(files: Sequence[str | os.PathLike]) -> str:
    """Content hash of a DICOM series: sha256 of the concatenated sha256 digests of its files, in
    slice order (``files`` must already be in slice order, as :class:`SeriesInfo` and the manifest's
    ``series_files`` keep them).  Renaming files does not change it; any byte change does."""
    h = hashlib.sha256()
    for f in files:
        d = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                d.update(block)
        h.update(d.digest())
    return h.hexdigest()
