"""The command-line options that run.py and serve.py share: the model, the hardware, generation and sampling."""

import argparse
import sys

import tasks
from lfm2audio import Sampling

DEFAULT_MODEL = "LiquidAI/LFM2-Audio-1.5B"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of the CLI (argparse adds the usage)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def model_options(p: argparse.ArgumentParser):
    """The model, hardware and generation options."""
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Hugging Face repo id or local folder ({DEFAULT_MODEL})")
    p.add_argument("--max-new-tokens", type=int, default=tasks.MAX_NEW_TOKENS,
                   help=f"per answer (default {tasks.MAX_NEW_TOKENS})")
    p.add_argument("--context", type=int, default=tasks.CONTEXT,
                   help=f"context length in positions (default {tasks.CONTEXT})")
    p.add_argument("--greedy", action="store_true", help="greedy text and audio (overrides the sampling options)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--vocoder", choices=["mimi", "lfm2"],
                   help="audio decoder: lfm2 = the LFM2 detokenizer of LFM2.5-Audio (its audio_detokenizer/ folder; "
                        "the default when there is one, as in the official package), mimi = Mimi (otherwise)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", *tasks.DTYPES],
                   help="model dtype (auto: bfloat16 on cuda and on CPUs with native bf16, AVX512-BF16 or AMX; "
                        "float32 elsewhere); the audio decoder always runs in float32")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="weight-only quantization of the decoder's linear layers: int8 (about 1.5 GB of weights, "
                        "close to bf16's accuracy) or int4 (about 0.8 GB, the fastest on a CPU, less accurate; "
                        "cpu and cuda only)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode path at load (CUDA graphs on cuda): minutes more to load the first "
                        "time, less later (torch's disk cache); faster steps for long answers")

def sampling(args, task: str) -> Sampling:
    """The official settings of the task, overridden by the options run.py has (0 means greedy / no top-k)."""
    if args.greedy:
        return Sampling()
    default = tasks.TASKS[task].sampling
    given = [getattr(args, name, None) for name in ("temperature", "top_k", "audio_temperature", "audio_top_k")]
    values = [g if g is not None else d for g, d in zip(given, (default.text_temperature, default.text_top_k,
                                                                default.audio_temperature, default.audio_top_k))]
    return Sampling(*(None if v is not None and v <= 0 else v for v in values))
