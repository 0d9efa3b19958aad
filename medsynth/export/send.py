"""Send a folder of DICOM files into a PACS with DICOM C-STORE (pynetdicom).

:func:`send_dicom` finds every DICOM file under a folder (by content; the DICOMDIR and non-DICOM
files such as NIfTI or JSON are skipped), proposes one presentation context per SOP class with the
transfer syntaxes its files are stored in (an uncompressed file also offers the other uncompressed
syntaxes, which pynetdicom converts to), and stores the files over as few associations as the
128-context limit allows.  A refused connection or an aborted association is retried with
back-off; a rejected association is reported with the peer's reason and not retried unless the
rejection is transient.  Each instance whose C-STORE fails (or times out) is retried ``retries``
times.  Nothing in the files is changed, and nothing from them is logged except synthetic UIDs.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from medsynth.errors import ConfigError, MedsynthError

log = logging.getLogger("medsynth.export.send")

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
MAX_CONTEXTS = 128
# C-STORE statuses that store the instance (0x0000 success; Bxxx warnings: coerced, elements discarded)
_STORED_WARNINGS = {0xB000, 0xB006, 0xB007}
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII except backslash, 16 at most


class SendError(MedsynthError):
    """The PACS could not be reached, refused the association, or did not store every instance."""

    exit_code = 1


@dataclass
class DicomFile:
    """One file to send: where it is and what it holds (synthetic UIDs only)."""

    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    study: str
    series: str


@dataclass
class SendResult:
    """What :func:`send_dicom` did; ``failed`` maps a file (relative to the folder) to the reason."""

    directory: Path
    destination: str
    files: list[DicomFile] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    warnings: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    associations: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and len(self.stored) == len(self.files)

    def summary(self) -> str:
        n_studies = len({f.study for f in self.files})
        n_series = len({f.series for f in self.files})
        n_classes = len({f.sop_class for f in self.files})
        line = (f"sent {len(self.stored)} of {len(self.files)} instance(s) ({n_studies} study(ies), "
                f"{n_series} series, {n_classes} SOP class(es)) to {self.destination} over "
                f"{self.associations} association(s) in {self.seconds:.1f} s; {len(self.failed)} failed")
        if self.warnings:
            line += f"; {len(self.warnings)} stored with a warning status"
        lines = [line]
        for name, why in list(self.failed.items())[:10]:
            lines.append(f"  {name}: {why}")
        if len(self.failed) > 10:
            lines.append(f"  ... and {len(self.failed) - 10} more")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# arguments and files
# ---------------------------------------------------------------------------------------------


def check_ae_title(value: str, option: str) -> str:
    """An AE title as DICOM allows it (1-16 printable ASCII characters, no backslash, not blank)."""
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
        raise ConfigError(f"`{option}` {value!r} is not a DICOM AE title",
                          hint="use 1 to 16 printable ASCII characters without backslash, e.g. ORTHANC")
    return value.strip()


def check_port(port: int) -> int:
    """A TCP port number (1..65535), else ConfigError naming ``port``."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"`port` {port!r} is not a TCP port",
                          hint="use the PACS's DICOM port, 1..65535 (often 104 or 4242)")
    return port


def find_dicom_files(directory: str | os.PathLike) -> list[DicomFile]:
    """Every DICOM instance under ``directory`` (any name, by content), sorted by path.

    DICOMDIR files (Media Storage Directory) and files that are not DICOM are skipped; a DICOM file
    without SOP Class/Instance UIDs or a transfer syntax cannot be sent and raises SendError naming it.
    """
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    root = Path(directory)
    if not root.is_dir():
        raise SendError(f"{root}: folder not found", hint="pass the folder of 'medsynth release' or 'medsynth export'")
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path, stop_before_pixels=True,
                         specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError):
            continue  # NIfTI, JSON, checksums, ...: not DICOM
        meta = getattr(ds, "file_meta", None)
        sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
        if sop_class == MEDIA_STORAGE_DIRECTORY:
            continue
        ts = str(getattr(meta, "TransferSyntaxUID", "") or "")
        inst = str(ds.get("SOPInstanceUID", "") or getattr(meta, "MediaStorageSOPInstanceUID", ""))
        if not (sop_class and inst and ts):
            raise SendError(f"{path}: a DICOM file without SOP Class UID, SOP Instance UID or Transfer Syntax UID "
                            "cannot be stored", hint="rewrite it with complete file meta information, or remove it")
        out.append(DicomFile(path, sop_class, inst, ts, str(ds.get("StudyInstanceUID", "")),
                             str(ds.get("SeriesInstanceUID", ""))))
    if not out:
        raise SendError(f"{root}: holds no DICOM instances to send",
                        hint="export with DICOM ('medsynth export ... --format nifti,dicom,seg'), "
                             "then release or send that folder")
    return out


def presentation_contexts(files: list[DicomFile]) -> list[list[tuple[str, list[str]]]]:
    """Groups of (SOP class, transfer syntaxes) contexts, each group at most 128 contexts.

    One context per SOP class and stored transfer syntax; an uncompressed syntax also offers
    Explicit and Implicit VR Little Endian (pynetdicom converts between uncompressed syntaxes).
    """
    from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    for f in files:
        ts = UID(f.transfer_syntax)
        offer = [str(ts)]
        if not ts.is_compressed:
            offer += [str(u) for u in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if u != ts]
        wanted.setdefault((f.sop_class, tuple(offer)), None)
    items = [(c, list(t)) for c, t in wanted]
    return [items[i:i + MAX_CONTEXTS] for i in range(0, len(items), MAX_CONTEXTS)]


# ---------------------------------------------------------------------------------------------
# the association
# ---------------------------------------------------------------------------------------------


class _Capture(logging.Handler):
    """Keeps pynetdicom's messages (they say why a connection or association failed) out of the
    terminal and available for one clear error."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def _quiet_pynetdicom() -> Iterator[_Capture]:
    logger = logging.getLogger("pynetdicom")
    cap = _Capture()
    old = (logger.level, logger.propagate)
    logger.addHandler(cap)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield cap
    finally:
        logger.removeHandler(cap)
        logger.setLevel(old[0])
        logger.propagate = old[1]


def _why_not(assoc, cap: _Capture, destination: str) -> tuple[str, bool]:
    """(message, retry?) for an association that was not established."""
    text = " ".join(cap.lines)
    if assoc.is_rejected:
        detail = "; ".join(ln for ln in cap.lines if ln.startswith(("Result:", "Reason:"))) or "no reason given"
        transient = "Transient" in text
        return (f"{destination} rejected the association ({detail})", transient)
    if "Connection refused" in text or "unable to connect" in text.lower():
        return (f"could not connect to {destination}: connection refused (no DICOM service listening on "
                "that port)", True)
    if "No accepted presentation contexts" in text:
        return (f"{destination} accepted none of the proposed presentation contexts (SOP classes or transfer "
                "syntaxes it does not store)", False)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"{destination} did not answer in time", True)
    last = next((ln for ln in reversed(cap.lines) if ln.strip()), "no reply")
    return (f"no association with {destination}: {last[:200]}", True)


def _no_delay(assoc) -> None:
    """Send each PDU at once (TCP_NODELAY): a C-STORE writes its command and its data set as two
    PDUs, and with Nagle's algorithm the second waits for the peer's delayed ACK, about 40 ms per
    instance."""
    import socket

    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not a TCP socket (or already closed): keep the default
            pass


def _associate(ae, host: str, port: int, called: str, retries: int, backoff: float, destination: str):
    """An established association, after up to ``retries`` further tries; SendError otherwise."""
    why = ""
    for attempt in range(retries + 1):
        with _quiet_pynetdicom() as cap:
            assoc = ae.associate(host, port, ae_title=called)
        if assoc.is_established:
            _no_delay(assoc)
            return assoc
        why, again = _why_not(assoc, cap, destination)
        if not again:
            break
        if attempt < retries:
            log.info("%s; retrying in %.1f s", why, backoff * 2 ** attempt)
            time.sleep(backoff * 2 ** attempt)
    hint = ("check `called_aet` (the PACS's AE title) and that the PACS accepts this `calling_aet`"
            if "rejected" in why else "check `host` and `port`, and that the PACS is running and reachable")
    raise SendError(why, hint=hint)


def send_dicom(directory: str | os.PathLike, host: str, port: int, called_aet: str, calling_aet: str = "MEDSYNTH",
               *, retries: int = 2, timeout: float = 30.0, backoff: float = 0.5) -> SendResult:
    """C-STORE every DICOM file under ``directory`` to ``called_aet`` at ``host:port``.

    Raises SendError when no association can be made (closed port, rejection, no accepted context);
    instances that fail are listed in ``SendResult.failed`` (the caller exits non-zero).
    """
    port = check_port(port)
    called, calling = check_ae_title(called_aet, "called_aet"), check_ae_title(calling_aet, "calling_aet")
    if retries < 0:
        raise ConfigError(f"`retries` must be >= 0, got {retries}")
    if timeout <= 0:
        raise ConfigError(f"`timeout` must be > 0 seconds, got {timeout}")
    root = Path(directory)
    files = find_dicom_files(root)
    destination = f"{called}@{host}:{port}"
    res = SendResult(root, destination, files)
    t0 = time.perf_counter()
    for group in presentation_contexts(files):
        classes = {c for c, _ in group}
        todo = [f for f in files if f.sop_class in classes]
        _send_group(res, todo, group, host, port, called, calling, retries, timeout, backoff)
    res.seconds = time.perf_counter() - t0
    log.debug("%s", res.summary().splitlines()[0])
    return res


def _send_group(res: SendResult, todo: list[DicomFile], contexts: list[tuple[str, list[str]]], host: str, port: int,
                called: str, calling: str, retries: int, timeout: float, backoff: float) -> None:
    """Store ``todo`` over associations proposing ``contexts``; re-associate after an abort."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    pending = list(todo)
    tries = {f.sop_instance: 0 for f in todo}
    assoc = None
    try:
        while pending:
            if assoc is None or not assoc.is_established:
                assoc = _associate(ae, host, port, called, retries, backoff, res.destination)
                res.associations += 1
            f = pending.pop(0)
            rel = f.path.relative_to(res.directory).as_posix()
            accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
            if f.sop_class not in accepted:
                res.failed[rel] = "the PACS accepted no presentation context for its SOP class"
                continue
            with _quiet_pynetdicom() as cap:
                try:
                    status = assoc.send_c_store(f.path)
                except (OSError, ValueError, AttributeError, RuntimeError) as exc:
                    status, cap.lines = None, [*cap.lines, f"{type(exc).__name__}"]
            code = int(getattr(status, "Status", -1)) if status is not None and "Status" in status else -1
            if code == 0x0000 or code in _STORED_WARNINGS:
                res.stored.append(f.sop_instance)
                if code:
                    res.warnings[rel] = f"status 0x{code:04X}"
                continue
            tries[f.sop_instance] += 1
            why = (f"C-STORE status 0x{code:04X}" if code >= 0 else
                   "no C-STORE response (association aborted or timed out)")
            if tries[f.sop_instance] <= retries:
                log.debug("%s: %s; retrying", rel, why)
                pending.append(f)
            else:
                res.failed[rel] = why
    finally:
        if assoc is not None and assoc.is_established:
            with _quiet_pynetdicom():
                assoc.release()
