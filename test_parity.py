"""Parity with the official liquid-audio 1.3.0 package, part by part, on the same random weights (float32, CPU).

Checkpoint folders in the real Hugging Face layout and helpers around the official package live in
`.ci/fixtures.py`; the pytest fixtures in conftest.py.
Each comparison states its tolerance; greedy streams must be identical.
"""

import copy
import fcntl
import gc
import io
import json
import math
import random
import re
import shutil
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import audio
import conformer
import fixtures
import lfm2audio
import run
import tasks
import transcribe
from batch import Batch, Sequence, generate_batch
from compiled import compile_decode
from conftest import add_turn, official, record_prefills, run_ok
from detokenizer import DELAY, Detokenizer
from detokenizer import FRAME_SIZE as DETOK_FRAME_SIZE
from fixtures import (
    ASSETS,
    DETOKENIZER_DIR,
    END_OF_AUDIO,
    FULL_CONFIG,
    LFM2_SPLIT,
    MIMI_FILE,
    PROMPTS,
    SPECIALS,
    TEXT_END,
    TINY_CONFIG,
    build_prompt,
    cached_checkpoint,
    load_official,
    load_wav,
    mimi_file_tensors,
    official_append,
    official_generate,
    official_processor_cpu,
    official_prompt,
    stream_events,
    write_mimi,
    write_tokenizer,
)
from lfm2audio import Sampling
from mimi import CARDINALITY, FRAME_SIZE, Mimi, N_CODEBOOKS
from pretokenizer import Splitter
from sound import respond
from tokenizer import Tokenizer


# ====================================================================================================
# Text tokenizer
#
# Parity of tokenizer.py with Hugging Face `tokenizers` on LFM2-shaped tokenizer.json files.
#
# Exact equality everywhere (ids, decoded strings, splits): the tolerance is zero.
# ====================================================================================================

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


_TOKENIZER_CURATED = [
    "", " ", "Hello world", "Hello, world! How are you today?", "  leading and trailing  ", "a  b   c    d",
    "The quick brown fox jumps over the lazy dog.", "e.g. i.e. U.S.A. Mr. Smith's 3rd-floor flat",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "if __name__ == '__main__':\n\tmain()\r\n", "x=[1,2,3];y={'a':1}", "<div class=\"x\">&amp;</div>",
    "\n", "\n\n", "\n\n\n\n", "\r\n", "\r\n\r\n", "\r", "\t", "\t\t\tx", " \n ", "  \n\n  x", "a\n\n\nb",
    "a \n b", "x  \t\n\r\n  y", "end.   ", "   ", "\u3000\u3000x", "a\u00a0b", "a\u2028b\u2029c", "a\x85b",
    "\x1c\x1d\x1e\x1f", " \x1c x", "a\x1fb \x1f", "\x0b\x0c", "\u180e \u200b\u200c\u200d\u2060\ufeff",
    "\x00\x01\x02\x7f\x80\x9f", "tab\there", "mixed \t \n \r \x0b \x0c end",
    "café naïve résumé Ünïcödé", "e\u0301 a\u0308 n\u0303o", "\u0301\u0301 alone",
    "Zalgo z\u0336\u0337\u0338a",
    "東京都 北京 こんにちは世界 한국어 텍스트", "中文,标点。符号!",
    "مرحبا بالعالم ١٢٣", "שלום עולם",
    "नमस्ते दुनिया १२३", "สวัสดีชาวโลก",
    "Привет, мир! ΑΒΓ αβγ", "Ⅻ ⅻ ½ ¾ ² ³ ①②",
    "👩‍👩‍👧 👍🏽 👨🏿‍💻 🏳️‍🌈 🇫🇷🇯🇵 1️⃣ #️⃣ ❤️",
    "😀😃😄 😁", "emoji😀inside", "🧑🏻‍🤝‍🧑🏿",
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
    return out + ["3.14159", "1,000,000", "1e-10", "0x1F", "١٢٣٤٥", "१२३४", "٣.١٤", "12abc34",
                  "a1b22c333d4444"]


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
                        "56789", "é", "e\u0301", "東", "字", "ب", "😀", "👍🏽", "\u200d", "\u3000", "\x1c",
                        "\xa0",
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
    ours = Splitter(LFM2_SPLIT, "Isolated")
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
    ours = Splitter(r"\p{L}+|\p{N}+|[^\p{L}\p{N}]+", "Isolated")
    for ch, kind in [("\U000105c0", "L"), ("\U00031350", "L"), ("\U00010d40", "N"), ("\U0001e5f1", "N")]:
        assert ours(f"a{ch}") == ([f"a{ch}"] if kind == "L" else ["a", ch])
        assert ours(f"1{ch}") == ([f"1{ch}"] if kind == "N" else ["1", ch])
    assert unicodedata.category("\x1c") == "Cc" and "\x1c".isspace()  # Python's \s takes it; White_Space not
    assert Splitter(r"\s+", "Removed")("a\x1cb c\u3000d") == ["a\x1cb", "c", "d"]


# ====================================================================================================
# Audio front end and encoder: resampler, mel, FastConformer, adapter
#
# Audio in (conformer.py) against the official liquid-audio code: resampler, mel front end, encoder, adapter.
#
# The official encoder and ours are built once per module at the real encoder config with the same random
# weights (every parameter and BatchNorm buffer randomised).
# ====================================================================================================

_CONFORMER_CFG = FULL_CONFIG  # the real config.json


# the recordings are mono: `(wave,), sr = load_wav(path)` takes the one channel of [1, T] (and checks it is one)
_CONFORMER_LFM_DIM = _CONFORMER_CFG["lfm"]["hidden_size"]


def _conformer_randomise(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter and buffer with non-trivial random values (fan-in scaled, so 17 layers stay finite)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():  # these tensors share storage with the module's
            if not t.is_floating_point():
                t.fill_(7)  # BatchNorm num_batches_tracked
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0, generator=g)
            elif t.dim() >= 2:
                t.normal_(0.0, t[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight"):  # LayerNorm / BatchNorm scales
                t.normal_(1.0, 0.2, generator=g)
            else:  # biases, running means
                t.normal_(0.0, 0.2, generator=g)


@pytest.fixture(scope="module")
def _conformer_models():
    """(official encoder, official adapter, our encoder, our adapter), same random weights, eval mode."""
    official()
    from liquid_audio.model.conformer.encoder import ConformerEncoder
    from liquid_audio.model.mlp import MLP

    ref = ConformerEncoder(**_CONFORMER_CFG["encoder"]).eval()
    ref_adapter = MLP(ref._feat_out, _CONFORMER_LFM_DIM, [_CONFORMER_LFM_DIM]).eval()  # as LFM2AudioModel
    _conformer_randomise(ref, 1)
    _conformer_randomise(ref_adapter, 2)
    ours = conformer.ConformerEncoder(conformer.EncoderConfig.from_dict(_CONFORMER_CFG["encoder"])).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    adapter = conformer.AudioAdapter(ref._feat_out, _CONFORMER_LFM_DIM).eval()
    adapter.load_state_dict(ref_adapter.state_dict(), strict=True)
    return ref, ref_adapter, ours, adapter


@pytest.fixture(scope="module")
def _conformer_preprocessor():
    official()
    from liquid_audio.model.conformer.processor import AudioToMelSpectrogramPreprocessor

    return AudioToMelSpectrogramPreprocessor(**_CONFORMER_CFG["preprocessor"]).eval()


def _conformer_official_mel(proc, wave: torch.Tensor, sr: int) -> torch.Tensor:
    """The official ChatState.add_audio front end: resample to 16 kHz, full length, mel [128, T]."""
    import torchaudio.functional

    wave = torchaudio.functional.resample(wave[None], sr, 16000)
    mel, _ = proc(wave, torch.tensor([wave.shape[1]]))
    return mel[0]


def _conformer_official_encode(ref, ref_adapter, mels: list[torch.Tensor]):
    """The official LFM2AudioModel._prefill audio path: pad, encode, drop padding, adapt."""
    lengths = torch.tensor([m.shape[1] for m in mels])
    padded = torch.nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True).mT
    with torch.no_grad():
        enc, enc_len = ref(padded, lengths)  # [B, D, T']
        keep = torch.arange(enc.shape[-1])[None] < enc_len[:, None]
        emb = ref_adapter(enc.mT[keep])
    return enc.mT, enc_len, emb


def _conformer_encode(ours, adapter, mels: list[torch.Tensor]):
    batch, lengths = conformer.pad_mels(mels)
    with torch.no_grad():
        h, h_len = ours(batch, lengths)
        keep = torch.arange(h.shape[1])[None] < h_len[:, None]
        emb = adapter(h[keep])
    return h, h_len, emb


@pytest.mark.parametrize("orig_sr,new_sr", [(44100, 16000), (48000, 16000), (8000, 16000), (22050, 16000),
                                            (16000, 24000)])
def test_conformer_resample_matches_torchaudio(orig_sr, new_sr):
    official()
    import torchaudio.functional

    g = torch.Generator().manual_seed(orig_sr)
    wave = torch.randn(2, 3, orig_sr // 2 + 17, generator=g)  # batch dims and a length that is not a multiple
    ref = torchaudio.functional.resample(wave, orig_sr, new_sr)
    ours = audio.resample(wave, orig_sr, new_sr)
    assert ours.shape == ref.shape
    # tolerance: none, the same float32 operations in the same order (measured bit-identical)
    assert torch.equal(ours, ref), f"resample {orig_sr}->{new_sr}: max abs diff {(ours - ref).abs().max()}"


@pytest.mark.parametrize("orig_sr", [44100, 22050, 11025])
def test_conformer_resample_lengths_match_torchaudio(orig_sr):
    # torchaudio rounds new * T / orig to float32 before the ceil, so some lengths come out one sample
    # shorter than the exact ceil. Scan lengths where that can happen (new * T mod orig is 1..3, outputs
    # above 2**16 samples) and random ones; lengths and values must equal torchaudio's exactly.
    official()
    import torchaudio.functional

    g = torch.Generator().manual_seed(orig_sr)
    wave = torch.randn(420_000, generator=g)
    if orig_sr == 44100:
        assert torchaudio.functional.resample(wave[:200_101], 44100, 16000).shape[-1] == 72599
        assert audio.resample(wave[:200_101], 44100, 16000).shape[-1] == 72599
    gcd = math.gcd(orig_sr, 16000)
    orig, new = orig_sr // gcd, 16000 // gcd
    risky = [n for n in range(100_000, 420_000) if 0 < new * n % orig <= 3]
    lengths = [risky[int(i)] for i in torch.randint(len(risky), (30,), generator=g)]
    lengths += torch.randint(1, 420_000, (70,), generator=g).tolist()
    shorter = 0
    for n in lengths:
        ref = torchaudio.functional.resample(wave[:n], orig_sr, 16000)
        ours = audio.resample(wave[:n], orig_sr, 16000)
        assert ours.shape == ref.shape, f"{n} samples at {orig_sr} Hz: length {ours.shape[-1]} != {ref.shape[-1]}"
        assert torch.equal(ours, ref), f"{n} samples at {orig_sr} Hz: max abs diff {(ours - ref).abs().max()}"
        shorter += ref.shape[-1] < -(-new * n // orig)
    assert shorter > 0, "the scan should include lengths where torchaudio's float32 rounding drops a sample"


def test_conformer_resample_rejects_huge_kernel():
    # 44101 Hz shares no factor with 16000: the filter bank would be [16000, 1, 44135] (~2.8 GB)
    with pytest.raises(ValueError, match=r"44101 Hz -> 16000 Hz.*convert"):
        audio.resample(torch.zeros(1000), 44101, 16000)
    with pytest.raises(ValueError, match=r"7999 Hz -> 16000 Hz"):
        audio.audio_features(torch.zeros(1000), 7999)
    assert audio.resample(torch.zeros(1000), 44000, 16000).shape == (364,)  # a common factor: fine


def test_conformer_mel_filters_match_official(_conformer_preprocessor):
    ref = _conformer_preprocessor.featurizer.fb[0]  # librosa.filters.mel, slaney
    ours = audio.mel_filters()
    # tolerance: none, the weights are rounded as librosa rounds them
    assert ours.dtype == ref.dtype
    assert torch.equal(ours, ref), f"mel filterbank: max abs diff {(ours - ref).abs().max()}"


def _conformer_write_stereo(tmp_path):
    """A 22.05 kHz 16-bit stereo file whose channels differ -> (path, expected mono wave, sr)."""
    (speech,), sr = load_wav(ASSETS / "question.wav")
    speech = audio.resample(speech[: 2 * sr], sr, 22050).numpy()
    left, right = speech, 0.5 * np.roll(speech, 300) + 0.05 * np.sin(np.arange(speech.size) * 0.05)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], 1).clip(-1, 1), 22050, subtype="PCM_16")
    data, _ = sf.read(str(path), dtype="float32")  # [T, 2], quantised
    return path, torch.from_numpy(data.mean(1, dtype=np.float32)), 22050


def _conformer_assert_same_mel(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    # float32: max abs diff <= 1e-4 (measured 0: the same operations in the same order); after the
    # official ChatState's bf16 rounding: exactly equal, so the encoder sees the very same input
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"mel {what}: max abs diff {diff} > 1e-4"
    n = (ours.bfloat16() != ref.bfloat16()).sum().item()
    assert n == 0, f"mel {what}: {n} of {ref.numel()} entries differ after bf16 rounding"


@pytest.mark.parametrize("case", ["question", "asr_44k", "stereo", "clip_0.2s", "long_30s"])
def test_conformer_mel_matches_official(case, _conformer_preprocessor, tmp_path):
    if case == "question":
        wave, sr = audio.load_audio(ASSETS / "question.wav")
        (ref_wave,), _ = load_wav(ASSETS / "question.wav")
    elif case == "asr_44k":
        wave, sr = audio.load_audio(ASSETS / "asr.wav")
        (ref_wave,), _ = load_wav(ASSETS / "asr.wav")
    elif case == "stereo":
        path, ref_wave, _ = _conformer_write_stereo(tmp_path)
        wave, sr = audio.load_audio(path)
    elif case == "clip_0.2s":
        (ref_wave,), sr = load_wav(ASSETS / "question.wav")
        ref_wave = ref_wave[16000: 16000 + 3200]
        wave = ref_wave
    else:  # 30 s at 44.1 kHz: asr.wav repeated
        (ref_wave,), sr = load_wav(ASSETS / "asr.wav")
        ref_wave = ref_wave.repeat(2)[: 30 * sr]
        wave = ref_wave
    assert torch.equal(wave, ref_wave), "load_audio must give soundfile's float samples (channel mean)"
    ref = _conformer_official_mel(_conformer_preprocessor, ref_wave, sr)
    ours = audio.audio_features(wave, sr)
    assert ours.shape == ref.shape == (conformer.N_MELS, 1 + audio.resample(wave, sr, 16000).numel() // 160)
    _conformer_assert_same_mel(ours, ref, case)
    assert ref.abs().max() > 1, "the mel should not be trivial"


def _conformer_check(ref_out, our_out, what):
    (r_h, r_len, r_emb), (h, h_len, emb) = ref_out, our_out
    assert torch.equal(h_len, r_len.to(torch.long)), f"{what}: output lengths {h_len} != {r_len}"
    assert h.shape == r_h.shape and emb.shape == r_emb.shape
    for name, a, b in [("encoder", h, r_h), ("adapter", emb, r_emb)]:
        scale = b.abs().max().item()
        diff = (a - b).abs().max().item()
        assert diff <= 1e-4 * scale, f"{what} {name}: max abs diff {diff} > 1e-4 * max|ref| ({scale})"


def test_conformer_encoder_matches_official_batch(_conformer_models, _conformer_preprocessor):
    ref, ref_adapter, ours, adapter = _conformer_models
    (question,), sr_q = load_wav(ASSETS / "question.wav")
    (asr,), sr_a = load_wav(ASSETS / "asr.wav")
    mels = [audio.audio_features(question, sr_q), audio.audio_features(asr[: int(2.3 * sr_a)], sr_a)]
    assert mels[0].shape[1] != mels[1].shape[1]
    out = _conformer_encode(ours, adapter, mels)
    _conformer_check(_conformer_official_encode(ref, ref_adapter, mels), out, "batch of 2")
    assert out[1].tolist() == [conformer.emb_len(m.shape[1]) for m in mels]
    # the shorter clip's output must not depend on the padding of the batch
    alone = _conformer_encode(ours, adapter, mels[1:])
    n = int(alone[1][0])
    diff = (out[0][1, :n] - alone[0][0]).abs().max().item()
    assert diff <= 1e-4 * alone[0].abs().max().item(), f"padded vs alone: max abs diff {diff}"


def test_conformer_encoder_matches_official_single(_conformer_models, _conformer_preprocessor):
    ref, ref_adapter, ours, adapter = _conformer_models
    (wave,), sr = load_wav(ASSETS / "question.wav")
    mel = _conformer_official_mel(_conformer_preprocessor, wave, sr)
    _conformer_check(_conformer_official_encode(ref, ref_adapter, [mel]),
                     _conformer_encode(ours, adapter, [mel]), "single clip")


def test_conformer_encoder_matches_official_bf16(_conformer_models):
    # The official model runs in bf16 (LFM2AudioModel.from_pretrained's default dtype): both encoders and
    # adapters cast to bf16, on the same bf16 mels (batch of 2). Tolerance: none, measured bit-identical.
    ref, ref_adapter, ours, adapter = (copy.deepcopy(m).to(torch.bfloat16) for m in _conformer_models)
    (question,), sr_q = load_wav(ASSETS / "question.wav")
    (asr,), sr_a = load_wav(ASSETS / "asr.wav")
    mels = [audio.audio_features(question, sr_q).bfloat16(),
            audio.audio_features(asr[: int(2.3 * sr_a)], sr_a).bfloat16()]
    (r_h, r_len, r_emb), (h, h_len, emb) = (_conformer_official_encode(ref, ref_adapter, mels),
                                            _conformer_encode(ours, adapter, mels))
    assert h.dtype == r_h.dtype == emb.dtype == r_emb.dtype == torch.bfloat16
    assert torch.equal(h_len, r_len.to(torch.long))
    for name, a, b in [("encoder", h, r_h), ("adapter", emb, r_emb)]:
        assert a.shape == b.shape and torch.isfinite(b).all() and b.abs().max() > 0.1
        assert torch.equal(a, b), f"bf16 {name}: max abs diff {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("n_samples", [1, 100, 319, 320, 1000, 1281])
def test_conformer_short_audio_matches_official(n_samples, _conformer_models, _conformer_preprocessor):
    # Documented behaviour: any clip of >= 1 sample is accepted, like the official code; fewer than 320
    # samples give an all-zero mel (nothing to normalise over) and at least one embedding.
    ref, ref_adapter, ours, adapter = _conformer_models
    wave = torch.randn(n_samples, generator=torch.Generator().manual_seed(n_samples))
    mel = audio.log_mel(wave)
    ref_mel = _conformer_official_mel(_conformer_preprocessor, wave, 16000)
    assert mel.shape == ref_mel.shape == (128, 1 + n_samples // 160)
    _conformer_assert_same_mel(mel, ref_mel, f"of {n_samples} samples")
    if n_samples < 320:
        assert not mel.any()
    out = _conformer_encode(ours, adapter, [mel])
    _conformer_check(_conformer_official_encode(ref, ref_adapter, [ref_mel]), out, f"{n_samples} samples")
    assert out[1].item() == conformer.emb_len(mel.shape[1]) >= 1


def test_conformer_emb_len_matches_official():
    official()
    from liquid_audio.utils import mel2emb_len

    n = torch.arange(1, 100)
    assert torch.equal(conformer.emb_len(n), mel2emb_len(n))
    assert [conformer.emb_len(int(i)) for i in n] == [mel2emb_len(int(i)) for i in n]


def test_conformer_load_audio_formats(tmp_path):
    g = torch.Generator().manual_seed(0)
    signal = (0.5 * torch.randn(4000, 3, generator=g)).clamp(-1, 1).numpy()
    for subtype in ["PCM_16", "PCM_24", "PCM_32", "FLOAT"]:
        path = tmp_path / f"three_channels_{subtype}.wav"
        sf.write(str(path), signal, 8000, subtype=subtype)
        wave, sr = audio.load_audio(path)
        assert sr == 8000 and wave.dtype == torch.float32 and wave.shape == (4000,)
        diff = (wave - torch.from_numpy(signal.mean(1))).abs().max().item()
        assert diff <= 2**-15, f"{subtype}: the channel mean, scaled to [-1, 1), differs by {diff}"


def test_conformer_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        audio.load_audio(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(ValueError, match="text.wav"):
        audio.load_audio(tmp_path / "text.wav")
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match="empty.wav.*no samples"):
        audio.load_audio(tmp_path / "empty.wav")
    for bad in [np.nan, np.inf]:
        x = np.zeros(1600, np.float32)
        x[5] = bad
        sf.write(str(tmp_path / "nonfinite.wav"), x, 16000, subtype="FLOAT")
        with pytest.raises(ValueError, match="nonfinite.wav.*NaN or infinite"):
            audio.load_audio(tmp_path / "nonfinite.wav")
        with pytest.raises(ValueError, match="NaN or infinite"):
            audio.audio_features(torch.from_numpy(x), 16000)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        audio.log_mel(torch.zeros(0))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        audio.log_mel(torch.zeros(2, 1600))
    with pytest.raises(ValueError, match="sample rates"):
        audio.resample(torch.zeros(100), 0, 16000)
    with pytest.raises(ValueError, match="sample rates"):
        audio.resample(torch.zeros(100), 44100.5, 16000)
    with pytest.raises(ValueError, match="float"):
        audio.resample(torch.zeros(100, dtype=torch.int16), 8000, 16000)
    ours = conformer.ConformerEncoder(conformer.EncoderConfig(n_layers=1, d_model=64, n_heads=2,
                                                              subsampling_conv_channels=8))
    with pytest.raises(ValueError, match=r"mel must be \[B, 128"):
        ours(torch.zeros(1, 80, 50), torch.tensor([50]))
    with pytest.raises(ValueError, match="subsampling"):
        conformer.EncoderConfig.from_dict({**_CONFORMER_CFG["encoder"], "subsampling": "striding"})
    d_model = _CONFORMER_CFG["encoder"]["d_model"]
    assert conformer.EncoderConfig.from_dict({**_CONFORMER_CFG["encoder"], "feat_out": d_model}).d_model == d_model
    with pytest.raises(ValueError, match="feat_out=1024"):
        conformer.EncoderConfig.from_dict({**_CONFORMER_CFG["encoder"], "feat_out": 1024})


# ====================================================================================================
# The test checkpoints
#
# The test checkpoints: real file layout, load in the official package, and exercise modality switching.
# ====================================================================================================

def _fixture_tensors(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_fixture_file_set(tiny_ckpt):
    names = {p.name for p in tiny_ckpt.iterdir()}
    assert {"config.json", "model.safetensors", MIMI_FILE, "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja"} <= names, names
    assert json.loads((tiny_ckpt / "config.json").read_text()) == TINY_CONFIG


def test_fixture_model_file_dtypes(tiny_ckpt):
    official()
    sd = _fixture_tensors(tiny_ckpt / "model.safetensors")
    for k, v in sd.items():
        want = torch.int64 if k == "codebook_offsets" or k.endswith("num_batches_tracked") else torch.bfloat16
        assert v.dtype == want, (k, v.dtype)
    assert sd["codebook_offsets"].tolist() == [2049 * k for k in range(8)]
    # tie=True: the official to_logits IS the embedding; the file holds two equal copies
    for k in range(TINY_CONFIG["codebooks"]):
        assert torch.equal(sd[f"depth_embeddings.{k}.to_logits.weight"], sd[f"depth_embeddings.{k}.embedding.weight"])
    # tie_audio_embeddings=False: separate, different tensors
    assert not torch.equal(sd["audio_embedding.to_logits.weight"], sd["audio_embedding.embedding.weight"])
    # randomised everywhere: no all-zero or all-one float tensors
    for k, v in sd.items():
        if v.is_floating_point() and v.numel() > 8:
            assert v.float().std() > 0, k


def test_fixture_mimi_file(tiny_ckpt):
    sd = _fixture_tensors(tiny_ckpt / MIMI_FILE)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert "decoder_transformer.transformer.layers.0.self_attn.in_proj_weight" in sd
    assert "decoder_transformer.transformer.layers.0.self_attn.out_proj.weight" in sd
    assert not any("in_projs" in k or "out_projs" in k for k in sd)
    assert len(sd) == 318 and sum(v.numel() for v in sd.values()) > 90e6  # the whole codec, encoder too


def _fixture_assert_file_is_model(sd: dict, model) -> None:
    """The file holds exactly the tensors of the model `LFM2AudioModel.from_pretrained` built from the folder's
    config.json: its load is not strict (accelerate's load_checkpoint_in_model), so a tensor missing from the file
    would stay at the constructor's init and an extra one be ignored, silently. (The fixture builder's own strict
    load checks the file against the model it built, not against what the official package builds.)"""
    own = model.state_dict()
    assert set(sd) == set(own), f"missing: {sorted(set(own) - set(sd))}, extra: {sorted(set(sd) - set(own))}"


def test_fixture_loads_in_official(tiny_ckpt, official_tiny):
    model, processor = official_tiny
    sd = _fixture_tensors(tiny_ckpt / "model.safetensors")
    _fixture_assert_file_is_model(sd, model)
    own = model.state_dict()
    for k, v in sd.items():  # every tensor was loaded (none left at the constructor's random init)
        assert torch.equal(own[k], v.to(own[k].dtype)), k
    assert own["lfm.embed_tokens.weight"].dtype == torch.float32
    codes = torch.randint(0, 2048, (1, 8, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wave = processor.mimi.decode(codes)  # loads the Mimi file strictly (renaming attention keys)
    assert wave.shape == (1, 1, 6 * 1920)
    assert 0.01 < float(wave.pow(2).mean().sqrt()) < 1.0, "random codes should decode to audible audio"


def _fixture_assert_sequential(items):
    """text -> <|audio_start|> -> audio frames -> end-of-audio frame -> text."""
    ev = stream_events(items)
    assert isinstance(ev[0], tuple) and ev[0][0] == "text", ev
    i = ev.index("audio_start")
    assert ev[i + 1][0] == "audio" and "end_of_audio" in ev[i + 1:], ev
    j = ev.index("end_of_audio", i)
    assert len(ev) > j + 1, f"no text after the end-of-audio frame: {ev}"
    return ev


def _fixture_assert_varied(items):
    text = [v for k, v in items if k == "text"]
    frames = torch.tensor([v for k, v in items if k == "audio" and v != [END_OF_AUDIO] * 8])
    assert len(set(text)) >= 3, text
    assert all(len(set(frames[:, k].tolist())) >= 3 for k in range(8)), frames
    assert len({tuple(f) for f in frames.tolist()}) >= frames.shape[0] // 3, frames


def _fixture_assert_interleaved(items, config):
    """n_text text tokens (fewer if <|text_end|>), then audio frames; a text_end or end-of-audio switch."""
    ev = stream_events(items)
    first_frame = next(i for i, (k, _) in enumerate(items) if k == "audio")
    n_text = config["interleaved_n_text"]
    assert first_frame == n_text or 0 < first_frame < n_text and items[first_frame - 1] == ("text", TEXT_END), ev
    assert "end_of_audio" in ev or "text_end" in ev, ev
    assert any(k == "text" for k, _ in items[first_frame:]), f"never back to text: {ev}"
    return ev


def _fixture_greedy_margins(model, processor, task, max_new_tokens):
    """Official greedy stream for `task`, and the smallest (top1 - top2) / std of every logit vector."""
    margins = []

    def record(logits):
        top = logits.topk(2).values
        margins.append(float((top[0] - top[1]) / logits.std()))
        return logits

    text_sampler = model._sample_text_token
    model._sample_text_token = lambda logits, **kw: text_sampler(record(logits), **kw)
    for emb in model.depth_embeddings:
        emb.get_logits = lambda x, f=emb.get_logits: record(f(x))
    try:
        items = official_generate(model, official_prompt(processor, task), PROMPTS[task][3], max_new_tokens)
    finally:
        del model._sample_text_token
        for emb in model.depth_embeddings:
            del emb.get_logits
    return items, min(margins)


@pytest.fixture(scope="module")
def fixture_tiny_runs(official_tiny):
    """Official greedy streams (and smallest logit margins) on the tiny fixture: tts and chat, 100 items."""
    model, processor = official_tiny
    return {task: _fixture_greedy_margins(model, processor, task, 100) for task in ("tts", "chat")}


def test_fixture_tiny_sequential_switches(fixture_tiny_runs):
    items, _ = fixture_tiny_runs["tts"]
    _fixture_assert_sequential(items)
    _fixture_assert_varied(items)


def test_fixture_tiny_interleaved_switches(fixture_tiny_runs):
    items, _ = fixture_tiny_runs["chat"]
    _fixture_assert_interleaved(items, TINY_CONFIG)
    _fixture_assert_varied(items)


def test_fixture_tiny_greedy_is_far_from_ties(fixture_tiny_runs):
    """Greedy choices must not hinge on float32 rounding: top-1 beats top-2 by > 1e-5 logit std."""
    for task, (_, margin) in fixture_tiny_runs.items():
        assert margin > 1e-5, (task, margin)


@pytest.mark.full_size
def test_fixture_full_size_switches(full_ckpt):
    """The full-size fixture (real config) switches modality in both modes with varied output."""
    official()
    model, processor = load_official(full_ckpt)
    with safe_open(str(full_ckpt / "model.safetensors"), "pt") as f:
        _fixture_assert_file_is_model(dict.fromkeys(f.keys()), model)
    assert len(model.state_dict()) == 931  # as many as the real model.safetensors holds (SPEC.md)
    items, margin = _fixture_greedy_margins(model, processor, "tts", 60)
    _fixture_assert_sequential(items)
    _fixture_assert_varied(items)
    assert margin > 1e-5, margin
    items, margin = _fixture_greedy_margins(model, processor, "chat", 60)
    _fixture_assert_interleaved(items, FULL_CONFIG)
    _fixture_assert_varied(items)
    assert margin > 1e-5, margin


# ====================================================================================================
# Backbone, depthformer, generation
#
# Parity of lfm2audio.py (LFM2 backbone, depthformer, chat prompt, both generation modes) with the official
# liquid-audio package and transformers' Lfm2Model: float32 on CPU, the same random checkpoint, the same prompts.
# ====================================================================================================

LFM2AUDIO_RTOL = 1e-4  # hidden states / logits: max abs diff <= 1e-4 * max abs of the reference


LFM2AUDIO_N_TINY = 100  # backbone steps per tiny generation


def _lfm2audio_close(got: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = LFM2AUDIO_RTOL) -> float:
    diff = float((got.float() - ref.float()).abs().max())
    scale = float(ref.float().abs().max())
    assert diff <= rtol * scale, f"{what}: max abs diff {diff:.3g} > {rtol} * {scale:.3g}"
    return diff / scale


def _lfm2audio_prompt(model, task: str) -> lfm2audio.Chat:
    """Our chat state for a fixtures.PROMPTS task, built from the same turns as fixtures.official_prompt."""
    return build_prompt(lfm2audio.Chat(model.tokenizer), task, audio.load_audio)


def _lfm2audio_assert_same_prompt(chat: lfm2audio.Chat, ochat) -> None:
    """Same text ids, modality flags, audio-out frames, mel lengths and mel features (exactly)."""
    assert chat.text == ochat.text[0].tolist(), "text ids differ"
    assert chat.modality == ochat.modality_flag[0].tolist(), "modality flags differ"
    frames = torch.stack(chat.frames, 1) if chat.frames else torch.zeros(8, 0, dtype=torch.long)
    assert torch.equal(frames, ochat.audio_out.cpu()), "audio-out frames differ"
    assert [m.shape[1] for m in chat.mels] == ochat.audio_in_lens.tolist(), "mel lengths differ"
    if chat.mels:  # bf16-rounded in both (the ChatState default); the mel front end is checked in the conformer section
        mel = torch.cat(chat.mels, 1)
        assert mel.dtype == ochat.audio_in.dtype and torch.equal(mel, ochat.audio_in.cpu()), "mel features differ"


def _lfm2audio_items(stream) -> list:
    return [(k, v if k == "text" else v.tolist()) for k, v in stream]


def _lfm2audio_check_stream(items: list, n_min: int = 60, both: bool = True) -> None:
    assert len(items) >= n_min, f"only {len(items)} items generated"
    kinds = {k for k, _ in items}
    assert kinds == {"text", "audio"} or not both, f"generation never switched modality ({kinds})"


@pytest.fixture(scope="module")
def lfm2audio_pair(tiny_ckpt, official_tiny):
    """(ours, official model, official processor) on the tiny checkpoint, float32."""
    off, proc = official_tiny
    ours = lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.float32, max_seq_len=1024)
    return ours, off, proc


def _lfm2audio_inputs(ours, n: int, seed: int = 0) -> torch.Tensor:
    """Input embeddings [1, n, D] mixing text tokens and audio-out frames, as a real history does."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ours.cfg.vocab_size, (n,), generator=g)
    codes = torch.randint(0, 2048, (8, n), generator=g)
    is_audio = torch.rand(n, generator=g) < 0.5
    with torch.no_grad():
        x = torch.where(is_audio[:, None], ours.embed_audio_out(codes), ours.lfm.embed_tokens(ids))
    return x[None]


def test_lfm2audio_backbone_prefill(lfm2audio_pair):
    """Prefill hidden states and text logits vs transformers' Lfm2Model (eager) and the official model (sdpa)."""
    from transformers import Lfm2Model

    ours, off, _ = lfm2audio_pair
    hf = Lfm2Model(copy.deepcopy(off.lfm.config)).eval()
    hf.set_attn_implementation("eager")
    hf.load_state_dict(off.lfm.state_dict())
    x = _lfm2audio_inputs(ours, 120)
    with torch.no_grad():
        ours.lfm.reset()
        h = ours.lfm(x, torch.arange(x.shape[1]))
        for name, ref in (("transformers", hf(inputs_embeds=x).last_hidden_state),
                          ("official", off.lfm(inputs_embeds=x).last_hidden_state)):
            _lfm2audio_close(h, ref, f"hidden states vs {name}")
            _lfm2audio_close(ours.text_logits(h), F.linear(ref, off.lfm.embed_tokens.weight), f"logits vs {name}")


def test_lfm2audio_backbone_cached_decode(lfm2audio_pair):
    """Prefill, then 32 decode steps one position at a time through the static caches == the full sequence."""
    ours, off, _ = lfm2audio_pair
    x = _lfm2audio_inputs(ours, 72, seed=1)
    n = x.shape[1] - 32
    with torch.no_grad():
        ref = off.lfm(inputs_embeds=x).last_hidden_state[0]
        ours.lfm.reset()
        full = ours.lfm(x, torch.arange(x.shape[1]))[0]
        steps = [ours.prefill(x[:, :n])]
        for i in range(n, x.shape[1]):
            steps.append(ours.decode_one(x[:, i:i + 1], torch.tensor([[i]]))[0])
    got = torch.stack(steps)  # positions n-1 .. end
    _lfm2audio_close(got, full[n - 1:], "cached decode vs our full recompute")
    _lfm2audio_close(got, ref[n - 1:], "cached decode vs official full sequence")
    assert ours.text_logits(got).argmax(-1).tolist() == F.linear(ref[n - 1:], off.lfm.embed_tokens.weight).argmax(
        -1).tolist()


def test_lfm2audio_depthformer_frames(lfm2audio_pair):
    """Greedy audio frames (8 codebooks through the depthformer; end of audio in codebook 0 makes the whole frame
    2048, as the official loop does) and their input embedding == official."""
    ours, off, _ = lfm2audio_pair
    h = _lfm2audio_inputs(ours, 24, seed=2)[0] * 3
    with torch.no_grad():
        for i in range(h.shape[0]):
            (got, got_emb), ref = ours.audio_step(h[i][None]), off._sample_audio_frame(h[i])
            got = got[0]
            if ref[0] == END_OF_AUDIO:
                ref[:] = END_OF_AUDIO
            assert got.tolist() == ref.tolist(), f"frame {i}: {got.tolist()} != {ref.tolist()}"
            emb = off.audio_embedding(ref + off.codebook_offsets).sum(0)
            _lfm2audio_close(got_emb[0, 0], emb, "audio-out embedding")


@pytest.fixture(scope="module")
def official_greedy_runs(lfm2audio_pair) -> dict:
    """{(task, mode): the official greedy items} for every task in both modes, LFM2AUDIO_N_TINY steps each."""
    _, off, proc = lfm2audio_pair
    return {(task, mode): official_generate(off, official_prompt(proc, task), mode, LFM2AUDIO_N_TINY)
            for task in sorted(PROMPTS) for mode in ("interleaved", "sequential")}


@pytest.mark.quick
@pytest.mark.parametrize("mode", ["interleaved", "sequential"])
@pytest.mark.parametrize("task", sorted(PROMPTS))
def test_lfm2audio_greedy_generation(lfm2audio_pair, official_greedy_runs, task, mode):
    """Whole pipeline per task (chat on question.wav, text_chat, asr on asr.wav, tts), in both modes: the
    same prompt, the same prompt embedding, and greedy generation item for item equal to the official
    generate_interleaved / generate_sequential. The spoken tasks run at least 60 items (the comparison is not
    trivial); a sequential turn that stops early ends with its <|im_end|>."""
    ours, off, proc = lfm2audio_pair
    ochat, chat = official_prompt(proc, task), _lfm2audio_prompt(ours, task)
    _lfm2audio_assert_same_prompt(chat, ochat)
    with torch.no_grad():
        _lfm2audio_close(ours.embed_prompt(chat), off._prefill(**ochat), "prompt embedding")
    ref = official_greedy_runs[task, mode]
    got = _lfm2audio_items(ours.generate(chat, mode, LFM2AUDIO_N_TINY))
    assert got == ref
    if mode == "sequential" and len(ref) < LFM2AUDIO_N_TINY:
        assert ref[-1] == ("text", lfm2audio.IM_END), "a sequential turn ends at <|im_end|> or at the bound"
    assert len(ref) >= 60 or task == "text_chat", f"only {len(ref)} items to compare"


def test_lfm2audio_generation_coverage(official_greedy_runs):
    """The official greedy runs compared above exercise every switch: <|audio_start|>, <|text_end|>, end of
    audio (sequential and interleaved), the 6/12 interleave, and stopping at <|im_end|> (guards the fixture)."""
    seen = set()
    for (task, mode), items in official_greedy_runs.items():
        kinds = "".join("t" if k == "text" else "a" for k, _ in items)
        for name, hit in (("audio_start", ("text", lfm2audio.AUDIO_START) in items),
                          ("text_end", ("text", lfm2audio.TEXT_END) in items),
                          ("end_of_audio", ("audio", [2048] * 8) in items),
                          ("interleave_6_12", "tttttt" + "a" * 12 + "t" in kinds),
                          ("stop", len(items) < LFM2AUDIO_N_TINY)):
            if hit:
                seen.add((mode, name))
    need = {("sequential", "audio_start"), ("sequential", "end_of_audio"), ("interleaved", "text_end"),
            ("interleaved", "end_of_audio"), ("interleaved", "interleave_6_12")}
    assert need <= seen, f"not exercised: {sorted(need - seen)}"
    assert {("interleaved", "stop"), ("sequential", "stop")} & seen, "no run stopped at <|im_end|>"


def test_lfm2audio_second_turn(lfm2audio_pair):
    """Speech-to-speech chat, then a second user turn (text + another recording) after appending the first
    turn's output (text ids and audio frames, end-of-audio included): prompts, embeddings, generations equal."""
    ours, off, proc = lfm2audio_pair
    ochat, chat = official_prompt(proc, "chat"), _lfm2audio_prompt(ours, "chat")
    first = official_generate(off, ochat, "interleaved", LFM2AUDIO_N_TINY)
    got = list(ours.generate(chat, "interleaved", LFM2AUDIO_N_TINY))
    assert _lfm2audio_items(got) == first
    official_append(ochat, first)
    chat.append(got)
    wave, rate = audio.load_audio(ASSETS / "asr.wav")  # a second, longer clip: padded encoder batch
    for c in (ochat, chat):
        c.end_turn()
        c.new_turn("user")
        c.add_text("And this?")
        c.add_audio(wave[None] if c is ochat else wave, rate)
        c.end_turn()
        c.new_turn("assistant")
    _lfm2audio_assert_same_prompt(chat, ochat)
    assert chat.modality.count(lfm2audio.AUDIO_OUT) == sum(k == "audio" for k, _ in first) > 0
    with torch.no_grad():
        _lfm2audio_close(ours.embed_prompt(chat), off._prefill(**ochat), "second-turn prompt embedding")
    ref = official_generate(off, ochat, "interleaved", LFM2AUDIO_N_TINY)
    assert _lfm2audio_items(ours.generate(chat, "interleaved", LFM2AUDIO_N_TINY)) == ref
    _lfm2audio_check_stream(first)
    _lfm2audio_check_stream(ref, both=False)


def test_lfm2audio_seeded_sampling(lfm2audio_pair):
    """Temperature + top-k sampling with the same seed draws the same items as the official code."""
    ours, off, proc = lfm2audio_pair
    params = dict(text_temperature=0.8, text_top_k=20, audio_temperature=0.9, audio_top_k=8)
    ochat, chat = official_prompt(proc, "chat"), _lfm2audio_prompt(ours, "chat")
    torch.manual_seed(1234)
    ref = official_generate(off, ochat, "interleaved", 60, **params)
    torch.manual_seed(1234)
    got = _lfm2audio_items(ours.generate(chat, "interleaved", 60, Sampling(**params)))
    assert got == ref
    torch.manual_seed(1235)
    assert _lfm2audio_items(ours.generate(chat, "interleaved", 60, Sampling(**params))) != ref, "seed had no effect"


def test_lfm2audio_sample_rules():
    """Greedy for temperature None/0 or top_k 1; top-k never draws outside the k best."""
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0, 2.5])
    for t, k in ((None, None), (0.0, 5), (-1.0, None), (1.0, 1)):
        assert lfm2audio.sample(logits, t, k).tolist() == [1]
    torch.manual_seed(0)
    drawn = {int(lfm2audio.sample(logits, 1.0, 2)) for _ in range(200)}
    assert drawn == {1, 4}


def test_lfm2audio_load_bf16(tiny_ckpt, lfm2audio_pair):
    """bf16 load: weights in bf16, RoPE cos/sin from bf16-rounded inverse frequencies exactly as the official
    bf16 model computes them, hidden states close to the official bf16 model (tolerance 3e-2 relative)."""
    official()
    from liquid_audio import LFM2AudioModel

    ours = lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, max_seq_len=256)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    off = LFM2AudioModel.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, device="cpu").eval()
    x = _lfm2audio_inputs(ours, 200, seed=3)
    with torch.no_grad():
        cos, sin = off.lfm.rotary_emb(x, torch.arange(256)[None])
        assert torch.equal(ours.lfm.rope_cos, cos[0]) and torch.equal(ours.lfm.rope_sin, sin[0])
        ours.lfm.reset()
        _lfm2audio_close(ours.lfm(x, torch.arange(200)), off.lfm(inputs_embeds=x).last_hidden_state,
                         "bf16 hidden states", 3e-2)
    fp32 = lfm2audio_pair[0]
    assert torch.equal(ours.lfm.embed_tokens.weight.float(), fp32.lfm.embed_tokens.weight)  # bf16 file: exact
    chat = _lfm2audio_prompt(ours, "tts")
    assert len(list(ours.generate(chat, "sequential", 8))) > 0


def test_bf16_conv_layer_equals_official(tiny_ckpt, official_tiny):
    """A bf16 short-conv layer (prefill, then decode steps carrying its state) equals the official bf16 one
    exactly: the taps are summed in fp32 and rounded once, as the official conv1d does."""
    from transformers import DynamicCache

    ours = lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, max_seq_len=64)
    off = copy.deepcopy(official_tiny[0].lfm).to(torch.bfloat16)
    conv, ref = ours.lfm.layers[0].conv, off.layers[0].conv
    cache = DynamicCache(config=off.config)
    x = torch.randn(1, 12, ours.cfg.dim, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        ours.lfm.reset()
        assert torch.equal(conv(x[:, :9], conv.state), ref(x[:, :9], cache=cache))
        for t in range(9, 12):
            assert torch.equal(conv(x[:, t:t + 1], conv.state), ref(x[:, t:t + 1], cache=cache)), t


def test_exact_top():
    """bf16 logits come back fp32 with their EXACT_TOP largest equal to the fp32 products of those rows (so
    greedy picks float32's winner where bf16 rounding tied or swapped it); a float32 model's logits are left
    untouched."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(3000, 256, generator=g).bfloat16(), torch.randn(2, 256, generator=g).bfloat16()
    exact = x.float() @ w.float().T  # [2, 3000]
    got = lfm2audio.exact_top(F.linear(x, w), w, x)
    assert got.dtype == torch.float32
    top = F.linear(x, w).topk(lfm2audio.EXACT_TOP, -1).indices
    assert torch.allclose(got.gather(-1, top), exact.gather(-1, top), rtol=1e-6, atol=1e-5)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    assert not torch.equal(F.linear(x, w).float().gather(-1, top), exact.gather(-1, top))  # bf16 did round


def test_bf16_depthformer_keeps_fp32_residual(tiny_ckpt, lfm2audio_pair):
    """In a bf16 model the depthformer's residual stream and output are fp32, within 1% of the float32 model's,
    and its codebook logits fp32 with float32's greedy choice."""
    ours = lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, max_seq_len=64)
    fp32 = lfm2audio_pair[0]
    x = torch.randn(1, 1, ours.cfg.depth_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = ours.depthformer(x.bfloat16(), 0)
        assert y.dtype == torch.float32
        ref = fp32.depthformer(x.bfloat16().float(), 0)
        err = float((y - ref).norm() / ref.norm())
        assert err < 1e-2, err
        logits = ours.depth_embeddings[0].logits(y)
        assert logits.dtype == torch.float32 and logits.argmax() == fp32.depth_embeddings[0].logits(ref).argmax()


def _lfm2audio_copy_ckpt(src, dst, edit=None):
    """A copy of a checkpoint folder with `edit(state_dict)` applied to model.safetensors."""
    shutil.copytree(src, dst)
    if edit is not None:
        sd = load_file(str(dst / "model.safetensors"))
        edit(sd)
        save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_lfm2audio_load_errors(tiny_ckpt, tmp_path):
    """Missing, mis-shaped and unexpected tensors are named in one ValueError; missing files in a
    FileNotFoundError; a tied weight stored once loads; a too-long prompt is refused."""
    key, bad = "lfm.layers.1.self_attn.k_proj.weight", "depthformer.layers.0.feed_forward.w2.weight"
    folder = _lfm2audio_copy_ckpt(tiny_ckpt, tmp_path / "missing", lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=f"missing tensors: {key}"):
        lfm2audio.LFM2Audio.from_pretrained(folder)

    def reshape(sd):
        sd[bad] = sd[bad][:, :-1].contiguous()
        sd["lfm.extra.weight"] = torch.zeros(2)
    folder = _lfm2audio_copy_ckpt(tiny_ckpt, tmp_path / "shape", reshape)
    with pytest.raises(ValueError, match=f"unexpected tensors: lfm.extra.weight; wrong shapes: {bad}"):
        lfm2audio.LFM2Audio.from_pretrained(folder)

    tied = "depth_embeddings.3.to_logits.weight"
    folder = _lfm2audio_copy_ckpt(tiny_ckpt, tmp_path / "tied", lambda sd: sd.pop(tied))
    model = lfm2audio.LFM2Audio.from_pretrained(folder, max_seq_len=64)
    assert torch.equal(model.depth_embeddings[3].to_logits.weight, model.depth_embeddings[3].embedding.weight)
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        list(model.generate(_lfm2audio_prompt(model, "tts"), "sequential", 60))

    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        lfm2audio.LFM2Audio.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        lfm2audio.LFM2Audio.from_pretrained(tmp_path / "no-such-folder")


@pytest.mark.full_size
def test_lfm2audio_full_size_chat():
    """Full-size config (the real shapes): speech-to-speech chat on question.wav, greedy, item for item equal
    to the official model. Runs under the big-memory lock; one model in memory at a time (< 20 GB)."""
    with open("/tmp/lfm2audio-bigmem.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ckpt = cached_checkpoint(FULL_CONFIG, 0)
        off, proc = load_official(ckpt)
        ochat = official_prompt(proc, "chat")
        t0 = time.perf_counter()
        ref = official_generate(off, ochat, "interleaved", 64)
        t_off = time.perf_counter() - t0
        official_modality = ochat.modality_flag[0].tolist()
        del off, ochat
        gc.collect()
        ours = lfm2audio.LFM2Audio.from_pretrained(ckpt, max_seq_len=256)
        chat = _lfm2audio_prompt(ours, "chat")
        assert chat.modality == official_modality
        t0 = time.perf_counter()
        got = _lfm2audio_items(ours.generate(chat, "interleaved", 64))
        t_ours = time.perf_counter() - t0
        del ours
        gc.collect()
    print(f"full-size greedy, 64 steps: official {t_off:.1f} s, ours {t_ours:.1f} s")
    assert got == ref
    _lfm2audio_check_stream(ref)


# ====================================================================================================
# Conversations: caches kept across turns
#
# Conversations that keep the backbone caches across turns (batch.py's rows): chunked prefill, cache reuse,
# staleness, dropping old turns, in the library and in run.py --chat. Everything against the official multi-turn
# chat (`ChatState.append` + a full `generate_interleaved` per turn, greedy) on the tiny test checkpoint, float32
# on the CPU: prompts and items identical; chunked vs whole prefill hidden states within CHAT_RTOL (1e-5) of the
# whole's max abs.
# ====================================================================================================

CHAT_N = 150  # backbone steps per turn: enough for turns that stop at <|im_end|> (turn 2) and at the limit
CHAT_RTOL = 1e-5  # chunked vs whole prefill hidden states: max abs diff <= CHAT_RTOL * max abs of the whole
# the user turns of a conversation: spoken and typed alternating
CHAT_TURNS = [("audio", "question.wav"), ("text", "What is the capital of France?"), ("audio", "asr.wav"),
              ("text", "Tell me more about it.")]


@pytest.fixture(scope="module")
def chat_pair(tiny_ckpt, official_tiny):
    """(ours, official model, official processor) on the tiny checkpoint, float32."""
    off, proc = official_tiny
    ours = lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.float32, max_seq_len=2048)
    return ours, off, proc


def _chat_fed(items: list, limit: int) -> int:
    """How many of a turn's items its cache row holds: all it fed back, that is all but the last one, unless the
    turn ended at <|im_end|> (interleaved: not yielded, so every item yielded was fed)."""
    return len(items) - (len(items) == limit)


def _chat_next_turn(chat, items, turn, official: bool):
    """The finished answer into the history, as the official demo does; then the next user turn."""
    if official:
        official_append(chat, items)
    else:
        chat.append(items)
    chat.end_turn()
    add_turn(chat, turn, official)


def test_chat_chunked_prefill_equals_whole(chat_pair, monkeypatch):
    """Chunks at any start (lengths 1, 39, 1, 87, 172: the decode-step path included) give the hidden states
    of one whole prefill; so does prefill() in PREFILL_CHUNK pieces, and a prefill continuing from a start."""
    ours = chat_pair[0]
    x = _lfm2audio_inputs(ours, 300)
    bounds = [0, 1, 40, 41, 128, 300]
    with torch.no_grad():
        ours.lfm.reset()
        whole = ours.lfm(x, torch.arange(300))[0]
        ours.lfm.reset()
        chunks = torch.cat([ours.lfm(x[:, a:b], torch.arange(a, b))[0] for a, b in zip(bounds, bounds[1:])])
        _lfm2audio_close(chunks, whole, "chunks vs whole", CHAT_RTOL)
        monkeypatch.setattr(lfm2audio, "PREFILL_CHUNK", 64)
        _lfm2audio_close(ours.prefill(x), whole[-1], "prefill in 64-position pieces vs whole", CHAT_RTOL)
        ours.prefill(x[:, :170])
        _lfm2audio_close(ours.prefill(x[:, 170:], 170), whole[-1], "prefill from 170 after 0..169 vs whole",
                         CHAT_RTOL)
    assert not torch.equal(whole[:-1], whole[1:]), "degenerate inputs"


@pytest.mark.quick
def test_chat_four_turns_reuse_caches(chat_pair, monkeypatch):
    """A 4-turn chat, spoken and typed turns alternating, in a batch row: every turn after the first prefills
    only its new positions (the unfed end of the previous answer, <|im_end|>, the user turn, the assistant
    header) and generates the official multi-turn chat's items exactly."""
    ours, off, proc = chat_pair
    calls = record_prefills(ours, monkeypatch)
    batch = Batch(ours, 1)
    ochat = official_prompt(proc, "chat")
    chat = build_prompt(lfm2audio.Chat(ours.tokenizer), "chat", audio.load_audio)
    ends = set()
    ref = got = start = None  # the previous turn's, read from the second turn on
    for t in range(len(CHAT_TURNS)):
        if t:
            start = len(chat) + _chat_fed(got, CHAT_N)  # held: the previous prompt and every item fed back
            _chat_next_turn(ochat, ref, CHAT_TURNS[t], official=True)
            _chat_next_turn(chat, got, CHAT_TURNS[t], official=False)
        assert chat.text == ochat.text[0].tolist() and chat.modality == ochat.modality_flag[0].tolist()
        ref = official_generate(off, ochat, "interleaved", CHAT_N)
        seq = Sequence(chat, "interleaved", CHAT_N)
        got = _lfm2audio_items(batch.generate(seq))
        assert got == ref, f"turn {t + 1}: items differ from the official chat"
        assert seq.reused == (start or 0) and calls[-1] == (start or 0, len(chat) - (start or 0)), calls[-1]
        assert {k for k, _ in got} == {"text", "audio"}
        ends.add("limit" if len(got) == CHAT_N else "im_end")
    assert len(calls) == len(CHAT_TURNS)
    assert ends == {"limit", "im_end"}, f"turn endings covered: {ends}"


def test_respond_decodes_in_pieces(chat_pair, tiny_ckpt):
    """sound.respond(): the items of generate() as they come; the answer's first sound frame decoded at once, then
    at most decode_frames at a time, pending frames at the next item that is not sound; the waves together are
    the whole Mimi decode of the sound frames (within 1e-5 of its peak), whatever decode_frames."""
    ours = chat_pair[0]
    mimi = Mimi.from_file(tiny_ckpt / MIMI_FILE)
    chat = build_prompt(lfm2audio.Chat(ours.tokenizer), "chat", audio.load_audio)
    items = _lfm2audio_items(ours.generate(chat, "interleaved", CHAT_N))
    frames = [v for k, v in items if k == "audio" and END_OF_AUDIO not in v]
    assert len(frames) > 8 and items[-1][0] == "audio", "the test needs sound, and frames pending at the end"
    whole = mimi.decode(torch.tensor(frames).T[None])[0, 0]
    for n in (1, 3):
        got, waves, pending, sizes, sound = [], [], 0, [], False  # sound: the last item was a sound frame
        for kind, value in respond(ours.generate(chat, "interleaved", CHAT_N), mimi, n):
            if kind == "wave":
                assert value.shape == (FRAME_SIZE * pending,), f"a wave of {value.shape} for {pending} frames"
                waves.append(value)
                sizes.append(pending)
                pending = 0
                continue
            assert pending < n and (sound or pending == 0), f"{pending} frames left pending at a {kind} item"
            got.append((kind, value if kind == "text" else value.tolist()))
            sound = kind == "audio" and END_OF_AUDIO not in value
            pending += sound
        assert got == items and pending == 0, f"decode_frames {n}: items differ, or sound left undecoded"
        assert sizes[0] == 1 and max(sizes) == n and sum(sizes) == len(frames), sizes
        err = (torch.cat(waves) - whole).abs().max().item()
        assert err <= 1e-5 * whole.abs().max().item(), f"decode_frames {n}: waves vs whole decode {err:.2e}"
    with pytest.raises(ValueError, match="decode_frames"):
        next(respond(iter(items), mimi, decode_frames=0))


def test_chat_stale_caches_prefill_whole(chat_pair, monkeypatch):
    """Anything that makes a row's cached positions stale is noticed and the whole chat prefilled, with the
    official items: an edited text id, edited audio, another chat run in between, the model used outside the
    batch (a plain generate, a direct prefill). The same history rebuilt from scratch is no change: its positions
    are reused."""
    ours, off, proc = chat_pair
    calls, batch = record_prefills(ours, monkeypatch), Batch(ours, 1)
    ochat = official_prompt(proc, "chat")
    chat = build_prompt(lfm2audio.Chat(ours.tokenizer), "chat", audio.load_audio)
    text_chat = build_prompt(lfm2audio.Chat(ours.tokenizer), "text_chat", audio.load_audio)
    prompt_len = len(chat)
    first = _lfm2audio_items(batch.generate(Sequence(chat, "interleaved", 40)))
    assert first[0][0] == "text"
    _chat_next_turn(ochat, first, CHAT_TURNS[1], official=True)
    _chat_next_turn(chat, first, CHAT_TURNS[1], official=False)

    def generate(what, whole: bool):
        ref = official_generate(off, ochat, "interleaved", 40)
        seq = Sequence(chat, "interleaved", 40)
        assert _lfm2audio_items(batch.generate(seq)) == ref, what
        assert (seq.reused == 0) == whole and calls[-1] == (seq.reused, len(chat) - seq.reused), f"{what}: {calls}"

    i = chat.modality[:prompt_len].count(lfm2audio.TEXT)  # turn 1's answer's first text id
    edited = 777 if chat.text[i] != 777 else 778
    chat.text[i] = ochat.text[0, i] = edited
    generate("edited text id", whole=True)
    generate("the same prompt again", whole=True)  # the row holds its answer too: the prompt's end differs

    def turn_two(items):  # content, not identity: a history rebuilt from scratch continues an equal one
        c = build_prompt(lfm2audio.Chat(ours.tokenizer), "chat", audio.load_audio)
        return _chat_next_turn(c, items, CHAT_TURNS[1], official=False) or c

    def reused(c):
        seq = Sequence(c, "interleaved", 1)
        list(batch.generate(seq))
        return seq.reused

    held = build_prompt(lfm2audio.Chat(ours.tokenizer), "chat", audio.load_audio)
    items = _lfm2audio_items(batch.generate(Sequence(held, "interleaved", 5)))
    rebuilt = turn_two(items)
    rebuilt.mels[0][5, 7] += 1  # edited audio
    assert reused(rebuilt) == 0
    list(batch.generate(Sequence(held, "interleaved", 5)))
    assert reused(turn_two(items)) == len(held) + 4
    list(batch.generate(Sequence(held, "interleaved", 5)))
    list(batch.generate(Sequence(text_chat, "interleaved", 5)))  # another chat in between
    assert reused(turn_two(items)) == 0
    for outside in (lambda: list(ours.generate(text_chat, "interleaved", 5)),
                    lambda: ours.prefill(_lfm2audio_inputs(ours, 10))):
        list(batch.generate(Sequence(held, "interleaved", 5)))
        outside()  # the model's caches written outside the batch
        assert reused(turn_two(items)) == 0


def _chat_history(chat, exchanges, turn):
    """`chat` (ours, or the official ChatState: official=True) filled with the system turn, then whole exchanges
    (user turn, answer items), then the user `turn` and the assistant header."""
    official = not isinstance(chat, lfm2audio.Chat)
    chat.new_turn("system")
    chat.add_text(PROMPTS["chat"][0])
    chat.end_turn()
    for user, items in exchanges:
        add_turn(chat, user, official)
        (official_append if official else type(chat).append)(chat, items)
        chat.end_turn()
    add_turn(chat, turn, official)
    return chat


def test_chat_drop_oldest_exchange(chat_pair, monkeypatch):
    """Forgetting the oldest exchange leaves exactly the history that never had it (the system turn kept, audio
    clips and frames gone with their turns); the next answer prefills it whole and equals the official chat's."""
    ours, off, proc = chat_pair
    calls, batch = record_prefills(ours, monkeypatch), Batch(ours, 1)
    chat = build_prompt(lfm2audio.Chat(ours.tokenizer), "chat", audio.load_audio)
    answers = []
    for t in (1, 2):
        answers.append(_lfm2audio_items(batch.generate(Sequence(chat, "interleaved", 40))))
        _chat_next_turn(chat, answers[-1], CHAT_TURNS[t], official=False)
    n = len(chat)
    want = _chat_history(lfm2audio.Chat(ours.tokenizer), [(CHAT_TURNS[1], answers[1])], CHAT_TURNS[2])
    assert tasks.drop_oldest_exchange(chat) == n - len(want) > 0
    assert (chat.text, chat.modality, chat.turns) == (want.text, want.modality, want.turns)
    assert [f.tolist() for f in chat.frames] == [f.tolist() for f in want.frames]
    assert len(chat.mels) == len(want.mels) == 1 and torch.equal(chat.mels[0], want.mels[0])
    ochat = _chat_history(official().ChatState(proc), [(CHAT_TURNS[1], answers[1])], CHAT_TURNS[2])
    got = _lfm2audio_items(batch.generate(Sequence(chat, "interleaved", 40)))
    assert got == official_generate(off, ochat, "interleaved", 40)
    assert calls[-1] == (0, len(chat))
    assert tasks.drop_oldest_exchange(chat) > 0 and tasks.drop_oldest_exchange(chat) == 0  # the latest user turn stays
    assert [role for _, role in chat.turns] == ["system", "user", "assistant"]


def _chat_run_py(args: list, stdin_lines: list, monkeypatch) -> list:
    """run.py --chat in this process (stdin: the lines); returns the prefill calls."""
    # float32, as the official reference (--dtype auto is bf16 on CPUs with native bf16)
    args = run.parse_args(["--chat", "--greedy", "--device", "cpu", "--dtype", "float32", *map(str, args)])
    model, decoder, load_s = run.load(args)
    calls = record_prefills(model, monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in stdin_lines)))
    assert run.run_chat(args, model, decoder, load_s, None) == 0
    return calls


def _chat_user_lines(turns) -> list:
    return [ASSETS / v if k == "audio" else v for k, v in turns]


@pytest.mark.quick
def test_chat_run_py_reuses_caches(tiny_ckpt, official_tiny, tmp_path, monkeypatch, capsys):
    """run.py --chat, 4 turns spoken and typed: each turn after the first prefills exactly what is new (from the
    end of what the previous turn fed back), and each answer (prompt ids, items) equals the official chat's."""
    calls = _chat_run_py(["--model", tiny_ckpt, "--max-new-tokens", 40, "--codes-out", tmp_path / "codes.json",
                          "--out", tmp_path / "answer.wav"], _chat_user_lines(CHAT_TURNS), monkeypatch)
    off, proc = official_tiny
    ochat = official_prompt(proc, "chat")
    ref = start = None  # the previous turn's, read from the second turn on
    for t in range(len(CHAT_TURNS)):
        if t:
            start = len(ochat.modality_flag[0]) + _chat_fed(ref, 40)
            _chat_next_turn(ochat, ref, CHAT_TURNS[t], official=True)
        got = json.loads((tmp_path / f"codes_{t + 1}.json").read_text())
        assert got["prompt_ids"] == ochat.text[0].tolist()
        ref = official_generate(off, ochat, "interleaved", 40)
        assert [tuple(i) for i in got["items"]] == ref, f"turn {t + 1}"
        assert calls[t] == (start or 0, len(ochat.modality_flag[0]) - (start or 0)), f"turn {t + 1}: {calls[t]}"
    assert len(calls) == len(CHAT_TURNS)
    assert capsys.readouterr().err.count("[time]") == len(CHAT_TURNS)


def test_chat_run_py_drop_old_turns(tiny_ckpt, official_tiny, tmp_path, monkeypatch, capsys):
    """run.py --chat --drop-old-turns with a small context: instead of ending, the oldest exchanges are forgotten
    and the chat goes on. Each turn's history is the official one without exactly the fewest oldest exchanges
    that leave room for a whole answer (or all but the latest user turn), and its answer equals the official
    chat's on it."""
    # turns 4 and 5 forget one exchange each and keep the others (exchanges kept from [0, 0, 0, 1, 2, 5]); asr.wav,
    # last, is so long that every older exchange goes
    turns = [CHAT_TURNS[0], CHAT_TURNS[1], CHAT_TURNS[3], ("audio", "question.wav"), ("text", "Thanks!"),
             CHAT_TURNS[2]]
    context, max_new = 300, 40
    calls = _chat_run_py(["--model", tiny_ckpt, "--max-new-tokens", max_new, "--context", context,
                          "--drop-old-turns", "--codes-out", tmp_path / "codes.json", "--out",
                          tmp_path / "answer.wav"], _chat_user_lines(turns), monkeypatch)
    err = capsys.readouterr().err
    assert err.count("[time]") == len(turns) and "context full, forgot the oldest" in err, err
    off, proc = official_tiny
    answers, kept, first = [], [], 0  # kept[t]: the first exchange still in turn t's history
    for t, turn in enumerate(turns):
        while True:  # the fewest oldest exchanges dropped: the first history from `first` on with room enough
            ochat = _chat_history(official().ChatState(proc), list(zip(turns[first:t], answers[first:])), turn)
            room = context - len(ochat.modality_flag[0])
            if room >= max_new or first == t:
                break
            first += 1
        got = json.loads((tmp_path / f"codes_{t + 1}.json").read_text())
        assert got["prompt_ids"] == ochat.text[0].tolist(), f"turn {t + 1}: not the history without the oldest " \
                                                            f"{first} exchange(s)"
        answers.append([tuple(i) for i in got["items"]])
        assert answers[-1] == official_generate(off, ochat, "interleaved", min(max_new, room)), f"turn {t + 1}"
        kept.append(first)
    assert kept[-1] > 0 and min(kept) == 0, f"exchanges kept from: {kept}"
    # a turn that forgot some exchanges and kept others: there one forgotten too many changes the history
    assert any(kept[t - 1] < kept[t] < t for t in range(1, len(turns))), f"exchanges kept from: {kept}"
    assert [start for start, _ in calls].count(0) == 1 + len(set(kept) - {0}), calls


# ====================================================================================================
# Batched decoding and long recordings
#
# Splitting recordings at pauses, batched generation (each sequence equals its generation alone and the official
# generation of its prompt, item for item), and run.py's chunked ASR of recordings of any length.
#
# Each chunk's transcript must equal the official ASR of that chunk alone: the official ChatState with the ASR
# system prompt and the chunk's 16 kHz wave, generate_sequential, greedy, tiny checkpoint, float32 CPU. The tiny
# model's "transcripts" are noise; equality item for item is what counts (tolerance: none).
# ====================================================================================================

ASR_MAX_NEW = 40  # per chunk: some tiny-model chunks end on <|im_end|> before it, some reach it
ASR_SPAN = re.compile(r"^\[(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})\] ?(.*)$")


def _asr_official_wave16k(path: Path) -> torch.Tensor:
    """The recording at 16 kHz [T] as the official processor resamples it (torchaudio)."""
    official()
    import torchaudio

    wave, rate = load_wav(path)
    return torchaudio.functional.resample(wave.mean(0, keepdim=True), rate, 16000)[0]


def _asr_official(model, processor, wave16k: torch.Tensor, max_new: int):
    """The official ASR of one chunk alone: (prompt ids, items without the final <|im_end|>)."""
    from liquid_audio import ChatState

    chat = ChatState(processor)
    chat.new_turn("system")
    chat.add_text(PROMPTS["asr"][0])
    chat.end_turn()
    chat.new_turn("user")
    chat.add_audio(wave16k[None], 16000)  # the official processor takes a wave tensor and its rate
    chat.end_turn()
    chat.new_turn("assistant")
    return chat.text[0].tolist(), official_generate(model, chat, "sequential", max_new, drop_im_end=True)


def _asr_official_text(processor, items) -> str:
    return processor.text.decode([v for k, v in items if k == "text"], skip_special_tokens=True).strip()


def _asr_spans(stdout: str) -> list[tuple[str, str, str]]:
    """(start, end, text) of each chunk line of run.py's stdout; file headers skipped."""
    lines = [line for line in stdout.splitlines() if not line.startswith("==> ")]
    matches = [ASR_SPAN.match(line) for line in lines]
    assert all(matches), f"not a chunk line: {lines[[m is None for m in matches].index(True)]!r}"
    return [m.groups() for m in matches]


# ---- splitting ----


# ---- batched generation: each sequence equals its generation alone ----

ASR_BATCH_N = 100  # backbone steps per answer: every task switches modality within it, some end before it


@pytest.fixture(scope="module")
def asr_batch_pair(tiny_ckpt, official_tiny):
    """(ours, official model, official processor) on the tiny checkpoint, float32."""
    ours = lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.float32, max_seq_len=1024)
    return (ours, *official_tiny)


@pytest.mark.parametrize("mode", ["interleaved", "sequential"])
def test_asr_batched_generation_equals_one_by_one(asr_batch_pair, mode):
    """Prompts of different lengths (the four tasks, 45 to 254 positions; twice, so 8 chats) decoded 3 at a time
    (rows refilled as answers end) and 8 at once: every answer equals the official generation of its prompt
    alone and ours one by one, item for item; answers end at different steps, each on its own."""
    ours, off, proc = asr_batch_pair
    tasks = sorted(PROMPTS) * 2
    chats = [build_prompt(lfm2audio.Chat(ours.tokenizer), t, audio.load_audio) for t in tasks]
    refs = {t: official_generate(off, official_prompt(proc, t), mode, ASR_BATCH_N) for t in PROMPTS}
    for batch_size in (3, 8):
        got = dict(generate_batch(ours, chats, mode, ASR_BATCH_N, batch_size))
        assert sorted(got) == list(range(len(chats)))
        for i, task in enumerate(tasks):
            assert _lfm2audio_items(got[i]) == refs[task], \
                f"batch of {batch_size}: chat {i} ({task}) differs from official"
    assert ours.lfm.batch == 8  # the caches grew to the batch; one by one uses row 0
    for task in PROMPTS:
        chat = build_prompt(lfm2audio.Chat(ours.tokenizer), task, audio.load_audio)
        assert _lfm2audio_items(ours.generate(chat, mode, ASR_BATCH_N)) == refs[task], f"{task} alone"
    lengths = {len(r) for r in refs.values()}
    assert len(lengths) > 1 and min(lengths) < ASR_BATCH_N, f"answers should end at different steps: {lengths}"
    assert {k for r in refs.values() for k, _ in r} == {"text", "audio"}


# ---- run.py: every chunk equals the official ASR of that chunk alone ----

@pytest.mark.parametrize("batch", [1, 4])
def test_asr_chunks_match_official(batch, tiny_ckpt, official_tiny, tmp_path):
    """Two files (44.1 kHz and 16 kHz) cut into chunks of at most 6 s, decoded one at a time and 4 at once (5
    chunks: a row is refilled): stdout has a line per chunk with its span under a header per file, each chunk's
    prompt and items (--codes-out) equal the official ASR of the chunk alone, and the .srt files hold the same
    spans and text."""
    r = run_ok(["--model", tiny_ckpt, "--mode", "asr", "--wav", ASSETS / "asr.wav", "--wav", ASSETS / "question.wav",
                 "--chunk-seconds", 6, "--greedy", "--max-new-tokens", ASR_MAX_NEW, "--device", "cpu",
                 "--batch", batch, "--codes-out", "codes.json", "--text-out", "out.srt"], tmp_path)
    model, processor = official_tiny
    got, k, ended, cut = _asr_spans(r.stdout), 0, 0, 0
    assert r.stdout.count("==> ") == 2
    for f, name in enumerate(["asr.wav", "question.wav"]):
        wave = _asr_official_wave16k(ASSETS / name)
        spans = transcribe.split_at_pauses(wave, 16000, 6.0)
        cues = []
        for a, b in spans:
            k += 1
            prompt_ids, items = _asr_official(model, processor, wave[a:b], ASR_MAX_NEW)
            codes = json.loads((tmp_path / f"codes_{k}.json").read_text())
            assert codes["prompt_ids"] == prompt_ids, f"chunk {k}: prompt differs from the official ChatState's"
            assert [tuple(i) for i in codes["items"]] == items, f"chunk {k}: items differ from the official ASR"
            if len(items) == ASR_MAX_NEW:  # no <|im_end|>: cut by the bound, and said so
                assert (f"{name} [{transcribe.timestamp(a / 16000)} --> {transcribe.timestamp(b / 16000)}]: "
                        f"the transcript reached --max-new-tokens {ASR_MAX_NEW}") in r.stderr, r.stderr
                cut += 1
            else:
                ended += 1
            span = (transcribe.timestamp(a / 16000), transcribe.timestamp(b / 16000),
                    _asr_official_text(processor, items))
            assert got[k - 1] == span, f"chunk {k}: stdout line {got[k - 1]} != {span}"
            if span[2]:
                cues.append(f"{len(cues) + 1}\n{span[0].replace('.', ',')} --> {span[1].replace('.', ',')}\n"
                            f"{span[2]}\n\n")
        assert (tmp_path / f"out_{f + 1}.srt").read_text() == "".join(cues)
    assert k == len(got) >= 5 and ended and cut, "every chunk compared; some end on <|im_end|>, some are cut"
    assert r.stderr.count("[asr] ") == k and f"{k} chunks" in r.stderr


def test_asr_ten_minute_recording(tiny_ckpt, official_tiny, tmp_path):
    """A 10-minute recording built from the repository's recordings (both, alternating, with pauses of 0.3-1.5 s
    and one silence of 50 s), far past the context as one prompt: transcribed end to end in 8-chunk batches
    without a context error, every chunk accounted for (a line per chunk, the spans tiling the recording, none
    over 30 s; the silent one printed empty and not decoded), and two chunks spot-checked against the official
    ASR of the chunk alone."""
    rng = np.random.default_rng(0)
    pieces, n = [], 0
    for k in range(100):
        if n >= 600 * 16000:
            break
        wave = _asr_official_wave16k(ASSETS / ("asr.wav" if k % 2 == 0 else "question.wav"))
        gap = torch.zeros(50 * 16000 if k == 12 else int(rng.uniform(0.3, 1.5) * 16000))
        pieces += [wave, gap]
        n += wave.numel() + gap.numel()
    wave = torch.cat(pieces)
    sf.write(str(tmp_path / "long.wav"), wave.numpy(), 16000, subtype="FLOAT")
    positions = 1 + wave.numel() // 160 // 8  # as one prompt: its audio positions alone
    assert wave.numel() >= 600 * 16000 and positions > tasks.CONTEXT
    r = run_ok(["--model", tiny_ckpt, "--mode", "asr", "--wav", "long.wav", "--greedy", "--max-new-tokens", 12,
                 "--device", "cpu", "--batch", 8, "--codes-out", "codes.json", "--text-out", "long.vtt"], tmp_path)
    spans = transcribe.split_at_pauses(wave, 16000, 30.0)
    got = _asr_spans(r.stdout)
    assert [(a, b) for a, b, _ in got] == [(transcribe.timestamp(a / 16000), transcribe.timestamp(b / 16000))
                                           for a, b in spans]
    assert spans[-1][1] == wave.numel() and all(b - a <= 30 * 16000 for a, b in spans)
    silent = [k for k, (a, b) in enumerate(spans) if not wave[a:b].any()]
    assert silent and all(got[k][2] == "" for k in silent)
    decoded = sorted(int(p.stem.split("_")[1]) for p in tmp_path.glob("codes_*.json"))
    assert decoded == [k + 1 for k in range(len(spans)) if k not in silent]
    n = len(spans) - len(silent)
    assert "context" not in r.stderr and r.stderr.count("[asr] ") == n and f"{n}/{n} chunks" in r.stderr
    assert f"{len(spans)} chunks, {wave.numel() / 16000:.1f} s of audio" in r.stderr
    vtt = (tmp_path / "long.vtt").read_text()
    assert vtt.startswith("WEBVTT\n\n") and vtt.count(" --> ") == sum(1 for *_, text in got if text)
    model, processor = official_tiny
    for k in (0, len(spans) - 1):
        a, b = spans[k]
        codes = json.loads((tmp_path / f"codes_{k + 1}.json").read_text())
        assert [tuple(i) for i in codes["items"]] == _asr_official(model, processor, wave[a:b], 12)[1], f"chunk {k}"


# ====================================================================================================
# Compiled decode path
#
# The compiled decode path (torch.compile of the backbone step and of the text / audio heads) on the tiny
# checkpoint: no graph breaks (so no host sync inside a step or a frame), greedy items equal to eager and to the
# official package, seeded sampling equal to the official package. Timing lives in `bench.py decode`, not here.
# A cold CPU compile of the tiny model takes ~50 s on 2 cores (inductor's cache makes reruns ~6 s).
# ====================================================================================================

PERF_N = 100  # backbone steps per generation


PERF_SAMPLING = dict(text_temperature=0.8, text_top_k=20, audio_temperature=0.9, audio_top_k=8)


@pytest.fixture(scope="module")
def perf_models(tiny_ckpt, official_tiny):
    """(eager, compiled, official model, official processor) on the tiny checkpoint, float32 CPU."""
    eager = lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, max_seq_len=512)
    compiled = compile_decode(lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, max_seq_len=512))
    off, proc = official_tiny
    return eager, compiled, off, proc


def test_perf_decode_path_has_no_graph_break(perf_models):
    """The backbone step, a text token and a whole audio frame (8 depthformer passes, greedy and sampled)
    each trace to one graph: nothing inside reads a value back to the host (that would break the graph)."""
    eager = perf_models[0]
    d = eager.cfg.dim
    h, x, pos = torch.randn(1, d), torch.randn(1, 1, d), torch.tensor([5])
    with torch.no_grad():
        eager.prefill(torch.randn(1, 5, d))
        calls = [(eager.decode_one, (x, pos))] + [
            (fn, (h, t, k)) for fn in (eager.text_step, eager.audio_step) for t, k in ((None, None), (0.9, 8))]
        for fn, args in calls:
            explained = torch._dynamo.explain(fn)(*args)
            assert explained.graph_break_count == 0 and explained.graph_count == 1, \
                f"{fn.__name__}: {explained.graph_count} graphs, breaks: {explained.break_reasons}"
    torch._dynamo.reset()  # explain's traces are not the compiled model's


@pytest.mark.parametrize("task, mode", [("chat", "interleaved"), ("tts", "sequential")])
def test_perf_compiled_greedy_equals_eager_and_official(perf_models, task, mode):
    """Greedy generation with the compiled decode path: item for item equal to eager and to the official
    generate_interleaved / generate_sequential (exact; the tiny fixture switches modality within 100 steps)."""
    eager, compiled, off, proc = perf_models
    assert "decode_one" in vars(compiled) and "decode_one" not in vars(eager)  # compiled: instance attributes
    ref = official_generate(off, official_prompt(proc, task), mode, PERF_N)
    got_eager = _lfm2audio_items(eager.generate(_lfm2audio_prompt(eager, task), mode, PERF_N))
    got = _lfm2audio_items(compiled.generate(_lfm2audio_prompt(compiled, task), mode, PERF_N))
    assert got == got_eager == ref
    assert {k for k, _ in got} == {"text", "audio"}, "the run never switched modality"


def test_perf_compiled_seeded_sampling_equals_official(perf_models):
    """Temperature + top-k sampling on the device inside the compiled heads draws, from the same seed, the
    same items as the official package (inductor falls back to aten's RNG ops); another seed differs."""
    _, compiled, off, proc = perf_models
    torch.manual_seed(4321)
    with torch.no_grad():
        ref = [("text", int(t)) if t.numel() == 1 else ("audio", t.tolist())
               for t in off.generate_interleaved(**official_prompt(proc, "chat"), max_new_tokens=60,
                                                 **PERF_SAMPLING)]
    chat = _lfm2audio_prompt(compiled, "chat")
    torch.manual_seed(4321)
    assert _lfm2audio_items(compiled.generate(chat, "interleaved", 60, Sampling(**PERF_SAMPLING))) == ref
    torch.manual_seed(4322)
    assert _lfm2audio_items(compiled.generate(chat, "interleaved", 60, Sampling(**PERF_SAMPLING))) != ref, \
        "seed had no effect"


# ====================================================================================================
# int8 weights and bf16
#
# int8 weight-only quantization and bf16: the int8 layer against its dequantized weights (within bf16 rounding, 1e-2
# relative), the streaming load against quantizing a loaded model (exactly), the command line, and (full size) the
# agreement of bf16 and int8 with float32, teacher-forced over the same greedy decisions (bench.py accuracy prints
# the same figures; floors in AGREEMENT_FLOOR).
#
# The full-size tests load the model in float32, bf16 and int8 one after the other (peak about 6 GB): run them
# under `flock /tmp/lfm2audio-bigmem.lock`.
# ====================================================================================================


# ---- full size ----

# measured with bench.py accuracy --steps 144 (2034 decisions): bf16 0.9926 (the official package's bf16 against
# its own float32: 0.9877), int8 0.9705. The floors guard against regressions. The issue's targets (bf16 0.995,
# int8 0.99) are not reached and not asserted (README): int8's flips come from the int8 weights themselves (int8
# in a float32 model agrees no better)


# ====================================================================================================
# Mimi decoder
#
# Mimi decoder parity with the official `liquid_audio.moshi` codec on random weights at the real config.
#
# The official model comes from `moshi.models.loaders.get_mimi(None)` with every tensor randomised, and is
# written to a safetensors file stored like the real one (fixtures.write_mimi: fp32, whole codec, attention as
# `in_proj_weight` / `out_proj.weight`, which the official `LFM2AudioProcessor.mimi` reads with
# `load_state_dict(strict=True)`).
# ====================================================================================================

_MIMI_LONG = 300  # frames: > 125 frames (250 transformer steps), so the attention window slides and the ring wraps


_MIMI_OFFICIAL_STREAM = 125  # frames where the official streaming decode equals its whole-sequence decode


@pytest.fixture(scope="module")
def _mimi_setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("mimi") / MIMI_FILE
    ref = write_mimi(path, seed=0)  # read back strictly, as the official processor reads it: the layout is right
    tensors = load_file(str(path))
    codes = torch.randint(0, CARDINALITY, (1, N_CODEBOOKS, _MIMI_LONG), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_long = ref.decode(codes)
    return dict(ref=ref, path=path, tensors=tensors, mimi=Mimi.from_file(path), codes=codes, ref_long=ref_long)


def test_mimi_decode_matches_official(_mimi_setup):
    s = _mimi_setup
    ref, mimi = s["ref"], s["mimi"]
    g = torch.Generator().manual_seed(2)
    for batch, frames in [(1, 1), (2, 7)]:
        codes = torch.randint(0, CARDINALITY, (batch, N_CODEBOOKS, frames), generator=g)
        with torch.no_grad():
            want = ref.decode(codes)
        got = mimi.decode(codes)
        assert got.shape == (batch, 1, FRAME_SIZE * frames) == want.shape
        assert want.std() > 0.05, "random weights give a trivial output"
        err = (got - want).abs().max().item()
        assert err <= 1e-4, f"{frames} frames: max abs diff {err:.2e} > 1e-4"
    got = mimi.decode(s["codes"])
    want = s["ref_long"]
    assert got.shape == want.shape == (1, 1, FRAME_SIZE * _MIMI_LONG)
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"{_MIMI_LONG} frames: max abs diff {err:.2e} > 1e-4"


@pytest.fixture(scope="module")
def _mimi_frame_by_frame(_mimi_setup):
    mimi, codes = _mimi_setup["mimi"], _mimi_setup["codes"]
    stream = mimi.new_stream(batch_size=1)
    return torch.cat([mimi.decode_step(codes[:, :, i:i + 1], stream) for i in range(codes.shape[-1])], dim=-1)


def test_mimi_stream_equals_whole(_mimi_setup, _mimi_frame_by_frame):
    s = _mimi_setup
    mimi, codes = s["mimi"], s["codes"]
    whole = mimi.decode(codes)
    err = (_mimi_frame_by_frame - whole).abs().max().item()
    assert err <= 1e-5, f"frame-by-frame stream vs whole decode: max abs diff {err:.2e} > 1e-5"
    # chunks of 5 (and a chunk bigger than the stream's max_frames, split internally)
    stream = mimi.new_stream(batch_size=1, max_frames=5)
    bounds = list(range(0, 280, 5)) + [280, codes.shape[-1]]
    chunked = torch.cat([mimi.decode_step(codes[:, :, a:b], stream) for a, b in zip(bounds, bounds[1:])], dim=-1)
    err = (chunked - whole).abs().max().item()
    assert err <= 1e-5, f"chunks of 5 vs whole decode: max abs diff {err:.2e} > 1e-5"
    # and the stream is the official whole-sequence decode too
    err = (_mimi_frame_by_frame - s["ref_long"]).abs().max().item()
    assert err <= 1e-4, f"stream vs official decode: max abs diff {err:.2e} > 1e-4"


def test_mimi_stream_matches_official_streaming(_mimi_setup, _mimi_frame_by_frame):
    # The official streaming decode (`with mimi.streaming(1)`, as its chat demo runs it) keeps a ring of exactly
    # 250 steps. Once it is full, the first step of each frame loses the oldest key of its window (sees 249
    # steps, not 250), so from frame 125 on it departs from the official whole-sequence decode (~1e-2 here).
    # Ours keeps the full window; the two agree up to that point.
    s = _mimi_setup
    ref, codes = s["ref"], s["codes"][:, :, :_MIMI_OFFICIAL_STREAM]
    with torch.no_grad(), ref.streaming(1):
        want = torch.cat([ref.decode(codes[:, :, i:i + 1]) for i in range(codes.shape[-1])], dim=-1)
    got = _mimi_frame_by_frame[..., :want.shape[-1]]
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"stream vs official streaming decode: max abs diff {err:.2e} > 1e-4"


def test_mimi_load_attention_namings(_mimi_setup, tmp_path):
    s = _mimi_setup
    path = tmp_path / "mimi_in_projs.safetensors"
    save_file(mimi_file_tensors(s["ref"], kyutai_names=False), str(path))
    other = Mimi.from_file(path)
    assert any("in_projs.0.weight" in k for k in mimi_file_tensors(s["ref"], kyutai_names=False))
    mine = s["mimi"].state_dict()
    assert other.state_dict().keys() == mine.keys()
    for k, v in other.state_dict().items():
        assert torch.equal(v, mine[k]), f"{k} differs between the two namings"


def _mimi_decoder_subset(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items()
            if not k.startswith(("encoder", "downsample")) and "input_proj" not in k}


def test_mimi_load_errors(_mimi_setup, tmp_path):
    tensors = _mimi_decoder_subset(_mimi_setup["tensors"])
    for key in ["decoder.model.14.conv.conv.bias", "quantizer.rvq_rest.vq.layers.6._codebook.embedding_sum"]:
        path = tmp_path / "missing.safetensors"
        save_file({k: v for k, v in tensors.items() if k != key}, str(path))
        with pytest.raises(ValueError, match=f"missing .*{key}"):
            Mimi.from_file(path)
    key = "decoder_transformer.transformer.layers.3.self_attn.in_proj_weight"
    path = tmp_path / "misshaped.safetensors"
    save_file({**tensors, key: tensors[key][:-1].contiguous()}, str(path))
    with pytest.raises(ValueError, match=f"{key} has shape \\(1535, 512\\)"):
        Mimi.from_file(path)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        Mimi.from_file(tmp_path / "nowhere.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        Mimi.from_file(tmp_path / "junk.safetensors")


def test_mimi_bad_input(_mimi_setup):
    mimi = _mimi_setup["mimi"]
    good = torch.zeros(1, N_CODEBOOKS, 2, dtype=torch.long)
    for codes, msg in [
        (good.float(), "integers"),
        (good[0], "shape"),
        (good[:, :7], "shape"),
        (good + CARDINALITY, "0..2047"),
        (good - 1, "0..2047"),
        (good.tolist(), "torch.Tensor"),
    ]:
        with pytest.raises(ValueError, match=msg):
            mimi.decode(codes)
    with pytest.raises(ValueError, match="batch size"):
        mimi.decode_step(good, mimi.new_stream(batch_size=2))
    with pytest.raises(ValueError, match="max_frames"):
        mimi.new_stream(max_frames=0)
    assert mimi.decode(good[..., :0]).shape == (1, 1, 0)


# ====================================================================================================
# LFM2.5 audio detokenizer
#
# LFM2.5-Audio's LFM2 audio detokenizer (detokenizer.py) against the official `liquid_audio` one, on the random
# LFM2.5-shaped fixture (`lfm25_ckpt`: the tiny checkpoint plus a real-size `audio_detokenizer/`), float32 on CPU:
# within DETOK_PARITY_TOL (1e-4) of the official output's peak; streaming vs whole-sequence within DETOK_STREAM_TOL
# (1e-5). Then run.py on that folder: the official generation item for item, the wav equal to the official decode.
#
# The official module is built exactly as `LFM2AudioProcessor.audio_detokenizer` builds it, minus its `.cuda()`
# (`fixtures.official_detokenizer`), and called through `LFM2AudioProcessor.decode`.
# ====================================================================================================

DETOK_PARITY_TOL = 1e-4  # ours vs official: max abs diff, relative to the official output's peak
DETOK_STREAM_TOL = 1e-5  # streaming vs whole-sequence: max abs diff, relative to the peak (float32 matmuls
#                          of other shapes round differently; measured 5e-6 over 300 frames)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def detok_folder(request):
    """The LFM2.5 fixture with its detokenizer file stored in float32, and in bfloat16 (the real file's dtype is
    not known; the model cards give bf16): both must decode as the official package does."""
    official()
    return fixtures.cached_lfm25_checkpoint(TINY_CONFIG, 0, request.param)


@pytest.fixture(scope="module")
def detok_ours(detok_folder) -> Detokenizer:
    return Detokenizer.from_folder(detok_folder / DETOKENIZER_DIR)


@pytest.fixture(scope="module")
def detok_processor(detok_folder):
    return official_processor_cpu(detok_folder)


def _detok_codes(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2048, (batch, 8, frames), generator=torch.Generator().manual_seed(seed))


def _detok_rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("frames", [1, 7, 300])
def test_matches_official_decode(detok_ours, detok_processor, frames):
    codes = _detok_codes(1, frames, frames)
    ref = detok_processor.decode(codes)  # [1, 1920 T]
    assert float(ref.abs().max()) > 0.1, "the fixture should decode to audible noise"
    got = detok_ours.decode(codes)
    assert got.shape == (1, 1, DETOK_FRAME_SIZE * frames)
    assert _detok_rel_diff(got[:, 0], ref) <= DETOK_PARITY_TOL


def test_batch_matches_official(detok_ours, detok_processor):
    codes = _detok_codes(2, 20, 1)
    with torch.no_grad():
        ref = detok_processor.audio_detokenizer(codes)  # [2, 1920 T]; the processor's decode takes one sequence
    assert _detok_rel_diff(detok_ours.decode(codes)[:, 0], ref) <= DETOK_PARITY_TOL


def test_sliding_window_matters(detok_folder, detok_processor):
    """The parity above would catch a wrong window: with attention over all past steps the output is far off."""
    wide = Detokenizer.from_folder(detok_folder / DETOKENIZER_DIR)
    wide.window = 10_000
    codes = _detok_codes(1, 100, 2)
    assert _detok_rel_diff(wide.decode(codes)[:, 0], detok_processor.decode(codes)) > 100 * DETOK_PARITY_TOL


@pytest.mark.parametrize("chunks", [[1] * 300, [3, 1, 7, 2, 125, 126, 36]], ids=["frame_by_frame", "chunks"])
def test_streaming_equals_whole(detok_ours, chunks):
    codes = _detok_codes(1, sum(chunks), 3)
    whole = detok_ours.decode(codes)
    stream = detok_ours.new_stream(1)
    parts, start = [], 0
    for n in chunks:
        parts.append(detok_ours.decode_step(codes[..., start:start + n], stream))
        start += n
    parts.append(detok_ours.flush(stream))
    lengths = [p.shape[-1] for p in parts]
    # the first call lacks the DELAY samples that need the next frame's spectrum; flush gives the last DELAY
    assert lengths == [DETOK_FRAME_SIZE * chunks[0] - DELAY] + [DETOK_FRAME_SIZE * n for n in chunks[1:]] + [DELAY]
    assert DELAY == 480 and DELAY < DETOK_FRAME_SIZE
    assert _detok_rel_diff(torch.cat(parts, -1), whole) <= DETOK_STREAM_TOL


def test_stream_batch_and_empty(detok_ours):
    codes = _detok_codes(3, 5, 4)
    stream = detok_ours.new_stream(3)
    assert detok_ours.decode_step(codes[..., :0], stream).shape == (3, 1, 0)
    got = torch.cat([detok_ours.decode_step(codes, stream), detok_ours.flush(stream)], -1)
    assert _detok_rel_diff(got, detok_ours.decode(codes)) <= DETOK_STREAM_TOL
    assert detok_ours.flush(detok_ours.new_stream(1)).shape == (1, 1, 0)  # nothing decoded, nothing held back
    with pytest.raises(ValueError, match="batch size 1 does not match the stream's 3"):
        detok_ours.decode_step(codes[:1], detok_ours.new_stream(3))


def test_bfloat16_close(lfm25_ckpt):
    """The LFM2 part run in bf16 (the spectrum and inverse STFT stay float32): close to float32, not equal.
    Measured 0.059 of the peak on these codes (0.046 to 0.080 over seeds 0-5: bf16 rounds the log-magnitudes)."""
    codes = _detok_codes(1, 20, 5)
    full = Detokenizer.from_folder(lfm25_ckpt / DETOKENIZER_DIR)
    half = Detokenizer.from_folder(lfm25_ckpt / DETOKENIZER_DIR, dtype=torch.bfloat16)
    assert half.lfm.layers[0].feed_forward.w1.weight.dtype == torch.bfloat16
    assert half.istft.window.dtype == torch.float32
    got = half.decode(codes)
    assert got.dtype == torch.float32 and 0.03 < _detok_rel_diff(got, full.decode(codes)) < 0.075


@pytest.mark.parametrize("codes, message", [
    (torch.full((1, 8, 3), 2048), "must be in 0..2047"),
    (torch.zeros(1, 7, 3, dtype=torch.long), "shape [batch, 8, frames]"),
    (torch.zeros(1, 8, 3), "integer"),
])
def test_bad_codes(detok_ours, codes, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        detok_ours.decode(codes)


def test_bad_folders(lfm25_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="detokenizer config not found"):
        Detokenizer.from_folder(tmp_path)
    folder = tmp_path / "detok"
    shutil.copytree(lfm25_ckpt / DETOKENIZER_DIR, folder)
    state = load_file(folder / "model.safetensors")
    del state["lfm.layers.2.self_attn.q_proj.weight"]
    state["lin.weight"] = state["lin.weight"][:-1]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors: lfm.layers.2.self_attn.q_proj.weight; "
                                         r"wrong shapes: lin.weight \(1281, 512\) \(expected \(1282, 512\)\)"):
        Detokenizer.from_folder(folder)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 512}))
    with pytest.raises(ValueError, match="not an LFM2 detokenizer config"):
        Detokenizer.from_folder(folder)


# ---- run.py on the LFM2.5 fixture ----

@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def lfm25_official(request):
    """(folder, official model, official processor with its detokenizer on the CPU), float32; the folder's
    detokenizer file stored in float32 or bfloat16."""
    official()
    folder = fixtures.cached_lfm25_checkpoint(TINY_CONFIG, 0, request.param)
    model, _ = load_official(folder)
    return folder, model, official_processor_cpu(folder)


@pytest.mark.parametrize("task, cli, vocoder", [
    ("chat", ["--wav", str(ASSETS / "question.wav")], None),
    ("tts", ["--mode", "tts", "--text", PROMPTS["tts"][2]], None),
    ("tts", ["--mode", "tts", "--text", PROMPTS["tts"][2]], "mimi"),
])
def test_run_lfm25(task, cli, vocoder, lfm25_official, tmp_path):
    """run.py on an LFM2.5 folder: the official generation item for item; the wav equals the official decode of
    the generated frames: the LFM2 detokenizer by default (as the official processor's decode), or Mimi."""
    extra = ["--vocoder", vocoder] if vocoder else []
    lfm25_ckpt, model, processor = lfm25_official
    run_ok(["--model", lfm25_ckpt, *cli, *extra, "--greedy", "--max-new-tokens", RUN_MAX_NEW, "--device", "cpu",
             "--codes-out", "codes.json", "--out", "answer.wav"], tmp_path)
    ochat = official_prompt(processor, task)
    got = json.loads((tmp_path / "codes.json").read_text())
    assert got["prompt_ids"] == ochat.text[0].tolist()
    want = official_generate(model, ochat, PROMPTS[task][3], RUN_MAX_NEW, drop_im_end=True)
    assert [tuple(item) for item in got["items"]] == want, "generated items differ from the official generation"
    frames = [v for k, v in want if k == "audio" and END_OF_AUDIO not in v]
    assert frames, "the answer should have audio to compare"
    codes = torch.tensor(frames).T[None]  # [1, 8, T]
    with torch.no_grad():
        ref = (processor.mimi.decode(codes)[0] if vocoder == "mimi" else processor.decode(codes))[0].numpy()
    data, rate = sf.read(str(tmp_path / "answer.wav"), dtype="float32")
    assert rate == 24000 and data.shape == ref.shape == (DETOK_FRAME_SIZE * len(frames),)
    assert float(np.abs(data - ref).max()) <= DETOK_PARITY_TOL * float(np.abs(ref).max())


# ====================================================================================================
# The command line: run.py
#
# run.py, the command line: greedy answers of every mode equal the official pipeline item for item (the same
# prompt, built as the official README builds it), the streamed wav equals the official Mimi decode of the same
# codes, and every bad input ends in one `error:` line and a non-zero exit.
#
# run.py runs as a subprocess on the tiny checkpoint (real file layout, real-size Mimi). The subprocesses get
# OMP_NUM_THREADS=1: on a CPU shared with other jobs, two OpenMP threads spin-wait on each other and a Mimi
# frame takes seconds instead of ~60 ms; the thread count does not change what is computed.
# ====================================================================================================

RUN_MAX_NEW = 40  # backbone steps per answer: enough for text, audio, end of audio and text again


RUN_WAV_ATOL = 1e-4  # streamed wav vs the official whole-sequence Mimi decode: max abs diff


def _run_check_answer(codes_json: Path, wav: Path | None, ochat, processor, model, mode: str) -> tuple[list, str]:
    """codes JSON == official prompt ids and items; wav == official Mimi decode (wav None: ASR, no audio
    decoded). Returns the items and the answer's text as run.py should print it."""
    got = json.loads(codes_json.read_text())
    assert got["prompt_ids"] == ochat.text[0].tolist(), "prompt ids differ from the official ChatState's"
    want = official_generate(model, ochat, mode, RUN_MAX_NEW, drop_im_end=True)  # run.py writes no final <|im_end|>
    assert [tuple(item) for item in got["items"]] == want, \
        "generated items differ from the official generation (greedy: must be equal)"
    text = processor.text.decode([v for k, v in want if k == "text"], skip_special_tokens=True)
    assert text.strip(), "the answer should have text to compare"
    if wav is None:
        return want, text + "\n"
    frames = [v for k, v in want if k == "audio" and END_OF_AUDIO not in v]
    assert frames, "the answer should have audio to compare"

    with torch.no_grad():
        ref = processor.mimi.decode(torch.tensor(frames).T[None])[0, 0].numpy()  # [1920 * frames]
    data, rate = sf.read(str(wav), dtype="float32")
    assert rate == 24000
    assert data.shape == ref.shape, f"wav has {data.shape[0]} samples, official decode {ref.shape[0]}"
    diff = float(np.abs(data - ref).max())
    assert diff <= RUN_WAV_ATOL, f"wav vs official Mimi decode: max abs diff {diff:.2e} > {RUN_WAV_ATOL}"
    return want, text + "\n"


@pytest.mark.parametrize("task, cli", [
    ("chat", ["--wav", ASSETS / "question.wav"]),
    ("asr", ["--mode", "asr", "--wav", ASSETS / "asr.wav"]),
    ("tts", ["--mode", "tts", "--voice", "uk-male", "--text", PROMPTS["tts"][2]]),
])
def test_run_matches_official(task, cli, tiny_ckpt, official_tiny, tmp_path):
    r = run_ok(["--model", tiny_ckpt, *cli, "--greedy", "--max-new-tokens", RUN_MAX_NEW, "--device", "cpu",
                 "--codes-out", "codes.json", "--out", "answer.wav"], tmp_path)
    assert "[time] load" in r.stderr and "first text" in r.stderr, r.stderr
    model, processor = official_tiny
    ochat = official_prompt(processor, task)  # same system prompt and user turn as the CLI's
    wav = None if task == "asr" else tmp_path / "answer.wav"  # ASR loads no Mimi and writes no audio
    assert (tmp_path / "answer.wav").exists() == (wav is not None)
    _, text = _run_check_answer(tmp_path / "codes.json", wav, ochat, processor, model, PROMPTS[task][3])
    if task == "asr":  # a line per chunk with its span (test_asr.py); asr.wav is one chunk
        text = f"[00:00:00.000 --> 00:00:18.356] {text.strip()}\n"
    assert r.stdout == text, f"stdout {r.stdout!r} != the answer's text {text!r}"


def test_run_two_turn_chat(tiny_ckpt, official_tiny, tmp_path):
    question = "What is the capital of France?"
    r = run_ok(["--model", tiny_ckpt, "--chat", "--greedy", "--max-new-tokens", RUN_MAX_NEW, "--device", "cpu",
                 "--codes-out", "codes.json"], tmp_path, stdin=f"{ASSETS / 'question.wav'}\n{question}\n")  # then EOF
    assert r.stderr.count("[time] load") == 2, r.stderr
    model, processor = official_tiny
    ochat = official_prompt(processor, "chat")
    first, text1 = _run_check_answer(tmp_path / "codes_1.json", tmp_path / "answer_1.wav", ochat, processor, model,
                                     "interleaved")
    official_append(ochat, first)  # history: the model's own text ids and audio frames
    ochat.end_turn()
    ochat.new_turn("user")
    ochat.add_text(question)
    ochat.end_turn()
    ochat.new_turn("assistant")
    _, text2 = _run_check_answer(tmp_path / "codes_2.json", tmp_path / "answer_2.wav", ochat, processor, model,
                                 "interleaved")
    assert r.stdout == text1 + text2, f"stdout {r.stdout!r} != the answers' text {text1 + text2!r}"


