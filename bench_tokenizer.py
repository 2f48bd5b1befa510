"""`python bench.py tokenizer`: encode throughput on English text, our pure-Python tokenizer vs Hugging Face
`tokenizers`, cold and warm, one huge text and paragraph by paragraph; our decode."""

import ast
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import ROOT


def _english_text(n_bytes: int) -> str:
    """Deterministic English prose: the docstrings of the standard library's modules, in file order."""
    stdlib = Path(json.__file__).resolve().parent.parent
    chunks, size = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if "test" in path.parts or "idlelib" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:  # prose, not one-liners
                    chunks.append(doc)
                    size += len(doc.encode()) + 2
        if size >= n_bytes:
            break
    text = "\n\n".join(chunks).encode()[:n_bytes].decode("utf-8", errors="ignore")
    if len(text.encode()) < n_bytes * 0.99:
        raise RuntimeError(f"only {len(text.encode())} bytes of docstrings found in {stdlib}")
    return text


def _timed(fn, repeat: int) -> float:
    """Best wall time of `repeat` calls."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _encode_seconds(path, ours, hf, text: str, paragraphs: list[str], repeat: int) -> dict:
    """Best encode time of each side: cold (a fresh tokenizer, empty word cache; load time not counted), warm
    (cache already filled), and paragraph by paragraph."""
    from tokenizers import Tokenizer as HFTokenizer

    from tokenizer import Tokenizer

    def ours_cold():
        tok = Tokenizer.from_file(path)
        t = time.perf_counter()
        tok.encode(text)
        return time.perf_counter() - t

    def hf_cold():
        tok = HFTokenizer.from_file(str(path))
        t = time.perf_counter()
        tok.encode(text, add_special_tokens=False)
        return time.perf_counter() - t

    return {
        "ours_cold": min(ours_cold() for _ in range(repeat)),
        "ours_warm": _timed(lambda: ours.encode(text), repeat),
        "tokenizers_cold": min(hf_cold() for _ in range(repeat)),
        "tokenizers_warm": _timed(lambda: hf.encode(text, add_special_tokens=False), repeat),
        # the usual use: many short texts, one call each (tokenizers is slow on one huge string)
        "ours_paragraphs": _timed(lambda: [ours.encode(p) for p in paragraphs], repeat),
        "tokenizers_paragraphs": _timed(lambda: [hf.encode(p, add_special_tokens=False) for p in paragraphs],
                                        repeat),
    }


def bench_tokenizer(args) -> dict:
    """Encode throughput on English text: our pure-Python tokenizer vs Hugging Face `tokenizers`."""
    from tokenizers import Tokenizer as HFTokenizer

    from tokenizer import Tokenizer

    path = args.tokenizer
    if path is None:  # an LFM2-shaped BPE trained on the stdlib (the real file cannot be downloaded here)
        sys.path.insert(0, str(ROOT))
        from fixtures import write_tokenizer
        path = write_tokenizer(Path(tempfile.mkdtemp(prefix="bench-tokenizer-")), vocab_size=args.vocab_size)
    text = _english_text(int(args.megabytes * 1e6))
    n_mb = len(text.encode()) / 1e6
    paragraphs = text.split("\n\n")

    hf = HFTokenizer.from_file(str(path))
    expected = hf.encode(text, add_special_tokens=False).ids
    ours = Tokenizer.from_file(path)
    if ours.encode(text) != expected:
        raise RuntimeError("our ids differ from tokenizers' on the benchmark text")
    rows = _encode_seconds(path, ours, hf, text, paragraphs, args.repeat)
    ours_decode = _timed(lambda: ours.decode(expected), args.repeat)
    mbps = {k: n_mb / v for k, v in rows.items()}

    print(f"tokenizer: {n_mb:.2f} MB of stdlib docstrings ({len(paragraphs)} paragraphs), {len(expected)} tokens, "
          f"vocab {ours.vocab_size}, best of {args.repeat}")
    print(f"{'encode':<22}{'seconds':>10}{'MB/s':>10}")
    for k, v in rows.items():
        print(f"{k:<22}{v:>10.3f}{mbps[k]:>10.2f}")
    print(f"{'ours decode':<22}{ours_decode:>10.3f}{n_mb / ours_decode:>10.2f}")
    result = {
        "bench": "tokenizer", "megabytes": round(n_mb, 3), "tokens": len(expected), "vocab": ours.vocab_size,
        **{f"{k}_mb_s": round(v, 3) for k, v in mbps.items()},
        "ratio_cold": round(mbps["ours_cold"] / mbps["tokenizers_cold"], 3),
        "ratio_warm": round(mbps["ours_warm"] / mbps["tokenizers_warm"], 3),
        "ratio_paragraphs": round(mbps["ours_paragraphs"] / mbps["tokenizers_paragraphs"], 3),
        "ours_decode_mb_s": round(n_mb / ours_decode, 3),
    }
    print(json.dumps(result))
    return result


def add_parsers(sub):
    p = sub.add_parser("tokenizer", help=bench_tokenizer.__doc__)
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: train an LFM2-shaped one)")
    p.add_argument("--vocab-size", type=int, default=64400, help="vocabulary of the trained tokenizer")
    p.add_argument("--megabytes", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.set_defaults(fn=bench_tokenizer)
