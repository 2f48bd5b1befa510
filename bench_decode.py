"""`python bench.py decode`: greedy decoding, ours against the official package on the same checkpoint and
prompts, in one process with one model in memory at a time: load, prefill, time to first audio, steady-state
frames/s and RTF (TTS and chat), peak memory, and the floor that the weight bandwidth sets."""

import fcntl
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

from bench import median_time, sync, task_prompt
from bench_decode_report import report

FRAME_S = 0.08  # seconds of audio per frame (1920 samples at 24 kHz)


def _matvec_bandwidth(device, repeat: int = 5) -> float:
    """Bytes/s of fp32 matrix-vector products over 1 GiB of weights (8 matrices 8192 x 4096, each read once
    per pass: far beyond the caches), median pass. The most a decode step that reads its weights can get."""
    import torch

    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(8192, 4096, generator=g).to(device) for _ in range(8)]
    x = torch.randn(1, 4096, generator=g).to(device)

    def sweep():
        for m in mats:
            torch.nn.functional.linear(x, m)
    sweep()
    seconds = median_time(sweep, repeat)
    return sum(m.numel() * m.element_size() for m in mats) / seconds


def _weight_bytes(model) -> dict:
    """Bytes of weights one decode step reads (embedding lookups, a few rows, left out): the backbone, plus
    the text logits (a text step) or depth_linear + 8 depthformer passes + the 8 codebook heads (a frame)."""
    def size(module):  # the state dict: parameters and int8 weights with their scales, not the caches
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())
    backbone = size(model.lfm.layers) + size(model.lfm.embedding_norm)
    frame = size(model.depth_linear) + model.cfg.codebooks * size(model.depthformer) + sum(
        size(e.to_logits) + size(e.embedding_norm) for e in model.depth_embeddings)
    return {"audio_step": backbone + frame, "text_step": backbone + size(model.text_head)}


def _rss_reset():
    """Reset the process's peak RSS (VmHWM), so that the next reading is the peak of what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_peak_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _run_name(name: str, dtype, quantize=None) -> str:
    """official, ours, ours-compiled (float32); -bf16 and -int8 suffixes for the others."""
    import torch

    return name + ("-bf16" if dtype == torch.bfloat16 else "") + (f"-{quantize}" if quantize else "")


class _Ours:
    """Our model behind the bench's interface: load, prompts, prefill, a timed generation with Mimi."""

    name = "ours"

    def __init__(self, folder, device, dtype, context, compile=False, quantize=None):
        from compiled import compile_decode
        from checkpoint import MIMI_FILE
        from lfm2audio import LFM2Audio
        from mimi import Mimi

        self.model = LFM2Audio.from_pretrained(folder, device=device, dtype=dtype, max_seq_len=context,
                                               quantize=quantize)
        if compile:
            compile_decode(self.model)
        self.mimi = Mimi.from_file(Path(folder) / MIMI_FILE, device=device)
        self.name = _run_name("ours-compiled" if compile else "ours", dtype, quantize)

    def prompt(self, task):
        return task_prompt(self.model, task)

    def prefill(self, chat):
        return self.model.prefill(self.model.embed_prompt(chat))

    def generate(self, chat, mode, steps):
        for kind, value in self.model.generate(chat, mode, steps):
            yield (int(value),) if kind == "text" else tuple(value.tolist()), value

    def stream(self):
        stream = self.mimi.new_stream(1)
        return lambda frame: self.mimi.decode_step(frame.view(1, -1, 1), stream)


class _Official:
    name = "official"

    def __init__(self, folder, device, dtype, context):
        from fixtures import official
        official()
        from liquid_audio import LFM2AudioModel, LFM2AudioProcessor

        self.model = LFM2AudioModel.from_pretrained(Path(folder), dtype=dtype, device=str(device)).eval()
        self.processor = LFM2AudioProcessor.from_pretrained(Path(folder), device=str(device)).eval()
        self.mimi = self.processor.mimi  # loaded lazily; load time counts
        self.name = _run_name("official", dtype)

    def prompt(self, task):
        from fixtures import official_prompt
        return official_prompt(self.processor, task)

    def prefill(self, chat):
        x = self.model._prefill(**chat)
        return self.model.lfm(inputs_embeds=x, use_cache=True).last_hidden_state[0, -1]

    def generate(self, chat, mode, steps):
        gen = self.model.generate_interleaved if mode == "interleaved" else self.model.generate_sequential
        for t in gen(**chat, max_new_tokens=steps):
            yield tuple(t.tolist()), t

    def stream(self):
        # the demo's `with mimi.streaming(1)` block, held open for one generation
        if getattr(self, "_streaming", None) is not None:
            self._streaming.__exit__(None, None, None)
        self._streaming = self.mimi.streaming(1)
        self._streaming.__enter__()
        return lambda frame: self.mimi.decode(frame[None, :, None])


def _timed_generation(impl, chat, mode, steps) -> dict:
    """Generate with streaming Mimi decode of every audio frame (as run.py and the official demo do), timing
    each item: LM seconds (the generator's step) and Mimi seconds."""
    from sound import is_end_of_audio

    decode = impl.stream()
    items, lm, mimi, first_audio = [], [], [], None
    t0 = t = time.perf_counter()
    for key, value in impl.generate(chat, mode, steps):
        lm.append(time.perf_counter() - t)
        t = time.perf_counter()
        if len(key) > 1 and not is_end_of_audio(value):  # not sound: not decoded
            decode(value)
            sync()  # the waveform is ready (a player would copy it to the host now)
            if first_audio is None:
                first_audio = time.perf_counter() - t0
        mimi.append(time.perf_counter() - t)
        items.append(key)
        t = time.perf_counter()
    total = time.perf_counter() - t0
    return {"items": items, "lm": lm, "mimi": mimi, "first_audio": first_audio, "total": total}


def _steady(run: dict, audio_only: bool) -> dict:
    """Steady state of a generation, the first item (prefill) left out: per-frame LM and Mimi seconds
    (medians over audio items), per-text-token LM seconds, and RTF = (LM + Mimi time) / audio seconds over
    the audio items (`audio_only`, TTS) or over all items (chat: its text is part of the stream)."""
    rest = list(zip(run["items"], run["lm"], run["mimi"]))[1:]
    audio = [(lm, mi) for key, lm, mi in rest if len(key) > 1]
    text = [lm for key, lm, _ in rest if len(key) == 1]
    out = {"n_audio": len(audio), "n_text": len(text)}
    if audio:
        out["frame_lm_s"] = statistics.median(lm for lm, _ in audio)
        out["frame_mimi_s"] = statistics.median(mi for _, mi in audio)
        out["fps"] = 1 / (out["frame_lm_s"] + out["frame_mimi_s"])
        spent = sum(lm + mi for lm, mi in audio) if audio_only else sum(lm + mi for _, lm, mi in rest)
        out["rtf"] = spent / (len(audio) * FRAME_S)
    if text:
        out["text_lm_s"] = statistics.median(text)
    return out


def _bench_impl(make, args) -> dict:
    import torch

    gc.collect()
    _rss_reset()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()  # what earlier runs left (compiled graphs keep their models)
    t = time.perf_counter()
    impl = make()
    sync()
    res = {"load_s": time.perf_counter() - t}
    with torch.no_grad():
        chat = impl.prompt("chat")
        impl.prefill(chat)  # warm-up
        res["prefill_s"] = median_time(lambda: impl.prefill(chat), 3)
        if impl.name.startswith("ours-compiled"):  # compile (and warm) the decode path outside the timed runs
            t = time.perf_counter()
            _timed_generation(impl, impl.prompt("tts"), "sequential", args.steps)
            _timed_generation(impl, chat, "interleaved", args.steps)
            res["compile_s"] = time.perf_counter() - t
        chat_run = _timed_generation(impl, impl.prompt("chat"), "interleaved", args.steps)
        tts_run = _timed_generation(impl, impl.prompt("tts"), "sequential", args.steps)
    res["ttfa_s"] = chat_run["first_audio"]
    res["chat"] = _steady(chat_run, audio_only=False)
    res["tts"] = _steady(tts_run, audio_only=True)
    res["items"] = {"chat": chat_run["items"], "tts": tts_run["items"]}
    res["peak_rss_gb"] = _rss_peak_gb()
    res["peak_gpu_gb"] = (torch.cuda.max_memory_allocated() - held) / 2**30 if cuda else None
    if isinstance(impl, _Ours):
        res["weight_bytes"] = _weight_bytes(impl.model)
    res["name"] = impl.name
    del impl
    gc.collect()
    return res


def _makers(args, folder, device) -> list:
    """A function per run that loads its implementation: per dtype the official package, ours and ours
    compiled, then ours quantized."""
    import torch

    dtypes = [getattr(torch, d) for d in args.dtype]
    makers = []
    for dtype in dtypes:  # each dtype: official, ours, ours compiled
        if not args.no_official:
            makers.append(lambda dtype=dtype: _Official(folder, device, dtype, args.context))
        if not args.quantized_only:
            makers.append(lambda dtype=dtype: _Ours(folder, device, dtype, args.context))
        if args.compile and not args.quantized_only:
            makers.append(lambda dtype=dtype: _Ours(folder, device, dtype, args.context, compile=True))
    for q in args.quantize or ():  # in the last dtype (the quantized matmuls take bf16 activations on a CPU)
        makers.append(lambda q=q: _Ours(folder, device, dtypes[-1], args.context, quantize=q))
        if args.compile:
            makers.append(lambda q=q: _Ours(folder, device, dtypes[-1], args.context, compile=True, quantize=q))
    return makers


def _run_rounds(makers, args) -> tuple[dict, int]:
    """Every run, args.rounds times: ({run name: [its results, a round each]}, how many failed)."""
    results, failed = {}, 0
    for _ in range(args.rounds):
        for make in makers:
            try:
                r = _bench_impl(make, args)
            except Exception:  # reported; the other implementations still run (a first run on a GPU)
                traceback.print_exc()
                failed += 1
                continue
            # each run's figures at once: a run cut short by a time limit keeps those already done
            print(json.dumps({"run": r["name"], **{k: v for k, v in r.items() if k not in ("name", "items")}}),
                  flush=True)
            results.setdefault(r.pop("name"), []).append(r)
    return results, failed


def bench_decode(args) -> dict:
    """Greedy decode, ours vs the official package on the same checkpoint and prompts, one process, one model
    in memory at a time: load, prefill, time to first audio, steady-state frames/s and RTF (TTS and chat),
    peak RSS, and the weight-bandwidth floor."""
    import torch

    from fixtures import FULL_CONFIG, cached_checkpoint

    device = torch.device(args.device)
    folder = Path(args.model) if args.model else cached_checkpoint(FULL_CONFIG, 0)
    makers = _makers(args, folder, device)
    with open("/tmp/lfm2audio-bigmem.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # full-size models: one big-memory job on the machine at a time
        bandwidth = [_matvec_bandwidth(device)]
        runs, failed = _run_rounds(makers, args)
        bandwidth.append(_matvec_bandwidth(device))
    bw = statistics.median(bandwidth)
    if not any(n.startswith("ours") for n in runs):
        sys.exit(f"error: none of our runs finished ({failed} failed, tracebacks above)")
    result = report(runs, bw, folder, args, failed)
    print(json.dumps(result))
    if failed:
        sys.exit(f"error: {failed} run(s) failed (tracebacks above)")
    return result


def add_parsers(sub):
    import quantize

    p = sub.add_parser("decode", help=bench_decode.__doc__)
    p.add_argument("--model", help="checkpoint folder (default: the full-size random-weight test fixture)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="one or more: official and ours run in each")
    p.add_argument("--quantize", nargs="+", choices=quantize.SCHEMES, metavar="SCHEME",
                   help="also ours with quantized weights, each scheme (int8, int4, or int4-PART: PART alone in 4 "
                        "bits), in the last --dtype")
    p.add_argument("--quantized-only", action="store_true",
                   help="ours only with --quantize, eager (and compiled with --compile); the official in each dtype")
    p.add_argument("--steps", type=int, default=48, help="greedy backbone steps per generation")
    p.add_argument("--context", type=int, default=4096, help="our static cache length (run.py's default)")
    p.add_argument("--compile", action="store_true", help="also run ours with the compiled decode path")
    p.add_argument("--no-official", action="store_true", help="ours only")
    p.add_argument("--rounds", type=int, default=1, help="alternate the implementations this many times")
    p.set_defaults(fn=bench_decode)
