"""Byte-level BPE text tokenizer that reads a Hugging Face `tokenizer.json` and encodes/decodes exactly like
the `tokenizers` library (encode with add_special_tokens=False, decode with skip_special_tokens=False).

Standard library only. Pipeline of `tokenizers`, reproduced step by step:
  1. added tokens are cut out of the text as literals (leftmost-longest; non-normalized ones first),
  2. each remaining piece is pre-tokenized (pretokenizer.py): Split regexes, then ByteLevel (bytes -> chars),
  3. each pre-token is BPE-merged (lowest merge rank first, leftmost on ties), with a per-word cache.
Features we do not implement raise a ValueError at load time.
"""

import heapq
import json
import re
from pathlib import Path

from oniguruma import WHITESPACE_CHARS
from pretokenizer import pretokenizers

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
        return cls(vocab, pairs, added, pretokenizers(spec.get("pre_tokenizer")),
                   ignore_merges=bool(model.get("ignore_merges")), unk_token=unk,
                   fuse_unk=bool(model.get("fuse_unk")))

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
        whitespace = WHITESPACE_CHARS
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
