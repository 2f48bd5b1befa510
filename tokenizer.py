"""Byte-level BPE text tokenizer that reads a Hugging Face `tokenizer.json` and encodes/decodes exactly like
the `tokenizers` library (encode with add_special_tokens=False, decode with skip_special_tokens=False).

Standard library only. Pipeline of `tokenizers`, reproduced step by step:
  1. added tokens are cut out of the text as literals (leftmost-longest; non-normalized ones first),
  2. each remaining piece is pre-tokenized: Split regexes, then ByteLevel (bytes -> printable chars),
  3. each pre-token is BPE-merged (lowest merge rank first, leftmost on ties), with a per-word cache.
The Split regexes are written for Oniguruma (`\\p{L}`, `\\p{N}`, `(?i:...)`); we translate them into Python
`re` with explicit character sets, so that Python's different `\\s`, missing `\\p{..}` and looser
case folding cannot change the result. Features we do not implement raise a ValueError at load time.
"""

import bisect
import functools
import heapq
import json
import re
import unicodedata
from pathlib import Path

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
_MAX_CP = 0x10FFFF
_CACHE_WORDS = 1 << 17  # word cache entries before it is emptied (bounds memory on endless new words)


def _bytes_to_chars() -> list[str]:
    """GPT-2's byte -> printable char table: printable Latin-1 bytes map to themselves, the rest to U+0100.."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = [""] * 256, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b], extra = chr(0x100 + extra), extra + 1
    return table


_BYTE_CHARS = _bytes_to_chars()
_CHAR_BYTES = {c: b for b, c in enumerate(_BYTE_CHARS)}
_LATIN1_TO_BYTE_CHARS = str.maketrans({b: c for b, c in enumerate(_BYTE_CHARS)})
# GPT-2's split, used by ByteLevel(use_regex=true)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


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
    if nxt <= _MAX_CP:
        out.append((nxt, _MAX_CP))
    return out


@functools.cache
def _unicode_tables() -> tuple[dict[str, list[tuple[int, int]]], dict[str, str], frozenset[str]]:
    """One pass over all code points: \\p{L} and \\p{N} ranges, simple case-fold classes, multi-char folds."""
    cps: dict[str, list[int]] = {"L": [], "N": []}
    folds: dict[str, str] = {}
    multi = set()
    for cp in range(_MAX_CP + 1):
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


def _translate(pattern: str, atoms: list, bmp_only: bool = False) -> str:
    """Translate an Oniguruma (Ruby syntax) pre-tokenizer regex into an equivalent Python `re` pattern.

    Every character set or literal it tests characters against is appended to `atoms` (as ranges).
    With bmp_only, sets drop their code points above U+FFFF (see _Splitter).
    """
    _, folds, multi_folds = _unicode_tables()
    out: list[str] = []

    def klass(ranges):
        atoms.append(ranges)
        return _class([(lo, min(hi, 0xFFFF)) for lo, hi in ranges if lo <= 0xFFFF] if bmp_only else ranges)

    groups: list[bool] = []  # per open group: is it a (?i:...) group
    run = ""  # the case-folded literal run being written inside a (?i:...) group

    def end_run():
        nonlocal run
        if any(f in run for f in multi_folds):  # e.g. Oniguruma's (?i:ss) also matches 'ß'
            raise ValueError(f"case-insensitive literal {run!r} has multi-character case folds")
        run = ""

    i = 0
    while i < len(pattern):
        c, caseless = pattern[i], any(groups)
        if c == "\\":
            ranges, i = _escape(pattern, i)
            if ranges[0][0] == ranges[0][1] and len(ranges) == 1:
                c, i = chr(ranges[0][0]), i - 1  # an escaped literal: written below
            elif caseless:
                raise ValueError("character classes inside (?i:...) are not supported")
            else:
                out.append(klass(ranges))
                continue
        elif c == "[":
            if caseless:
                raise ValueError("character classes inside (?i:...) are not supported")
            ranges, i = _parse_class(pattern, i)
            out.append(klass(ranges))
            continue
        elif c == "(":
            end_run()
            opener = "(?i:" if pattern.startswith("(?i:", i) else \
                next((o for o in _GROUP_OPENERS if pattern.startswith(o, i)), None)
            if opener is None and pattern.startswith("(?", i):
                raise ValueError(f"unsupported regex group {pattern[i:i + 4]!r}")
            groups.append(opener == "(?i:")
            out.append("(?:" if opener in (None, "(?i:") else opener)  # we only use whole matches
            i += len(opener or "(")
            continue
        elif c in ")|":
            end_run()
            if c == ")" and groups:
                groups.pop()
            out.append(c)
            i += 1
            continue
        elif c in "*+?.":
            out.append(c)
            i += 1
            continue
        elif c in "^$":
            out.append(f"(?m:{c})")  # Ruby syntax: ^ and $ are always line anchors
            i += 1
            continue
        elif c == "{":
            m = re.match(r"\{\d*(,\d*)?\}", pattern[i:])
            if m and m.group() != "{}":
                out.append(m.group())
                i += m.end()
                continue
        # a literal character; inside (?i:...) it stands for its case-fold class (Unicode simple folding)
        if caseless:
            f = c.casefold()
            if len(f) != 1:
                raise ValueError(f"case-insensitive literal {c!r} has a multi-character case fold")
            run += f
            variants = folds.get(f, f)
            out.append(klass(_union([(ord(v), ord(v)) for v in variants])))
        else:
            atoms.append([(ord(c), ord(c))])
            out.append(re.escape(c))
        i += 1
    end_run()
    return "".join(out)


class _Splitter:
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
        full = _translate(pattern, atoms)
        self._starts, self._proxies = _proxy_table(atoms)
        p = _translate(pattern, [], bmp_only=True) if self._starts else full
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
    edges = [e for e in edges if e <= _MAX_CP]
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
    split = _Splitter(_GPT2_SPLIT, "Isolated") if use_regex else None

    def pretokenize(s: str) -> list[str]:
        if add_prefix_space and not s.startswith(" "):
            s = " " + s
        return split(s) if split else [s]

    return pretokenize


# ---- the tokenizer -----------------------------------------------------------------------------------

class Tokenizer:
    """Byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added: list[dict],
                 pretokenizers: list, ignore_merges: bool = False, unk_token: str | None = None,
                 fuse_unk: bool = False):
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # a repeated pair keeps its last rank
        self.ignore_merges = ignore_merges
        self.unk_token, self.fuse_unk = unk_token, fuse_unk
        self.added = {t["content"]: t for t in added}
        self._pretokenizers = pretokenizers
        if len(pretokenizers) == 1:  # the usual case: skip the generic loop
            self._pretokenize = pretokenizers[0]
        self._cache: dict[str, list[int]] = {}
        # added tokens are matched as literals, the longest first at each position: a plain `re` alternation
        # tried in order of decreasing length is leftmost-longest, like `tokenizers`' Aho-Corasick
        self._added_res = []
        for normalized in (False, True):
            literals = sorted((t["content"] for t in added if t["normalized"] == normalized and t["content"]),
                              key=len, reverse=True)
            self._added_res.append(re.compile("|".join(map(re.escape, literals))) if literals else None)
        # decoding: id -> bytes. A token made of byte chars decodes to those bytes, any other (e.g. an added
        # token with a space) to its own UTF-8
        id_to_token = {i: t for t, i in vocab.items()} | {t["id"]: t["content"] for t in added}
        self._id_bytes = {i: bytes(_CHAR_BYTES[c] for c in t) if all(c in _CHAR_BYTES for c in t) else t.encode()
                          for i, t in id_to_token.items()}
        self.vocab_size = max(id_to_token, default=-1) + 1  # ids are 0 .. vocab_size - 1

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (or a folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a valid JSON file ({e})") from None
        try:
            return cls._from_spec(spec)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def _from_spec(cls, spec) -> "Tokenizer":
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict):
            raise ValueError("not a tokenizer.json (no 'model' object)")
        if model.get("type") != "BPE":
            raise ValueError(f"not a byte-level BPE tokenizer.json (model.type is {model.get('type')!r})")
        vocab, merges = model.get("vocab"), model.get("merges")
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise ValueError("model.vocab is not a {token: id} object")
        if not isinstance(merges, list):
            raise ValueError("model.merges is not a list")
        pairs = []
        for m in merges:  # "a b" strings (older files) or [a, b] pairs
            pair = m.split(" ") if isinstance(m, str) else m
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise ValueError(f"malformed merge {m!r}")
            a, b = pair
            if a not in vocab or b not in vocab or a + b not in vocab:
                raise ValueError(f"merge {m!r} uses a token that is not in the vocabulary")
            pairs.append((a, b))
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise ValueError(f"unsupported BPE option model.{key} = {model[key]!r}")
        if model.get("byte_fallback"):
            raise ValueError("unsupported BPE option model.byte_fallback = true")
        if model.get("dropout"):
            raise ValueError(f"unsupported BPE option model.dropout = {model['dropout']!r} (random merges)")
        unk = model.get("unk_token")
        if unk is not None and unk not in vocab:
            raise ValueError(f"model.unk_token {unk!r} is not in the vocabulary")
        if spec.get("normalizer") is not None:
            raise ValueError(f"unsupported normalizer {spec['normalizer'].get('type')!r} (only null)")
        decoder = spec.get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            raise ValueError(f"not a byte-level BPE tokenizer.json (decoder is {decoder.get('type')!r})")

        added = []
        for t in spec.get("added_tokens") or []:
            if not (isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int)):
                raise ValueError(f"malformed added token {t!r}")
            if t.get("single_word"):
                raise ValueError(f"added token {t['content']!r}: single_word=true is not supported")
            added.append({"id": t["id"], "content": t["content"], "lstrip": bool(t.get("lstrip")),
                          "rstrip": bool(t.get("rstrip")), "normalized": t.get("normalized", True)})
        return cls(vocab, pairs, added, cls._pretokenizers(spec.get("pre_tokenizer")),
                   ignore_merges=bool(model.get("ignore_merges")), unk_token=unk,
                   fuse_unk=bool(model.get("fuse_unk")))

    @staticmethod
    def _pretokenizers(spec) -> list:
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
                    out.append(_Splitter(pattern["Regex"], step.get("behavior")))
                elif "String" in pattern:
                    out.append(_Splitter(re.escape(pattern["String"]), step.get("behavior")))
                else:
                    raise ValueError(f"malformed Split pattern {pattern!r}")
            elif kind == "ByteLevel":
                raise ValueError("unsupported pre-tokenizer order: ByteLevel must come last")
            else:
                raise ValueError(f"unsupported pre-tokenizer type {kind!r} (only Split and a final ByteLevel)")
        return out

    # ---- encoding ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added/special tokens written in the text become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # `tokenizers` refuses these too (TypeError)
                raise ValueError(f"text has a lone surrogate U+{ord(text[e.start]):04X} at index {e.start}; "
                                 "it cannot be encoded as UTF-8") from None
        ids: list[int] = []
        cache, bpe = self._cache, self._bpe
        for piece, added_id in self._split_added(text):
            if added_id is not None:
                ids.append(added_id)
                continue
            for word in self._pretokenize(piece):
                word_ids = cache.get(word)
                if word_ids is None:
                    word_ids = bpe(word)
                    if len(cache) >= _CACHE_WORDS:
                        cache.clear()
                    cache[word] = word_ids
                ids += word_ids
        return ids

    def _split_added(self, text: str) -> list[tuple[str, int | None]]:
        """Cut added tokens out of the text: (piece, None) for plain text, (token, id) for an added token."""
        pieces = [(text, None)]
        for pattern in self._added_res:
            if pattern is not None:
                pieces = [p for piece, i in pieces
                          for p in ([(piece, i)] if i is not None else self._find_added(piece, pattern))]
        return pieces

    def _find_added(self, text: str, pattern: re.Pattern) -> list[tuple[str, int | None]]:
        whitespace = _WHITESPACE_CHARS
        out, done = [], 0
        for m in pattern.finditer(text):
            token = self.added[m.group()]
            start, stop = m.span()
            if token["lstrip"]:  # the token swallows the whitespace before it ...
                while start > done and text[start - 1] in whitespace:
                    start -= 1
            if token["rstrip"]:  # ... and/or after it
                while stop < len(text) and text[stop] in whitespace:
                    stop += 1
            if done < start:
                out.append((text[done:start], None))
            out.append((text[start:stop], token["id"]))
            done = stop
        if done < len(text):
            out.append((text[done:], None))
        return out

    def _pretokenize(self, text: str) -> list[str]:
        pieces = [text]
        for step in self._pretokenizers:
            pieces = [p for piece in pieces for p in step(piece)]
        return pieces

    def _bpe(self, word: str) -> list[int]:
        """BPE ids of one pre-token (cache miss path)."""
        vocab = self.vocab
        chars = word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_CHARS)
        if self.ignore_merges and chars in vocab:
            return [vocab[chars]]
        symbols: list[str] = []
        prev_unk = False
        for c in chars:  # a char missing from the vocabulary becomes unk, or is dropped when there is none
            if c in vocab:
                symbols.append(c)
                prev_unk = False
            elif self.unk_token is not None:
                if not (self.fuse_unk and prev_unk):
                    symbols.append(self.unk_token)
                prev_unk = True
        return [vocab[s] for s in self._merge(symbols)]

    def _merge(self, symbols: list[str | None]) -> list[str]:
        """Apply merges the way `tokenizers` does: always the lowest-rank pair, the leftmost on ties.

        A heap of (rank, left position) over a linked list keeps this O(n log n) for long words; heap
        entries whose pair has since changed are stale and skipped.
        """
        ranks, n = self.ranks, len(symbols)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        nxt[-1:] = [-1]
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((symbols[i], symbols[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if symbols[i] is None or j < 0 or ranks.get((symbols[i], symbols[j])) != rank:
                continue  # stale
            merged = symbols[i] = symbols[i] + symbols[j]
            symbols[j] = None
            k = nxt[i] = nxt[j]
            if k >= 0:
                prv[k] = i
                if (r := ranks.get((merged, symbols[k]))) is not None:
                    heapq.heappush(heap, (r, i))
            p = prv[i]
            if p >= 0 and (r := ranks.get((symbols[p], merged))) is not None:
                heapq.heappush(heap, (r, p))
        return [s for s in symbols if s is not None]

    # ---- decoding and lookup -----------------------------------------------------------------------

    def decode(self, ids) -> str:
        """Text of `ids` (special tokens kept); unknown ids are skipped, broken UTF-8 becomes U+FFFD."""
        get = self._id_bytes.get
        return b"".join(get(int(i), b"") for i in ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. '<|im_end|>'), or None."""
        added = self.added.get(token)
        return added["id"] if added else self.vocab.get(token)


_WHITESPACE_CHARS = frozenset(chr(c) for lo, hi in _parse_ranges(_WHITESPACE) for c in range(lo, hi + 1))
