"""A data set's own identifiers, matched as normalised text wherever they hide.

The residual pass of de-identification (:meth:`medsynth.privacy.deid.Deidentifier._residual_sweep`)
asks one question of every value the profile kept: does it still hold an identifier of this file?
The PHI scanner's :class:`~medsynth.privacy.phi_scan.Identifiers` answers it for ASCII tokens;
this module answers it for text as hospitals write it:

* **normalised text**: case-folded, accents stripped (Unicode NFKD, combining marks dropped, and
  the letters NFKD keeps whole folded too: ø ł đ æ œ þ ı), half-width kana made full-width, runs
  of punctuation and spaces made one space.  German umlauts also match their two-letter spelling
  (``Müller`` finds ``MUELLER``).
* **person names component by component**: a PN value is split into its component groups
  (alphabetic ``=`` ideographic ``=`` phonetic) and each group into its components (family ``^``
  given ``^`` middle ``^`` prefix ``^`` suffix).  Every component, every word of a component and
  every group as a whole (both name orders) is searched on its own.
* **three ways of matching**: words on word boundaries (a letter run or a digit run ends at the
  boundary, so ``99SBRH`` holds ``SBRH``); ideographic, kana and hangul needles as plain
  substrings (those scripts do not separate words); and long needles (6 characters or more) inside
  the value with all spaces and punctuation removed, which catches a private coding scheme
  designator such as ``99MYHOSPITAL`` that spells the site's ``My Hospital``.

Needles never leave this module: :meth:`NormalisedIds.spans` returns positions, not text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

from medsynth.privacy.phi_scan import MIN_TOKEN, PLACEHOLDER_NAMES

# Letters NFKD leaves whole (no combining mark to drop): folded by hand.
_FOLD = str.maketrans({"ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ð": "d", "Ð": "D",
                       "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "þ": "th", "Þ": "TH", "ı": "i", "ħ": "h",
                       "Ħ": "H", "ŀ": "l", "Ŀ": "L", "ß": "ss", "ẞ": "SS"})
_GERMAN = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "Ae", "Ö": "Oe", "Ü": "Ue"})
MIN_COMPACT = 6  # shorter needles inside words ("LEE" in "SLEEVE") are chance, not identity
MIN_UNSPACED = 2  # a two-ideograph family name identifies; one ideograph is an ordinary word
# Scripts written without spaces between words: their needles match as substrings.
_UNSPACED_RANGES = ((0x1100, 0x11FF), (0x2E80, 0x2FDF), (0x3040, 0x30FF), (0x3130, 0x318F), (0x31F0, 0x31FF),
                    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xA960, 0xA97F), (0xAC00, 0xD7FF), (0xF900, 0xFAFF),
                    (0xFF65, 0xFF9F), (0x20000, 0x2FA1F))


def _unspaced(ch: str) -> bool:
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _UNSPACED_RANGES)


def _fold_char(ch: str) -> str:
    t = unicodedata.normalize("NFKD", ch.translate(_FOLD))
    return "".join(c for c in t if not unicodedata.combining(c)).casefold()


def canonical(text: str) -> tuple[str, list[int]]:
    """The normalised form of ``text`` and, for each of its characters, the index in ``text`` it
    came from (so a match can be cut out of the original)."""
    out: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        for c in _fold_char(ch):
            if c.isalnum():
                out.append(c)
                where.append(i)
            elif out and out[-1] != " ":
                out.append(" ")
                where.append(i)
    while out and out[-1] == " ":
        out.pop()
        where.pop()
    return "".join(out), where


def normalise(text: str) -> str:
    """Case-folded, accents stripped, punctuation runs made one space (see the module docstring)."""
    return canonical(text)[0]


def _compact(canon: str, where: list[int]) -> tuple[str, list[int]]:
    keep = [i for i, c in enumerate(canon) if c != " "]
    return "".join(canon[i] for i in keep), [where[i] for i in keep]


def _bounded(needle: str) -> str:
    """A regex for ``needle`` that does not start or end inside a letter run or a digit run."""
    def side(ch: str, look: str) -> str:
        if ch.isdigit():
            return f"(?{look}\\d)"
        if ch.isalpha():
            return f"(?{look}[^\\W\\d_])"
        return ""
    return side(needle[0], "<!") + re.escape(needle) + side(needle[-1], "!")


@dataclass
class NormalisedIds:
    """Identifiers of one data set in normalised form, matched by word, by substring and compacted."""

    words: set[str] = field(default_factory=set)
    unspaced: set[str] = field(default_factory=set)
    compact: set[str] = field(default_factory=set)
    _rx: tuple | None = None

    def __len__(self) -> int:
        return len(self.words) + len(self.unspaced)

    # -- building ---------------------------------------------------------------------------

    def add(self, value: str, min_len: int = MIN_TOKEN) -> None:
        """Add one identifier (any script); too short or placeholder values are ignored."""
        canon = normalise(str(value or ""))
        if not canon or canon.upper() in PLACEHOLDER_NAMES:
            return
        self._rx = None
        if any(_unspaced(c) for c in canon):
            if len(canon.replace(" ", "")) >= MIN_UNSPACED:
                self.unspaced.add(canon.replace(" ", ""))
                if " " in canon:
                    self.unspaced.add(canon)
            return
        alnum = canon.replace(" ", "")
        if len(alnum) < min_len or (alnum.isdigit() and len(alnum) < 5):
            return
        self.words.add(canon)
        if len(alnum) >= MIN_COMPACT and not alnum.isdigit():
            self.compact.add(alnum)

    def add_person_name(self, value: str) -> None:
        """Add a PN value: each component group, each component and each word of it on its own."""
        for group in str(value or "").split("="):
            comps = [c.strip() for c in group.split("^") if c.strip()]
            for comp in comps:
                for variant in {comp, comp.translate(_GERMAN)}:
                    self.add(variant)
                    for word in variant.split():
                        self.add(word)
            if len(comps) >= 2:
                for order in (comps[:2], comps[1::-1]):
                    self.add(" ".join(order), min_len=4)
                    if any(_unspaced(ch) for ch in "".join(order)):
                        self.add("".join(order))

    def extend(self, values: Iterable[str]) -> None:
        for v in values:
            self.add(v)

    # -- matching ---------------------------------------------------------------------------

    def _regexes(self) -> tuple:
        if self._rx is None:
            def alt(items: Iterable[str], bounded: bool):
                items = sorted(items, key=len, reverse=True)
                if not items:
                    return None
                return re.compile("|".join(_bounded(n) if bounded else re.escape(n) for n in items))
            self._rx = (alt(self.words, True), alt(self.unspaced, False), alt(self.compact, False))
        return self._rx

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where identifiers occur in ``text``: (start, end) index pairs into ``text``, merged."""
        if not text or not len(self):
            return []
        words, unspaced, compact = self._regexes()
        canon, where = canonical(text)
        found: list[tuple[int, int]] = []
        for rx in (words, unspaced):
            if rx is not None:
                found += [(where[m.start()], where[m.end() - 1] + 1) for m in rx.finditer(canon)]
        if compact is not None:
            flat, fwhere = _compact(canon, where)
            found += [(fwhere[m.start()], fwhere[m.end() - 1] + 1) for m in compact.finditer(flat)]
        merged: list[tuple[int, int]] = []
        for a, b in sorted(found):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        return merged

    def found_in(self, text: str) -> bool:
        return bool(self.spans(text))

    def cut(self, text: str) -> str:
        """``text`` with every identifier span removed and the spacing tidied."""
        out, last = [], 0
        for a, b in self.spans(text):
            out.append(text[last:a])
            last = b
        out.append(text[last:])
        return " ".join(" ".join(out).split()).strip(" ,;:-/^=")
