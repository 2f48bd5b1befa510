"""Shared test fixtures: the official reference package and checkpoint folders in the real file layout.

The official `liquid-audio` is set up by `python .ci/reference.py`. Without it the parity tests skip,
except where LFM2AUDIO_REQUIRE_REFERENCE=1 or CI=true (as `.ci/run` sets): there a missing reference fails.
"""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / ".ci"))
import reference  # noqa: E402  (.ci/reference.py)

REQUIRE_REFERENCE = os.environ.get("LFM2AUDIO_REQUIRE_REFERENCE") == "1" or os.environ.get("CI") == "true"


def official():
    """Import and return the official `liquid_audio` package; skip, or fail in CI, when it is missing."""
    reference.ensure_on_path()
    try:
        import liquid_audio
    except ImportError as e:
        msg = f"official liquid-audio not importable ({e}); run `python .ci/reference.py`"
        if REQUIRE_REFERENCE:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return liquid_audio


# ---- an LFM2-shaped text tokenizer -------------------------------------------------------------------

# LFM2's pre-tokenizer split (SPEC.md)
LFM2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NAMED_SPECIALS = {
    0: "<|pad|>", 1: "<|startoftext|>", 2: "<|endoftext|>", 3: "<|fim_pre|>", 4: "<|fim_mid|>",
    5: "<|fim_suf|>", 6: "<|im_start|>", 7: "<|im_end|>", 8: "<|tool_list_start|>", 9: "<|tool_list_end|>",
    10: "<|tool_call_start|>", 11: "<|tool_call_end|>", 12: "<|tool_response_start|>",
    13: "<|tool_response_end|>", 128: "<|audio_start|>", 129: "<|text_start|>", 130: "<|text_end|>",
    131: "<|mixed_start|>", 132: "<|mixed_end|>",
}
SPECIALS = [NAMED_SPECIALS.get(i, f"<|reserved_{i - 10}|>") for i in range(501)]


def training_corpus():
    """Text to train a small BPE on: the standard library's sources (prose in docstrings, and code)."""
    stdlib = Path(json.__file__).resolve().parent.parent
    for path in sorted(stdlib.glob("*.py"))[:120]:
        yield path.read_text(encoding="utf-8", errors="replace")
    yield "Café naïve résumé Ünïcödé 東京都 北京 مرحبا بالعالم 👩‍👩‍👧 123 4567 89012\n\t\r\n"


def write_tokenizer(folder: Path, vocab_size: int = 4000, merges_as_pairs: bool = False) -> Path:
    """Train a byte-level BPE shaped like LFM2's and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LFM2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    spec = json.loads(path.read_text())
    if not merges_as_pairs:  # the older "a b" string form
        spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    path.write_text(json.dumps(spec, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>",
        "eos_token": "<|im_end|>", "pad_token": "<|pad|>", "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 128000,
    }, indent=1))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A folder with an LFM2-shaped tokenizer.json (merges as "a b" strings) and tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    return folder
