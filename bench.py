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
"""

import argparse
import ast
import fcntl
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / ".ci"))  # fixtures.py: test checkpoints and the official package, no pytest


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

    # cold: a fresh tokenizer, empty word cache (load time not counted); warm: cache already filled
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

    rows = {
        "ours_cold": min(ours_cold() for _ in range(args.repeat)),
        "ours_warm": _timed(lambda: ours.encode(text), args.repeat),
        "tokenizers_cold": min(hf_cold() for _ in range(args.repeat)),
        "tokenizers_warm": _timed(lambda: hf.encode(text, add_special_tokens=False), args.repeat),
        # the usual use: many short texts, one call each (tokenizers is slow on one huge string)
        "ours_paragraphs": _timed(lambda: [ours.encode(p) for p in paragraphs], args.repeat),
        "tokenizers_paragraphs": _timed(lambda: [hf.encode(p, add_special_tokens=False) for p in paragraphs],
                                        args.repeat),
    }
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


# ---- decode: our LFM2-Audio vs the official package ----

FRAME_S = 0.08  # seconds of audio per frame (1920 samples at 24 kHz)


def _sync():
    """Wait for the GPU's queued work, so that a host clock read next times it (a no-op without CUDA)."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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
    seconds = _median_time(sweep, repeat)
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
        return _prompt(self.model, task)

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
    from tasks import is_end_of_audio

    decode = impl.stream()
    items, lm, mimi, first_audio = [], [], [], None
    t0 = t = time.perf_counter()
    for key, value in impl.generate(chat, mode, steps):
        lm.append(time.perf_counter() - t)
        t = time.perf_counter()
        if len(key) > 1 and not is_end_of_audio(value):  # not sound: not decoded
            decode(value)
            _sync()  # the waveform is ready (a player would copy it to the host now)
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
    _sync()
    res = {"load_s": time.perf_counter() - t}
    with torch.no_grad():
        chat = impl.prompt("chat")
        impl.prefill(chat)  # warm-up
        res["prefill_s"] = _median_time(lambda: impl.prefill(chat), 3)
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


def bench_decode(args) -> dict:
    """Greedy decode, ours vs the official package on the same checkpoint and prompts, one process, one model
    in memory at a time: load, prefill, time to first audio, steady-state frames/s and RTF (TTS and chat),
    peak RSS, and the weight-bandwidth floor."""
    import torch

    from fixtures import FULL_CONFIG, cached_checkpoint

    device = torch.device(args.device)
    dtypes = [getattr(torch, d) for d in args.dtype]
    folder = Path(args.model) if args.model else cached_checkpoint(FULL_CONFIG, 0)
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
    with open("/tmp/lfm2audio-bigmem.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # full-size models: one big-memory job on the machine at a time
        bandwidth = [_matvec_bandwidth(device)]
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
        bandwidth.append(_matvec_bandwidth(device))
    bw = statistics.median(bandwidth)
    runs = results
    if not any(n.startswith("ours") for n in runs):
        sys.exit(f"error: none of our runs finished ({failed} failed, tracebacks above)")
    ref_items = runs[next(iter(runs))][0]["items"]
    # greedy items are equal only at equal precision: the float32 runs must agree exactly; the others are
    # reported by how many leading items they share with the first run (bench.py accuracy measures them)
    exact = [n for n in runs if not any(s in n for s in ("bf16", "int8", "int4"))]
    same = all(r["items"] == ref_items for n in exact for r in runs[n])

    def prefix(items):  # leading items equal to the first run's, TTS and chat together
        return sum(next((i for i, (a, b) in enumerate(zip(items[k], ref_items[k])) if a != b),
                        min(len(items[k]), len(ref_items[k]))) for k in ("tts", "chat"))

    def med(name, *path):
        vals = []
        for r in runs[name]:
            v = r
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            if v is not None:
                vals.append(v)
        return statistics.median(vals) if vals else None

    ours = [n for n in runs if n.startswith("ours")]
    wb = runs[ours[0]][0]["weight_bytes"]
    floor = {"audio_step_s": wb["audio_step"] / bw, "text_step_s": wb["text_step"] / bw}
    metrics = [("load_s", ("load_s",)), ("prefill_s", ("prefill_s",)), ("ttfa_s", ("ttfa_s",)),
               ("tts_frame_lm_s", ("tts", "frame_lm_s")), ("tts_frame_mimi_s", ("tts", "frame_mimi_s")),
               ("tts_fps", ("tts", "fps")), ("tts_rtf", ("tts", "rtf")),
               ("chat_frame_lm_s", ("chat", "frame_lm_s")), ("chat_text_lm_s", ("chat", "text_lm_s")),
               ("chat_fps", ("chat", "fps")), ("chat_rtf", ("chat", "rtf")), ("peak_rss_gb", ("peak_rss_gb",)),
               ("peak_gpu_gb", ("peak_gpu_gb",)),
               ("compile_s", ("compile_s",))]
    table = {name: {m: med(name, *path) for m, path in metrics} for name in runs}
    print(f"decode bench: {folder.name}, {args.device} {' '.join(args.dtype)}, {args.steps} greedy steps per "
          f"run, {torch.get_num_threads()} threads, rounds {args.rounds}, same greedy items in the float32 runs: "
          f"{same}")
    print(f"matvec bandwidth {bw / 1e9:.1f} GB/s (fp32); weights read per audio step, text step (GB): " + ", ".join(
        f"{n} {runs[n][0]['weight_bytes']['audio_step'] / 1e9:.2f}, {runs[n][0]['weight_bytes']['text_step'] / 1e9:.2f}"
        for n in ours))
    names = list(runs)
    print(f"{'metric':<18}" + "".join(f"{n:>15}" for n in names))
    for m, _ in metrics:
        if any(table[n][m] is not None for n in names):
            print(f"{m:<18}" + "".join(f"{table[n][m]:>15.3f}" if table[n][m] is not None else f"{'-':>15}"
                                       for n in names))
    n_items = {n: {k: (runs[n][0][k]["n_audio"], runs[n][0][k]["n_text"]) for k in ("tts", "chat")} for n in names}
    print(f"items per run (audio, text) after the first: {n_items[names[0]]}")
    # the compiled path should give eager's greedy items at the same precision: measured, not assumed
    as_eager = {n: all(r["items"] == runs[e][0]["items"] for r in runs[n])
                for n in names if n.startswith("ours-compiled") and (e := n.replace("-compiled", "", 1)) in runs}
    total = sum(len(ref_items[k]) for k in ("tts", "chat"))
    print(f"greedy items: leading items equal to {names[0]}'s (of {total}): " + ", ".join(
        f"{n} {prefix(runs[n][0]['items'])}" for n in names[1:]) + "; compiled same as eager: " + ", ".join(
        f"{n} {v}" for n, v in as_eager.items()))

    def ratio(a, b):  # b/a for times: > 1 means `ours` is faster
        return None if a is None or b is None else round(b / a, 3)
    result = {"bench": "decode", "device": args.device, "dtype": args.dtype, "quantize": args.quantize,
              "steps": args.steps, "threads": torch.get_num_threads(), "same_items": same,
              "bandwidth_gb_s": round(bw / 1e9, 2), "floor_audio_step_s": round(floor["audio_step_s"], 4),
              "floor_text_step_s": round(floor["text_step_s"], 4),
              **{f"{n}_{m}": None if v is None else round(v, 4) for n in names for m, v in table[n].items()},
              **{f"{n}_prefix_items": prefix(runs[n][0]["items"]) for n in names if n not in exact},
              **{f"{n}_same_as_eager": v for n, v in as_eager.items()}, "failed_runs": failed}
    for base in ("official", "official-bf16"):  # speed-ups over the official package, per official dtype
        if base not in runs:
            continue
        tag = "" if base == "official" else "_bf16"
        for n in ours:
            for m in ("load_s", "prefill_s", "ttfa_s", "tts_frame_lm_s", "chat_frame_lm_s", "chat_text_lm_s",
                      "tts_rtf", "chat_rtf"):
                result[f"speedup{tag}_{n}_{m}"] = ratio(table[n][m], table[base][m])
    for n in ours:  # each against the floor of its own weight bytes
        w = runs[n][0]["weight_bytes"]
        for kind in ("tts", "chat"):
            if table[n][f"{kind}_frame_lm_s"] is not None:
                result[f"{n}_{kind}_frame_vs_floor"] = round(table[n][f"{kind}_frame_lm_s"] * bw / w["audio_step"], 3)
        if table[n]["chat_text_lm_s"] is not None:
            result[f"{n}_text_step_vs_floor"] = round(table[n]["chat_text_lm_s"] * bw / w["text_step"], 3)
    print(json.dumps(result))
    if failed:
        sys.exit(f"error: {failed} run(s) failed (tracebacks above)")
    return result


def _long_recording(seconds: float):
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


def bench_asr(args) -> dict:
    """Chunked ASR throughput (seconds of audio per second) on a long recording cut into chunks of at most 30 s:
    ours at each batch size vs the official package one chunk at a time (its only way), greedy, prompt building
    (mel), encoder, prefill and decode all timed, one model in memory at a time; all must give the same items."""
    import torch

    import tasks
    import transcribe
    from batch import generate_batch
    from fixtures import FULL_CONFIG, PROMPTS, cached_checkpoint, load_official, official_generate
    from lfm2audio import IM_END, Chat, LFM2Audio

    folder = Path(args.model) if args.model else cached_checkpoint(FULL_CONFIG, 0)
    wave = _long_recording(31 * args.chunks)
    spans = transcribe.split_at_pauses(wave, 16000, 30.0)[:args.chunks]
    audio_s = sum(b - a for a, b in spans) / 16000
    batches = [int(b) for b in args.batches.split(",")]
    results, items = {}, {}
    with open("/tmp/lfm2audio-bigmem.lock", "w") as lock, torch.no_grad():
        fcntl.flock(lock, fcntl.LOCK_EX)  # full-size models: one big-memory job on the machine at a time
        model = LFM2Audio.from_pretrained(folder, dtype=torch.float32, max_seq_len=512 + args.max_new_tokens)
        for batch in batches:
            t = time.perf_counter()
            chats = []
            for a, b in spans:
                chat = Chat(model.tokenizer)
                chat.new_turn("system"); chat.add_text(PROMPTS["asr"][0]); chat.end_turn()
                tasks.add_user_turn(chat, wave[a:b])
                chats.append(chat)
            got = dict(generate_batch(model, chats, "sequential", args.max_new_tokens, batch))
            results[f"ours_b{batch}"] = time.perf_counter() - t
            items[f"ours_b{batch}"] = [[(k, v if k == "text" else v.tolist()) for k, v in got[i]]
                                       for i in range(len(spans))]
        del model, chats, got
        gc.collect()
        if not args.no_official:
            off, proc = load_official(folder)
            from liquid_audio import ChatState

            t = time.perf_counter()
            items["official"] = []
            for a, b in spans:
                chat = ChatState(proc)
                chat.new_turn("system"); chat.add_text(PROMPTS["asr"][0]); chat.end_turn()
                chat.new_turn("user"); chat.add_audio(wave[None, a:b], 16000); chat.end_turn()
                chat.new_turn("assistant")
                items["official"].append(official_generate(off, chat, "sequential", args.max_new_tokens))
            results["official"] = time.perf_counter() - t
    same = all(v == next(iter(items.values())) for v in items.values())
    n_items = [len(i) for i in next(iter(items.values()))]
    ended = sum(i[-1] == ("text", IM_END) for i in next(iter(items.values())))
    print(f"asr bench: {folder.name}, cpu float32, {torch.get_num_threads()} threads, {len(spans)} chunks, "
          f"{audio_s:.1f} s of audio, <= {args.max_new_tokens} greedy steps per chunk (items per chunk {n_items}, "
          f"{ended} ended by <|im_end|>), same items in all runs: {same}")
    print(f"{'run':<12}{'seconds':>10}{'audio s/s':>12}{'vs official':>13}")
    for name, took in results.items():
        ratio = results["official"] / took if "official" in results else float("nan")
        print(f"{name:<12}{took:>10.1f}{audio_s / took:>12.2f}{ratio:>13.2f}")
    result = {"bench": "asr", "chunks": len(spans), "audio_s": round(audio_s, 2), "same_items": same,
              "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
              **{f"{n}_s": round(v, 2) for n, v in results.items()},
              **{f"{n}_audio_per_s": round(audio_s / v, 3) for n, v in results.items()}}
    print(json.dumps(result))
    return result


# ---- vocoder: decode time per 80 ms frame, the LFM2 detokenizer vs Mimi, ours vs official ----

def bench_vocoder(args) -> dict:
    """Seconds per 80 ms frame of audio: LFM2.5's LFM2 detokenizer and Mimi, ours streaming (1 frame and 12
    frames, chat's interleave, per call) and whole-sequence, and the official modules (whole-sequence only;
    the official detokenizer has no streaming), alternating in one process; the same random codes for all."""
    import torch

    import fixtures
    from detokenizer import Detokenizer
    from checkpoint import DETOKENIZER_DIR, MIMI_FILE
    from mimi import Mimi

    folder = Path(args.model) if args.model else fixtures.cached_lfm25_checkpoint(fixtures.TINY_CONFIG, 0)
    dev = torch.device(args.device)
    ours = {"lfm2": Detokenizer.from_folder(folder / DETOKENIZER_DIR, device=dev),
            "mimi": Mimi.from_file(folder / MIMI_FILE, device=dev)}
    official = {}
    if not args.no_official:
        official["lfm2"] = fixtures.official_detokenizer(folder / DETOKENIZER_DIR).to(dev)
        official["mimi"] = fixtures.official_mimi().to(dev)  # same shapes; weights do not change the time
    codes = torch.randint(0, 2048, (1, 8, args.frames), generator=torch.Generator().manual_seed(0)).to(dev)

    def streamed(dec, per_call):
        def go():
            stream = dec.new_stream(1)
            for c in codes.split(per_call, dim=-1):
                dec.decode_step(c, stream)
            dec.flush(stream)
        return go

    runs = {}
    for name, dec in ours.items():
        runs[f"ours {name}, streaming 1 frame"] = streamed(dec, 1)
        runs[f"ours {name}, streaming 12 frames"] = streamed(dec, 12)
        runs[f"ours {name}, whole"] = lambda dec=dec: dec.decode(codes)
    if official:
        runs["official lfm2, whole"] = lambda: official["lfm2"](codes)
        runs["official mimi, whole"] = lambda: official["mimi"].decode(codes)
    times = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for k, fn in runs.items():
                times[k].append(_median_time(fn, 1) / args.frames)
    result = {"bench": "vocoder", "device": str(dev), "frames": args.frames, "threads": torch.get_num_threads()}
    print(f"seconds per 80 ms frame ({args.frames} frames, {args.rounds} rounds, median; {dev}, "
          f"{torch.get_num_threads()} threads)")
    for k, ts in times.items():
        result[k] = round(statistics.median(ts), 5)
        print(f"  {k:34s} {result[k] * 1e3:7.2f} ms")
    print(json.dumps(result))
    return result


# ---- accuracy: bf16, int8 and int4 against float32, teacher-forced ----

MARGIN = 0.01  # a decision counts when float32's top-2 logit margin is above this fraction of its logit std
ACCURACY_TASKS = ("chat", "tts")


def teacher_forced(model, chat, items) -> dict:
    """Replay generated `items` through `model`, every step fed the items' past rather than its own choices:
    the logits of every decision (a text token; each codebook of an audio frame, only codebook 0 of an
    end-of-audio frame, whose other codes are overwritten) and the backbone hidden state of every step, fp32."""
    import torch

    with torch.no_grad():
        x = model.embed_prompt(chat)
        h = model.prefill(x)
        pos = torch.tensor([[len(chat) - 1]], device=x.device)  # [B=1, 1]
        logits, hidden = [], []
        for i, (kind, value) in enumerate(items):
            if i:
                pos += 1
                h = model.decode_one(x, pos)[0]  # [D]
            hidden.append(h.float().cpu())
            if kind == "text":
                logits.append(model.text_logits(h).float().cpu())
                x = model.lfm.embed_tokens(torch.tensor([value], device=x.device))[None]
                continue
            codes = torch.as_tensor(value, device=x.device)  # [8]
            d = model.depth_linear(h).view(model.cfg.codebooks, -1)  # [8, depth_dim], as audio_step
            prev = torch.zeros_like(d[0])
            for k, head in enumerate(model.depth_embeddings):
                y = model.depthformer((d[k] + prev)[None, None], k)[0, 0]
                logits.append(head.logits(y).float().cpu())
                if codes[0] == 2048:
                    break
                prev = head.embedding(codes[k:k + 1])[0]
            x = model.embed_audio_out(codes[:, None])[None]
    return {"logits": logits, "hidden": hidden}


def agreement(ref: dict, other: dict) -> dict:
    """Greedy agreement of `other` with `ref` (teacher_forced results over the same items): over the decisions
    where ref's top-2 margin is above MARGIN of its logit std, and over all; relative errors (L2 norm of the
    difference over the norm of ref's) of logits and hidden states, mean and max."""
    import torch

    counted = agree = agree_all = 0
    for a, b in zip(ref["logits"], other["logits"]):
        top2 = a.topk(2).values
        same = bool(a.argmax() == b.argmax())
        agree_all += same
        if top2[0] - top2[1] > MARGIN * a.std():
            counted += 1
            agree += same

    def rel(xs, ys):
        errs = torch.tensor([float((y - x).norm() / x.norm()) for x, y in zip(xs, ys)])
        return round(float(errs.mean()), 5), round(float(errs.max()), 5)
    n = len(ref["logits"])
    (logit_mean, logit_max), (hidden_mean, hidden_max) = rel(ref["logits"], other["logits"]), rel(ref["hidden"],
                                                                                                 other["hidden"])
    return {"decisions": n, "counted": counted, "agreement": round(agree / counted, 4),
            "agreement_all": round(agree_all / n, 4), "logit_rel_err_mean": logit_mean, "logit_rel_err_max": logit_max,
            "hidden_rel_err_mean": hidden_mean, "hidden_rel_err_max": hidden_max}


def teacher_forced_official(model, chat, items) -> dict:
    """teacher_forced for the official model: its transformers LFM2 backbone with its own cache, its
    depthformer (forward_cached) and heads, driven step by step as its generate loops drive them."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        x, cache = model._prefill(**chat), None  # [1, L, D]
        logits, hidden = [], []
        for kind, value in items:
            out = model.lfm(inputs_embeds=x, cache=cache, use_cache=True)
            cache, h = out.cache, out.last_hidden_state[0, -1]  # h [D]
            hidden.append(h.float().cpu())
            if kind == "text":
                logits.append(F.linear(h, model.lfm.embed_tokens.weight).float().cpu())
                x = model.lfm.embed_tokens(torch.tensor([value], device=h.device))[None]
                continue
            codes = torch.tensor(value, device=h.device)  # [8]
            d = model.depth_linear(h).view(model.codebooks, -1)  # [8, depth_dim]
            prev, depth_cache = torch.zeros_like(d[0]), None
            for k, head in enumerate(model.depth_embeddings):
                y, depth_cache = model.depthformer.forward_cached((d[k] + prev)[None, None], depth_cache)
                logits.append(head.get_logits(y.squeeze()).float().cpu())
                if codes[0] == 2048:
                    break
                prev = head(codes[k:k + 1]).squeeze()
            x = model.audio_embedding(codes + model.codebook_offsets).sum(0)[None, None]
    return {"logits": logits, "hidden": hidden}


def measure_accuracy(folder: Path, steps: int, variants: dict) -> dict:
    """Greedy float32 generations (ACCURACY_TASKS, `steps` each) replayed teacher-forced through float32 and
    through each of `variants` ({name: (replay, reference name)}, replay(folder, items) -> teacher_forced
    result), one model in memory at a time; {name: agreement with its reference}, references being "float32"
    or an earlier variant. "float32" is our float32 replayed against its own greedy items (must be exact)."""
    import torch

    from fixtures import PROMPTS
    from lfm2audio import LFM2Audio

    model = LFM2Audio.from_pretrained(folder, max_seq_len=1024, dtype=torch.float32)
    items = {t: [(k, v if k == "text" else v.tolist()) for k, v in
                 model.generate(_prompt(model, t), PROMPTS[t][3], steps)] for t in ACCURACY_TASKS}
    runs = {"float32": _replay(model, items)}
    del model
    gc.collect()
    out = {"float32": _own_choices(runs["float32"], items)}
    for name, (replay, ref) in variants.items():
        runs[name] = replay(folder, items)
        out[name] = agreement(runs[ref], runs[name])
        if name.endswith("float32"):  # another float32 replay: its greedy choices must be the items too
            out[name] |= {"own_choices": _own_choices(runs[name], items)["own_choices"]}
        gc.collect()
    return out


def _own_choices(run: dict, items: dict) -> dict:
    """agreement of a replay with itself, plus whether its greedy choices are the replayed items."""
    greedy = [int(a.argmax()) for a in run["logits"]]
    chosen = [c for t in ACCURACY_TASKS for k, v in items[t]
              for c in ([v] if k == "text" else v[:1] if v[0] == 2048 else v)]
    return agreement(run, run) | {"own_choices": greedy == chosen}


def replay_ours(int4_group=None, **load_kw):
    """replay(folder, items) through our model loaded with `load_kw` (from_pretrained's arguments); int4 layers
    in groups of `int4_group` inputs instead of quantize.INT4_GROUP, to measure the choice."""
    def replay(folder, items):
        import quantize
        from lfm2audio import LFM2Audio

        chosen, quantize.INT4_GROUP = quantize.INT4_GROUP, int4_group or quantize.INT4_GROUP
        try:
            model = LFM2Audio.from_pretrained(folder, max_seq_len=1024, **load_kw)
        finally:
            quantize.INT4_GROUP = chosen
        return _replay(model, items)
    return replay


def replay_official(dtype):
    """replay(folder, items) through the official model in `dtype` (its prompts: ChatState, bf16 mels)."""
    def replay(folder, items):
        from fixtures import official, official_prompt
        official()
        from liquid_audio import LFM2AudioModel, LFM2AudioProcessor

        model = LFM2AudioModel.from_pretrained(folder, dtype=dtype, device="cpu").eval()
        processor = LFM2AudioProcessor.from_pretrained(folder, device="cpu").eval()
        runs = [teacher_forced_official(model, official_prompt(processor, t), items[t]) for t in ACCURACY_TASKS]
        return {k: [x for r in runs for x in r[k]] for k in ("logits", "hidden")}
    return replay


def _prompt(model, task):
    import audio
    from fixtures import build_prompt
    from lfm2audio import Chat

    return build_prompt(Chat(model.tokenizer), task, audio.load_audio)


def _replay(model, items) -> dict:
    runs = [teacher_forced(model, _prompt(model, t), items[t]) for t in ACCURACY_TASKS]
    return {k: [x for r in runs for x in r[k]] for k in ("logits", "hidden")}


def accuracy_variants() -> dict:
    """{name: (replay, reference)} of bench.py accuracy. int8 and int8-fp32: int8 in a bf16 and in a float32 model
    (the int8 matmuls take bf16 inputs either way); int4: the chosen mix (quantize.MIXES), int4-PART: PART alone
    in 4 bits, the rest int8; int4-gN: the mix in groups of N; the official package in bf16 against its own
    float32 replay: what its numerics reach on the same items."""
    import torch

    import quantize

    bf16 = torch.bfloat16
    variants = {"bfloat16": (replay_ours(dtype=bf16), "float32"),
                "int8": (replay_ours(dtype=bf16, quantize="int8"), "float32"),
                "int8-fp32": (replay_ours(dtype=torch.float32, quantize="int8"), "float32")}
    for scheme in quantize.SCHEMES[1:]:
        variants[scheme] = (replay_ours(dtype=bf16, quantize=scheme), "float32")
    for group in (32, 64, 128, 256):
        variants[f"int4-g{group}"] = (replay_ours(dtype=bf16, quantize="int4", int4_group=group), "float32")
    variants["official-float32"] = (replay_official(torch.float32), "float32")
    variants["official-bfloat16"] = (replay_official(bf16), "official-float32")
    return variants


ACCURACY_DEFAULT = ("bfloat16", "int8", "int4", "official-float32", "official-bfloat16")


def bench_accuracy(args) -> dict:
    """Agreement of bf16, int8 and int4 with float32, teacher-forced over the same greedy decisions (text tokens
    and every codebook of audio frames), and the relative error of logits and hidden states."""
    from fixtures import FULL_CONFIG, cached_checkpoint

    folder = Path(args.model) if args.model else cached_checkpoint(FULL_CONFIG, 0)
    every = accuracy_variants()
    names = args.variants or ACCURACY_DEFAULT
    for name in names:
        if name not in every:
            sys.exit(f"error: unknown variant {name!r} (one of {', '.join(every)})")
    # a reference replays before what is compared with it
    variants = {n: every[n] for n in every if n in names or any(every[m][1] == n for m in names)}
    with open("/tmp/lfm2audio-bigmem.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = measure_accuracy(folder, args.steps, variants)
    print(f"accuracy vs float32: {folder.name}, tasks {', '.join(ACCURACY_TASKS)}, {args.steps} greedy steps each, "
          f"decisions counted where float32's top-2 margin > {MARGIN:.0%} of its logit std")
    cols = ["decisions", "counted", "agreement", "agreement_all", "logit_rel_err_mean", "logit_rel_err_max",
            "hidden_rel_err_mean", "hidden_rel_err_max"]
    print(f"{'':<18}" + "".join(f"{c:>20}" for c in cols))
    for name, r in res.items():
        print(f"{name:<18}" + "".join(f"{r[c]:>20}" for c in cols))
    result = {"bench": "accuracy", "steps": args.steps, "margin": MARGIN, **res}
    print(json.dumps(result))
    return result


def main(argv=None):
    import quantize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("tokenizer", help=bench_tokenizer.__doc__)
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: train an LFM2-shaped one)")
    p.add_argument("--vocab-size", type=int, default=64400, help="vocabulary of the trained tokenizer")
    p.add_argument("--megabytes", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.set_defaults(fn=bench_tokenizer)
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
    p = sub.add_parser("asr", help=bench_asr.__doc__)
    p.add_argument("--model", help="checkpoint folder (default: the full-size random-weight test fixture)")
    p.add_argument("--chunks", type=int, default=8, help="chunks of the long recording (each <= 30 s)")
    p.add_argument("--batches", default="1,4,8", help="our batch sizes, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy steps per chunk at most")
    p.add_argument("--no-official", action="store_true", help="ours only")
    p.set_defaults(fn=bench_asr)
    p = sub.add_parser("vocoder", help=bench_vocoder.__doc__)
    p.add_argument("--model", help="LFM2.5 checkpoint folder (default: the LFM2.5-shaped random test fixture)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames", type=int, default=150, help="frames of codes decoded per run (150 = 12 s)")
    p.add_argument("--rounds", type=int, default=3, help="alternate the decoders this many times")
    p.add_argument("--no-official", action="store_true", help="ours only")
    p.set_defaults(fn=bench_vocoder)
    p = sub.add_parser("accuracy", help=bench_accuracy.__doc__)
    p.add_argument("--model", help="checkpoint folder (default: the full-size random-weight test fixture)")
    p.add_argument("--steps", type=int, default=48, help="greedy backbone steps per task")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help=f"what to compare with float32 (default: {' '.join(ACCURACY_DEFAULT)}; also int8-fp32, "
                        "int4-backbone, int4-depthformer, int4-heads, int4-g32, int4-g64, int4-g128, int4-g256)")
    p.set_defaults(fn=bench_accuracy)
    import bench_page
    import bench_serve
    bench_serve.add_parsers(sub)
    bench_page.add_parser(sub)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    main()
