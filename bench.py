"""Benchmarks: `python bench.py <name> [options]`, one function per benchmark, each prints a table and one
JSON line (so that results can be collected by a script).

    python bench.py tokenizer [--tokenizer path/to/tokenizer.json] [--megabytes 1] [--repeat 3]
    python bench.py decode [--model DIR] [--device cpu] [--dtype float32 [bfloat16]] [--steps 48] [--compile]
                           [--quantize int8 [int4]] [--quantized-only]
    python bench.py accuracy [--model DIR] [--steps 48] [--variants bfloat16 int8 int4 ...]
    python bench.py asr [--model DIR] [--chunks 8] [--batches 1,4,8] [--max-new-tokens 64]
    python bench.py vocoder [--model DIR] [--device cpu] [--frames 150] [--rounds 3]
    python bench.py serve [--model DIR] [--quantize int8|int4] [--steps 64]      (bench_serve.py)
    python bench.py tts [--model DIR] [--quantize int8|int4] [--compile]         (bench_serve.py)
    python bench.py page [--model DIR] [--quantize int8] [--rounds 3]           (bench_page.py)

Each benchmark lives in bench_<name>.py (serve and tts in bench_serve.py) with its options; this file holds the
command line and the helpers they share.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / ".ci"))  # fixtures.py: test checkpoints and the official package, no pytest


def sync():
    """Wait for the GPU's queued work, so that a host clock read next times it (a no-op without CUDA)."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def task_prompt(model, task):
    """Our Chat of a benchmark task (chat, tts, ...: fixtures.PROMPTS), its audio read from assets/."""
    import audio
    from fixtures import build_prompt
    from lfm2audio import Chat

    return build_prompt(Chat(model.tokenizer), task, audio.load_audio)


def long_recording(seconds: float):
    """The repository's two recordings at 16 kHz, alternating, with pauses of 0.3-1.5 s, for `seconds`."""
    import numpy as np
    import torch

    import audio
    from fixtures import ASSETS

    waves = [audio.resample(*audio.load_audio(ASSETS / n), 16000) for n in ("asr.wav", "question.wav")]
    rng, pieces, n = np.random.default_rng(0), [], 0
    while n < seconds * 16000:
        pieces += [waves[len(pieces) // 2 % 2], torch.zeros(int(rng.uniform(0.3, 1.5) * 16000))]
        n += pieces[-2].numel() + pieces[-1].numel()
    return torch.cat(pieces)


def main(argv=None):
    # imported here: each of them imports this module for the helpers above
    import bench_accuracy
    import bench_asr
    import bench_decode
    import bench_page
    import bench_serve
    import bench_tokenizer
    import bench_vocoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    for module in (bench_tokenizer, bench_decode, bench_asr, bench_vocoder, bench_accuracy, bench_serve, bench_page):
        module.add_parsers(sub)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    main()
