"""Parity of tokenizer.py with Hugging Face `tokenizers` on LFM2-shaped tokenizer.json files.

Exact equality everywhere (ids, decoded strings, splits): the tolerance is zero.
"""

import json
import random
import unicodedata
from pathlib import Path

import pytest

from conftest import LFM2_SPLIT, SPECIALS, write_tokenizer
from tokenizer import Tokenizer, _Splitter

_TOKENIZER_EXTRA = "ĠZqxjwv"  # a vocab entry no merge builds: only ignore_merges=true yields it whole


def _tokenizer_variant(src: Path, dst: Path, ignore_merges: bool) -> Path:
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["model"]["ignore_merges"] = ignore_merges
    spec["model"]["vocab"][_TOKENIZER_EXTRA] = len(spec["model"]["vocab"])
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return dst / "tokenizer.json"


@pytest.fixture(scope="module")
def tokenizer_files(tokenizer_dir, tmp_path_factory) -> dict:
    """{(merges format, ignore_merges): tokenizer.json}: "a b" strings and [a, b] pairs, both merge modes."""
    pairs_dir = tmp_path_factory.mktemp("tokenizer_pairs")
    write_tokenizer(pairs_dir, merges_as_pairs=True)
    assert isinstance(json.loads((pairs_dir / "tokenizer.json").read_text())["model"]["merges"][0], list)
    assert isinstance(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"][0], str)
    out = {}
    for fmt, folder in (("strings", tokenizer_dir), ("pairs", pairs_dir)):
        for ignore in (False, True):
            out[fmt, ignore] = _tokenizer_variant(folder, tmp_path_factory.mktemp(f"tok_{fmt}_{ignore}"), ignore)
    return out


def _tokenizer_pair(path: Path):
    from tokenizers import Tokenizer as HFTokenizer
    return Tokenizer.from_file(path), HFTokenizer.from_file(str(path))


# ---- the corpus ------------------------------------------------------------------------------------

_TOKENIZER_CURATED = [
    "", " ", "Hello world", "Hello, world! How are you today?", "  leading and trailing  ", "a  b   c    d",
    "The quick brown fox jumps over the lazy dog.", "e.g. i.e. U.S.A. Mr. Smith's 3rd-floor flat",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "if __name__ == '__main__':\n\tmain()\r\n", "x=[1,2,3];y={'a':1}", "<div class=\"x\">&amp;</div>",
    "\n", "\n\n", "\n\n\n\n", "\r\n", "\r\n\r\n", "\r", "\t", "\t\t\tx", " \n ", "  \n\n  x", "a\n\n\nb",
    "a \n b", "x  \t\n\r\n  y", "end.   ", "   ", "\u3000\u3000x", "a\u00a0b", "a\u2028b\u2029c", "a\x85b",
    "\x1c\x1d\x1e\x1f", " \x1c x", "a\x1fb \x1f", "\x0b\x0c", "\u180e \u200b\u200c\u200d\u2060\ufeff",
    "\x00\x01\x02\x7f\x80\x9f", "tab\there", "mixed \t \n \r \x0b \x0c end",
    "café naïve résumé Ünïcödé", "e\u0301 a\u0308 n\u0303o", "\u0301\u0301 alone", "Zalgo z\u0336\u0337\u0338a",
    "東京都 北京 こんにちは世界 한국어 텍스트", "中文,标点。符号!", "مرحبا بالعالم ١٢٣", "שלום עולם",
    "नमस्ते दुनिया १२३", "สวัสดีชาวโลก", "Привет, мир! ΑΒΓ αβγ", "Ⅻ ⅻ ½ ¾ ² ³ ①②",
    "👩‍👩‍👧 👍🏽 👨🏿‍💻 🏳️‍🌈 🇫🇷🇯🇵 1️⃣ #️⃣ ❤️", "😀😃😄 😁", "emoji😀inside", "🧑🏻‍🤝‍🧑🏿",
    "𝐀𝐁𝐂 𝟏𝟐𝟑 𠀀𠀁 \U000105c0\U000105c1 \U00010d40\U00010d41 \U0001e4d0 \U00031350",
    "\U0010fffd\U000e0001\U000f0000", "'\U000105c0 '\U0001d400", "\ufffd\ufffe\uffff",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", "a<|im_end|>b", "<|im_start|>user\n",
    "<|startoftext|><|startoftext|>", "x<|pad|>y<|reserved_5|>z", "<|im_end", "<|im_end|", "<<|im_end|>>",
    "< |im_end|>", "<|IM_END|>", " <|text_end|> ", "<|audio_start|><|text_start|>hi<|text_end|>",
    "Respond with interleaved text and audio.", "Perform ASR.", "Perform TTS. Use the UK female voice.",
]


def _tokenizer_numbers(rng: random.Random) -> list[str]:
    out = []
    for n in range(1, 31):
        digits = "".join(rng.choice("0123456789") for _ in range(n))
        out += [digits, f"x{digits}", f" {digits} ", f"{digits}.{digits[::-1]}", f"-{digits},{n}", f"v{n}.{digits}"]
    return out + ["3.14159", "1,000,000", "1e-10", "0x1F", "١٢٣٤٥", "१२३४", "٣.١٤", "12abc34", "a1b22c333d4444"]


def _tokenizer_contractions() -> list[str]:
    out = []
    for c in ("s", "t", "re", "ve", "m", "ll", "d"):
        variants = {""}
        for ch in c:
            variants = {v + x for v in variants for x in (ch, ch.upper())}
        for v in sorted(variants):
            out += [f"it'{v}", f"'{v}", f"they'{v} here", f"X'{v}'{v}", f"'{v}x", f" '{v}", f"1'{v}"]
    return out + ["'ſ", "it'ſ", "'ſome", "IT'ſT", "'K", "'Kx", "'\u212a", "don't", "DON'T", "I'm", "I'M",
                  "we'Ll", "you'rE", "'", "''", "'''s"]


_TOKENIZER_FRAGMENTS = ["the", " of", "and", "Hello", " ", "  ", "\n", "\n\n", "\t", "\r\n", "'s", "'LL", "'Re",
                        ".", ",", "!?", "...", "(", ")", "{", "}", "==", "->", "_", "#", "$", "%", "123", "4",
                        "56789", "é", "e\u0301", "東", "字", "ب", "😀", "👍🏽", "\u200d", "\u3000", "\x1c", "\xa0",
                        "<|im_end|>", "<|im_start|>", "<|pad|>", "<|", "|>"]


def _tokenizer_stdlib_lines(n: int = 800) -> list[str]:
    """English prose and code: lines of a few standard library modules (with their indentation)."""
    import argparse
    import textwrap
    lines = []
    for module in (argparse, textwrap, random):
        lines += [l for l in Path(module.__file__).read_text(encoding="utf-8").splitlines(keepends=True) if l.strip()]
    return lines[:n]


def _tokenizer_random_char(rng: random.Random) -> str:
    plane = rng.choice([0, 0, 0, 0, 1, 1, 2, 3, 14, 15, 16])
    while True:
        cp = plane * 0x10000 + rng.randrange(0x10000)
        if not 0xD800 <= cp < 0xE000 and cp <= 0x10FFFF:
            return chr(cp)


def _tokenizer_corpus(seed: int = 0, n_random: int = 9000) -> list[str]:
    """Deterministic test strings: curated cases, numbers, contractions, and random mixtures of fragments
    and code points from all planes (surrogates excluded: they are tested apart)."""
    rng = random.Random(seed)
    corpus = _TOKENIZER_CURATED + _tokenizer_numbers(rng) + _tokenizer_contractions() + _tokenizer_stdlib_lines()
    corpus += [chr(c) + chr(c) + " x" for c in range(0x20)] + [f"a{chr(c)}b" for c in range(0x80, 0x100)]
    for _ in range(n_random):
        parts = []
        for _ in range(rng.randint(1, 8)):
            kind = rng.random()
            if kind < 0.35:
                parts.append(rng.choice(_TOKENIZER_FRAGMENTS))
            elif kind < 0.65:
                parts.append("".join(_tokenizer_random_char(rng) for _ in range(rng.randint(1, 4))))
            elif kind < 0.8:
                parts.append(rng.choice(" \t\n\r\x0b\x0c\x85\xa0\u2028\u3000\x1c\x1f") * rng.randint(1, 5))
            else:
                parts.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'0123456789")
                                     for _ in range(rng.randint(1, 10))))
        corpus.append("".join(parts))
    return corpus


# ---- tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["strings", "pairs"])
@pytest.mark.parametrize("ignore_merges", [False, True])
def test_tokenizer_encode_decode_parity(tokenizer_files, fmt, ignore_merges):
    """Identical ids on every corpus string (tolerance: none); decode equals `tokenizers`' decode."""
    ours, hf = _tokenizer_pair(tokenizer_files[fmt, ignore_merges])
    corpus = _tokenizer_corpus()
    assert len(corpus) >= 10_000
    expected = [e.ids for e in hf.encode_batch(corpus, add_special_tokens=False)]
    mismatches = [(s, ours.encode(s), e) for s, e in zip(corpus, expected) if ours.encode(s) != e]
    assert not mismatches, f"{len(mismatches)} strings differ, first: {mismatches[:3]}"
    round_trips = 0
    for s, ids in zip(corpus, expected):
        theirs = hf.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == theirs, repr(s)
        round_trips += theirs == s
        if theirs == s:
            assert ours.decode(ours.encode(s)) == s, repr(s)
    assert round_trips == len(corpus), f"only {round_trips}/{len(corpus)} round-trip in `tokenizers`"
    # the extra vocab entry shows that the mode matters: whole under ignore_merges, else merged from parts
    extra = hf.encode(" Zqxjwv", add_special_tokens=False).ids
    assert ours.encode(" Zqxjwv") == extra and (len(extra) == 1) == ignore_merges


@pytest.mark.parametrize("pre_tokenizer", [
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},  # GPT-2
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": False},
        {"type": "Split", "pattern": {"Regex": r"\p{N}|[.,]+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}]},
])
def test_tokenizer_other_pre_tokenizers(tokenizer_dir, tmp_path, pre_tokenizer):
    """ByteLevel's own regex and prefix space, Removed splits and string patterns also match `tokenizers`."""
    path = _tokenizer_edited(tokenizer_dir, tmp_path, lambda s: s.update(pre_tokenizer=pre_tokenizer))
    ours, hf = _tokenizer_pair(path)
    corpus = _tokenizer_corpus(seed=2, n_random=2000)
    expected = [e.ids for e in hf.encode_batch(corpus, add_special_tokens=False)]
    assert [ours.encode(s) for s in corpus] == expected


def test_tokenizer_decode_arbitrary_ids(tokenizer_files):
    """Random id lists (broken UTF-8, special tokens, out-of-vocabulary ids) decode like `tokenizers`."""
    ours, hf = _tokenizer_pair(tokenizer_files["strings", False])
    rng = random.Random(1)
    n = hf.get_vocab_size()
    for _ in range(3000):
        ids = [rng.randrange(n) for _ in range(rng.randint(0, 12))]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), ids
        noisy = ids + [n, n + 7, 10**9]  # unknown ids: `tokenizers` skips them
        rng.shuffle(noisy)
        assert ours.decode(noisy) == hf.decode(noisy, skip_special_tokens=False), noisy
        assert ours.decode([-1, *ids, -5]) == ours.decode(ids)  # negative ids: skipped, no crash
    byte_ids = [ours.token_to_id(c) for c in "ÃĢ¤ġ"]  # lone UTF-8 lead/continuation bytes -> U+FFFD
    assert ours.decode(byte_ids) == hf.decode(byte_ids, skip_special_tokens=False) and "\ufffd" in ours.decode(byte_ids)


def test_tokenizer_lookup_and_vocab_size(tokenizer_files):
    ours, hf = _tokenizer_pair(tokenizer_files["pairs", False])
    assert ours.vocab_size == hf.get_vocab_size()
    for token in SPECIALS + ["Ġthe", "e", "Ġ", "not-a-token", "<|im_end", ""]:
        assert ours.token_to_id(token) == hf.token_to_id(token), token
    assert ours.token_to_id("<|im_end|>") == 7 and ours.token_to_id("<|text_end|>") == 130


def test_tokenizer_split_all_of_unicode():
    """The Split regex (\\p{L}, \\p{N}, \\s, (?i:'s)) splits text holding every code point like Oniguruma."""
    from tokenizers import Regex, pre_tokenizers
    theirs = pre_tokenizers.Split(Regex(LFM2_SPLIT), behavior="isolated")
    ours = _Splitter(LFM2_SPLIT, "Isolated")
    # every code point of the planes where characters are assigned (0-3, 14); a sample of the others
    # (unassigned and private use); surrogates cannot be in a str that `tokenizers` accepts
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000 and (c >> 16 in (0, 1, 2, 3, 14) or c % 61 == 0)]
    assert len(cps) > 330_000
    for start in range(0, len(cps), 100_000):
        text = "".join(f"{chr(c)}1'{chr(c)}a{chr(c)} " for c in cps[start:start + 100_000])  # "1'" -> (?i:'s)
        assert ours(text) == [p for p, _ in theirs.pre_tokenize_str(text)], f"chunk at {start}"


def test_tokenizer_added_token_flags(tokenizer_dir, tmp_path):
    """lstrip / rstrip / normalized added tokens, and a non-special one, match like `tokenizers`."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    for t in spec["added_tokens"]:
        if t["content"] == "<|im_start|>":
            t["lstrip"] = True
        if t["content"] == "<|im_end|>":
            t["rstrip"] = True
        if t["content"] == "<|pad|>":
            t["normalized"], t["special"] = True, False
    spec["added_tokens"].append({"id": 4000, "content": "hello world", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": False})
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    ours, hf = _tokenizer_pair(path)
    for s in ["a  <|im_start|>b", "\n\t<|im_start|>", "x<|im_end|>  \n y", "<|im_end|>\u3000<|im_start|>",
              "  <|im_end|>   <|im_start|>  ", "<|pad|> a<|pad|>", "say hello world!", "hello worldhello world",
              "<|im_end|><|pad|>  <|im_start|>hello world <|im_end|>"]:
        ids = hf.encode(s, add_special_tokens=False).ids
        assert ours.encode(s) == ids, s
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), s


def test_tokenizer_lone_surrogate(tokenizer_dir):
    """`tokenizers` refuses a str with a lone surrogate (TypeError); we refuse it with a clear ValueError."""
    ours, hf = _tokenizer_pair(tokenizer_dir / "tokenizer.json")
    for s in ["\ud800", "ab\udfffc", "x\ud83d"]:
        with pytest.raises(TypeError):
            hf.encode(s, add_special_tokens=False)
        with pytest.raises(ValueError, match="lone surrogate U\\+D[89ABCDEF]"):
            ours.encode(s)
    assert ours.encode("\ud83d\ude00".encode("utf-16", "surrogatepass").decode("utf-16")) == ours.encode("😀")


def _tokenizer_edited(src: Path, tmp_path: Path, edit) -> Path:
    spec = json.loads((src / "tokenizer.json").read_text())
    edit(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["model"].update(type="WordPiece"),
     r"not a byte-level BPE tokenizer.json \(model.type is 'WordPiece'\)"),
    (lambda s: s.pop("model"), r"not a tokenizer.json \(no 'model' object\)"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), r"pre-tokenizer does not end with ByteLevel"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"].insert(0, {"type": "Digits", "individual_digits": True}),
     r"unsupported pre-tokenizer type 'Digits'"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\p{Han}+|\s+"),
     r"unsupported regex property"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\d+|\s+"),
     r"unsupported regex escape '\\\\d'"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"][0].update(behavior="MergedWithNext"),
     r"unsupported Split behavior 'MergedWithNext'"),
    (lambda s: s.update(normalizer={"type": "NFC"}), r"unsupported normalizer 'NFC'"),
    (lambda s: s.update(decoder={"type": "WordPiece"}), r"decoder is 'WordPiece'"),
    (lambda s: s["added_tokens"][0].update(single_word=True), r"'<\|pad\|>': single_word=true is not supported"),
    (lambda s: s["model"]["merges"].append("Ġ nonexistent"), r"not in the vocabulary"),
    (lambda s: s["model"]["merges"].append("a b c"), r"malformed merge 'a b c'"),
    (lambda s: s["model"].update(byte_fallback=True), r"byte_fallback"),
])
def test_tokenizer_bad_file_errors(tokenizer_dir, tmp_path, edit, message):
    path = _tokenizer_edited(tokenizer_dir, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as e:
        Tokenizer.from_file(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_tokenizer_missing_and_broken_files(tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/tokenizer.json: tokenizer file not found"):
        Tokenizer.from_file(tmp_path / "nowhere" / "tokenizer.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": ')
    with pytest.raises(ValueError, match="broken.json: not a valid JSON file"):
        Tokenizer.from_file(broken)
    assert Tokenizer.from_file(tokenizer_dir).encode("hi there") == \
        Tokenizer.from_file(tokenizer_dir / "tokenizer.json").encode("hi there")  # a folder works too
    with pytest.raises(TypeError, match="expects a str"):
        Tokenizer.from_file(tokenizer_dir).encode(b"bytes")


def test_tokenizer_unicode_tables_cover_new_characters():
    """Our \\p{L}/\\p{N} add the Unicode 15-16 letters/numbers that this Python's unicodedata lacks."""
    ours = _Splitter(r"\p{L}+|\p{N}+|[^\p{L}\p{N}]+", "Isolated")
    for ch, kind in [("\U000105c0", "L"), ("\U00031350", "L"), ("\U00010d40", "N"), ("\U0001e5f1", "N")]:
        assert ours(f"a{ch}") == ([f"a{ch}"] if kind == "L" else ["a", ch])
        assert ours(f"1{ch}") == ([f"1{ch}"] if kind == "N" else ["1", ch])
    assert unicodedata.category("\x1c") == "Cc" and "\x1c".isspace()  # Python's \s takes it; White_Space not
    assert _Splitter(r"\s+", "Removed")("a\x1cb c\u3000d") == ["a\x1cb", "c", "d"]
