"""The pre-tokenizers of a byte-level BPE `tokenizer.json` (Split, then ByteLevel), as `tokenizers` runs them.

Split's regex is written for Oniguruma; oniguruma.py translates it into Python `re`, and Splitter matches text
beyond the BMP through BMP proxies, for speed. Features not implemented raise a ValueError at load time.
Standard library only.

    steps = pretokenizers(spec["pre_tokenizer"])   # each a function str -> list[str]
"""

import bisect
import re

from oniguruma import MAX_CP, translate

# GPT-2's split, used by ByteLevel(use_regex=true)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


class Splitter:
    """Split pre-tokenizer: a piece -> its sub-pieces, like `tokenizers`' Split with Oniguruma find_iter.

    Speed: Python's `re` tests a character set's code points above U+FFFF by a linear scan of ranges,
    which made \\p{L} eight times slower. So the regex keeps only the BMP part of each set, and a text with
    characters above U+FFFF is matched through a copy where each of them is replaced by a BMP "proxy" that
    lies in exactly the same sets and literals of the pattern (the spans are then cut from the real text).
    """

    def __init__(self, pattern: str, behavior: str):
        if behavior not in ("Isolated", "Removed"):
            raise ValueError(f"unsupported Split behavior {behavior!r} (only Isolated and Removed)")
        atoms: list = [[(10, 10)]]  # '.' and the anchors test for '\n'
        full = translate(pattern, atoms)
        self._starts, self._proxies = _proxy_table(atoms)
        p = translate(pattern, [], bmp_only=True) if self._starts else full
        self.removed = behavior == "Removed"
        # Isolated keeps the text between two matches as a piece too: a run of positions where the pattern
        # does not match
        self._re = re.compile(p if self.removed else f"(?:{p})|(?:(?!(?:{p}))[\\s\\S])+")
        self._findall = self._re.findall

    def _proxy(self, m: re.Match) -> str:
        return self._proxies[bisect.bisect_right(self._starts, ord(m.group())) - 1]

    def __call__(self, s: str) -> list[str]:
        if self._starts and not s.isascii() and max(s) > "\uffff":
            spans = [m.span() for m in self._re.finditer(_NON_BMP.sub(self._proxy, s))]
        elif not self.removed:
            return self._findall(s)
        else:
            spans = [m.span() for m in self._re.finditer(s)]
        if not self.removed:
            return [s[a:b] for a, b in spans]
        edges = [0, *(x for span in spans for x in span), len(s)]
        return [s[a:b] for a, b in zip(edges[::2], edges[1::2]) if a < b]


_NON_BMP = re.compile("[\U00010000-\U0010ffff]")


def _proxy_table(atoms: list) -> tuple[list[int], list[str]]:
    """Intervals of code points above U+FFFF (their starts) and, for each, a BMP char in the same atoms.

    Membership in every atom is constant between atom boundaries, so one candidate per interval suffices.
    Returns empty lists when some interval has no BMP twin (then the full, slower sets are used).
    """
    edges = sorted({0, 0xD800, 0xE000, 0x10000, *(x for ranges in atoms for lo, hi in ranges for x in (lo, hi + 1))})
    edges = [e for e in edges if e <= MAX_CP]
    flat = [[x for lo, hi in ranges for x in (lo, hi + 1)] for ranges in atoms]

    def signature(cp):  # inside an atom iff an odd number of its edges are <= cp
        return tuple(bisect.bisect_right(f, cp) % 2 for f in flat)

    twins: dict[tuple, str] = {}
    for e in edges:
        if e < 0xD800 or 0xE000 <= e < 0x10000:
            twins.setdefault(signature(e), chr(e))
    starts, proxies = [], []
    for e in edges:
        if e >= 0x10000:
            twin = twins.get(signature(e))
            if twin is None:
                return [], []
            starts.append(e)
            proxies.append(twin)
    return starts, proxies


def _byte_level_splitter(add_prefix_space: bool, use_regex: bool):
    split = Splitter(_GPT2_SPLIT, "Isolated") if use_regex else None

    def pretokenize(s: str) -> list[str]:
        if add_prefix_space and not s.startswith(" "):
            s = " " + s
        return split(s) if split else [s]

    return pretokenize


def pretokenizers(spec) -> list:
    """The pre-tokenizer steps, each a function str -> list[str]; ByteLevel must come last."""
    spec = spec or {}
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise ValueError("not a byte-level BPE tokenizer.json (pre-tokenizer does not end with ByteLevel)")
    out = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel" and step is steps[-1]:
            if step.get("add_prefix_space") or step.get("use_regex", True):
                out.append(_byte_level_splitter(bool(step.get("add_prefix_space")),
                                                step.get("use_regex", True)))
        elif kind == "Split":
            pattern = step.get("pattern") or {}
            if step.get("invert"):
                raise ValueError("unsupported Split option invert=true")
            if "Regex" in pattern:
                out.append(Splitter(pattern["Regex"], step.get("behavior")))
            elif "String" in pattern:
                out.append(Splitter(re.escape(pattern["String"]), step.get("behavior")))
            else:
                raise ValueError(f"malformed Split pattern {pattern!r}")
        elif kind == "ByteLevel":
            raise ValueError("unsupported pre-tokenizer order: ByteLevel must come last")
        else:
            raise ValueError(f"unsupported pre-tokenizer type {kind!r} (only Split and a final ByteLevel)")
    return out

