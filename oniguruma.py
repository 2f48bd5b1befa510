"""Oniguruma regexes (the engine inside `tokenizers`) translated into equivalent Python `re` patterns.

A pre-tokenizer's Split regex is written for Oniguruma (Ruby syntax: `\\p{L}`, `\\p{N}`, `(?i:...)`); it is
translated here with explicit character sets, so that Python's different `\\s`, missing `\\p{..}` and looser
case folding cannot change the result. Features not implemented raise a ValueError. Standard library only.

    atoms = []
    python_pattern = translate(r"\\p{L}+|\\s+", atoms)  # atoms: the code point ranges it tests characters against
"""

import functools
import re
import unicodedata

# Letters / numbers added in Unicode 15.0-16.0. Python 3.11's unicodedata is Unicode 14.0 (it calls them
# unassigned) but the Oniguruma engine inside `tokenizers` knows Unicode 16.0.
_NEW_LETTERS = (
    "1C89-1C8A A7CB-A7CD A7DA-A7DC 105C0-105F3 10D4A-10D65 10D6F-10D85 10EC2-10EC4 1123F-11240 11380-11389 "
    "1138B 1138E 11390-113B5 113B7 113D1 113D3 11BC0-11BE0 11F02 11F04-11F10 11F12-11F33 1342F 13441-13446 "
    "13460-143FA 16100-1611D 16D40-16D6C 18CFF 1B132 1B155 1DF25-1DF2A 1E030-1E06D 1E4D0-1E4EB 1E5D0-1E5ED "
    "1E5F0 2B739 2EBF0-2EE5D 31350-323AF"
)
_NEW_NUMBERS = (
    "10D40-10D49 116D0-116E3 11BF0-11BF9 11F50-11F59 16130-16139 16D70-16D79 1CCF0-1CCF9 1D2C0-1D2D3 "
    "1E4F0-1E4F9 1E5F1-1E5FA"
)
# Unicode White_Space: what `\s` means in Oniguruma and Rust's regex. Python's `\s` also takes \x1c-\x1f.
_WHITESPACE = "9-D 20 85 A0 1680 2000-200A 2028-2029 202F 205F 3000"
MAX_CP = 0x10FFFF


# ---- character classes -----------------------------------------------------------------------------

def _parse_ranges(table: str) -> list[tuple[int, int]]:
    out = []
    for item in table.split():
        lo, _, hi = item.partition("-")
        out.append((int(lo, 16), int(hi or lo, 16)))
    return out


def _union(*sets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(r for s in sets for r in s):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CP:
        out.append((nxt, MAX_CP))
    return out


@functools.cache
def _unicode_tables() -> tuple[dict[str, list[tuple[int, int]]], dict[str, str], frozenset[str]]:
    """One pass over all code points: \\p{L} and \\p{N} ranges, simple case-fold classes, multi-char folds."""
    cps: dict[str, list[int]] = {"L": [], "N": []}
    folds: dict[str, str] = {}
    multi = set()
    for cp in range(MAX_CP + 1):
        ch = chr(cp)
        major = unicodedata.category(ch)[0]
        if major in cps:
            cps[major].append(cp)
        f = ch.casefold()
        if f != ch:
            if len(f) == 1:
                folds[f] = folds.get(f, f) + ch
            else:
                multi.add(f)
    sets = {k: _union([(c, c) for c in v]) for k, v in cps.items()}
    sets["L"] = _union(sets["L"], _parse_ranges(_NEW_LETTERS))
    sets["N"] = _union(sets["N"], _parse_ranges(_NEW_NUMBERS))
    sets["s"] = _parse_ranges(_WHITESPACE)
    return sets, folds, frozenset(multi)


def _class(ranges: list[tuple[int, int]]) -> str:
    """A Python `re` character set for these code point ranges."""
    if not ranges:
        return "(?!)"
    return "[" + "".join(f"\\U{lo:08x}" + (f"-\\U{hi:08x}" if hi > lo else "") for lo, hi in ranges) + "]"


# ---- Oniguruma pattern -> Python re ------------------------------------------------------------------

_PROPERTIES = {"L": "L", "Letter": "L", "N": "N", "Number": "N"}
_CHAR_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "e": "\x1b"}
_GROUP_OPENERS = ("(?:", "(?=", "(?!", "(?<=", "(?<!")


def _escape(pattern: str, i: int) -> tuple[list[tuple[int, int]], int]:
    """Parse the escape at pattern[i] (a backslash); return its code point ranges and the next index."""
    sets = _unicode_tables()[0]
    c = pattern[i + 1 : i + 2]
    if c in ("p", "P"):
        m = re.match(r"\{(\^?)(\w+)\}", pattern[i + 2 :])
        if not m or m.group(2) not in _PROPERTIES:
            raise ValueError(f"unsupported regex property {pattern[i:i + 12]!r} (only \\p{{L}} and \\p{{N}})")
        ranges = sets[_PROPERTIES[m.group(2)]]
        return (_complement(ranges) if (c == "P") != bool(m.group(1)) else ranges), i + 2 + m.end()
    if c in ("s", "S"):
        return (sets["s"] if c == "s" else _complement(sets["s"])), i + 2
    if c in _CHAR_ESCAPES:
        cp = ord(_CHAR_ESCAPES[c])
        return [(cp, cp)], i + 2
    m = re.match(r"x\{([0-9a-fA-F]{1,8})\}|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})", pattern[i + 1 :])
    if m:
        cp = int(next(g for g in m.groups() if g), 16)
        return [(cp, cp)], i + 1 + m.end()
    if c and not c.isalnum():
        return [(ord(c), ord(c))], i + 2
    raise ValueError(f"unsupported regex escape {pattern[i:i + 2]!r}")


def _parse_class(pattern: str, i: int) -> tuple[list[tuple[int, int]], int]:
    """Parse the bracket expression at pattern[i] ('['); return its code point ranges and the next index."""
    i += 1
    negate = pattern.startswith("^", i)
    i += negate
    items: list[list[tuple[int, int]]] = []
    first = True
    while True:
        if i >= len(pattern):
            raise ValueError("unterminated character class in regex")
        c = pattern[i]
        if c == "]" and not first:
            i += 1
            break
        if c == "[" or pattern.startswith("&&", i):
            raise ValueError("nested character classes / set operations in regex are not supported")
        if c == "\\":
            ranges, i = _escape(pattern, i)
        else:
            ranges, i = [(ord(c), ord(c))], i + 1
        # a range a-b (a '-' before ']' is a literal)
        if len(ranges) == 1 and ranges[0][0] == ranges[0][1] and pattern.startswith("-", i) \
                and not pattern.startswith("-]", i):
            hi, i = _escape(pattern, i + 1) if pattern[i + 1] == "\\" else ([(ord(pattern[i + 1]),) * 2], i + 2)
            ranges = [(ranges[0][0], hi[0][1])]
        items.append(ranges)
        first = False
    ranges = _union(*items)
    return (_complement(ranges) if negate else ranges), i


def translate(pattern: str, atoms: list, bmp_only: bool = False) -> str:
    """Translate an Oniguruma (Ruby syntax) pre-tokenizer regex into an equivalent Python `re` pattern.

    Every character set or literal it tests characters against is appended to `atoms` (as ranges).
    With bmp_only, sets drop their code points above U+FFFF (see pretokenizer.Splitter).
    """
    return _Translator(pattern, atoms, bmp_only).translate()


_QUANTIFIER = re.compile(r"\{\d*(,\d*)?\}")


class _Translator:
    """One pattern's translation, written left to right into `out`: each method below writes the construct at
    pattern[i] and returns the index after it."""

    def __init__(self, pattern: str, atoms: list, bmp_only: bool):
        self.pattern, self.atoms, self.bmp_only = pattern, atoms, bmp_only
        self.out: list[str] = []
        self.groups: list[bool] = []  # per open group: is it a (?i:...) group
        self.folded_run = ""  # the case-folded literal run being written inside a (?i:...) group

    def translate(self) -> str:
        pattern, i = self.pattern, 0
        while i < len(pattern):
            c = pattern[i]
            if c == "\\":
                i = self.escape(i)
            elif c == "[":
                i = self.bracket(i)
            elif c == "(":
                i = self.open_group(i)
            elif c in ")|":
                i = self.close_group_or_branch(c, i)
            elif c in "*+?.":
                self.out.append(c)
                i += 1
            elif c in "^$":
                self.out.append(f"(?m:{c})")  # Ruby syntax: ^ and $ are always line anchors
                i += 1
            elif c == "{" and (m := _QUANTIFIER.match(pattern, i)) and m.group() != "{}":
                self.out.append(m.group())
                i = m.end()
            else:
                self.literal(c)
                i += 1
        self.end_run()
        return "".join(self.out)

    @property
    def caseless(self) -> bool:
        return any(self.groups)

    def escape(self, i: int) -> int:
        ranges, i = _escape(self.pattern, i)
        if ranges[0][0] == ranges[0][1] and len(ranges) == 1:
            self.literal(chr(ranges[0][0]))  # an escaped literal
        else:
            self.refuse_sets_if_caseless()
            self.out.append(self.char_set(ranges))
        return i

    def bracket(self, i: int) -> int:
        self.refuse_sets_if_caseless()
        ranges, i = _parse_class(self.pattern, i)
        self.out.append(self.char_set(ranges))
        return i

    def refuse_sets_if_caseless(self):
        if self.caseless:
            raise ValueError("character classes inside (?i:...) are not supported")

    def open_group(self, i: int) -> int:
        pattern = self.pattern
        self.end_run()
        opener = "(?i:" if pattern.startswith("(?i:", i) else \
            next((o for o in _GROUP_OPENERS if pattern.startswith(o, i)), None)
        if opener is None and pattern.startswith("(?", i):
            raise ValueError(f"unsupported regex group {pattern[i:i + 4]!r}")
        self.groups.append(opener == "(?i:")
        self.out.append("(?:" if opener in (None, "(?i:") else opener)  # we only use whole matches
        return i + len(opener or "(")

    def close_group_or_branch(self, c: str, i: int) -> int:
        self.end_run()
        if c == ")" and self.groups:
            self.groups.pop()
        self.out.append(c)
        return i + 1

    def literal(self, c: str):
        """A literal character; inside (?i:...) it stands for its case-fold class (Unicode simple folding)."""
        if not self.caseless:
            self.atoms.append([(ord(c), ord(c))])
            self.out.append(re.escape(c))
            return
        _, folds, _ = _unicode_tables()
        f = c.casefold()
        if len(f) != 1:
            raise ValueError(f"case-insensitive literal {c!r} has a multi-character case fold")
        self.folded_run += f
        variants = folds.get(f, f)
        self.out.append(self.char_set(_union([(ord(v), ord(v)) for v in variants])))

    def end_run(self):
        _, _, multi_folds = _unicode_tables()
        if any(f in self.folded_run for f in multi_folds):  # e.g. Oniguruma's (?i:ss) also matches 'ß'
            raise ValueError(f"case-insensitive literal {self.folded_run!r} has multi-character case folds")
        self.folded_run = ""

    def char_set(self, ranges: list[tuple[int, int]]) -> str:
        """The Python `re` set of these code point ranges, which are recorded in `atoms`."""
        self.atoms.append(ranges)
        if self.bmp_only:
            ranges = [(lo, min(hi, 0xFFFF)) for lo, hi in ranges if lo <= 0xFFFF]
        return _class(ranges)


WHITESPACE_CHARS = frozenset(chr(c) for lo, hi in _parse_ranges(_WHITESPACE) for c in range(lo, hi + 1))
