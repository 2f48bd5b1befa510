"""Benchmarks of whole processes: the server (`python bench.py serve`) and a run.py TTS answer with its peak
memory (`python bench.py tts`); the page's latency is bench_page.py's. Each prints a table and one JSON line.

By default on the full-size random-weight checkpoint, greedy (so that every side does the same work).
"""

import base64
import http.client
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import ROOT, long_recording


def start_server(folder, *args, env=None) -> tuple[subprocess.Popen, int]:
    """serve.py on a free port: (process, port) once it says it is ready (its stderr is then left unread)."""
    cli = [sys.executable, str(ROOT / "serve.py"), "--model", str(folder), "--port", "0", *map(str, args)]
    p = subprocess.Popen(cli, stderr=subprocess.PIPE, text=True, env=os.environ | (env or {}))
    line = p.stderr.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not match:
        p.kill()
        raise RuntimeError(f"serve.py did not start: {line}{p.stderr.read()}")
    return p, int(match.group(1))


def _post(port: int, path: str, body: bytes, content_type: str = "application/json") -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    conn.request("POST", path, body, {"Content-Type": content_type})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"{path}: {r.status} {data[:300]}")
    return data


def first_audio_over_http(port: int, body: dict) -> float:
    """Seconds from sending a streamed chat request to receiving its first audio chunk; then the request is
    dropped and, before returning, the server is left to free its row (an idle server for the next request, as
    respond() in process has)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    raw = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", raw, {"Content-Type": "application/json"})
    r = conn.getresponse()
    while line := r.readline():
        if line.startswith(b"data: {") and b'"data"' in line:
            took = time.perf_counter() - t0
            conn.close()
            while _health(port)["rows_busy"]:
                time.sleep(0.05)
            return took
    raise RuntimeError("the answer had no audio")


def _health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    conn.close()
    return health


def first_audio_in_process(model, vocoder, wav: bytes, steps: int) -> float:
    """Seconds from the recording's bytes to respond()'s first wave, in this process (the server's work without
    HTTP: reading the audio, the prompt, prefill, the first frame and its decode)."""
    import tasks
    from lfm2audio import Sampling
    from sound import respond

    t0 = time.perf_counter()
    chat = tasks.new_chat(model.tokenizer, tasks.TASKS["chat"].system)
    tasks.add_user_turn(chat, tasks.read_audio(wav, "question.wav"))
    for kind, _ in respond(model.generate(chat, "interleaved", steps, Sampling()), vocoder, 4):
        if kind == "wave":
            return time.perf_counter() - t0
    raise RuntimeError("the answer had no audio")


def _wav_bytes(wave, rate=16000) -> bytes:
    import soundfile as sf
    out = io.BytesIO()
    sf.write(out, wave.numpy(), rate, format="WAV", subtype="FLOAT")
    return out.getvalue()


def _multipart(wav: bytes) -> tuple[bytes, str]:
    boundary = "lfm2audiobench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nlfm2\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n").encode() + wav + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _throughput(port: int, chunks: list, texts: list[str], concurrent: bool) -> dict:
    """Seconds of audio per second: the transcription of every chunk (audio in), then the speech of every text
    (audio out), all at once or one at a time."""
    jobs = [("asr", _multipart(_wav_bytes(c))) for c in chunks]
    speech = [("tts", json.dumps({"model": "lfm2", "input": t, "voice": "uk-male", "response_format": "pcm"}).encode())
              for t in texts]
    out = {}
    for kind, group in (("asr", jobs), ("tts", speech)):
        def one(job):
            if kind == "asr":
                body, ctype = job[1]
                return _post(port, "/v1/audio/transcriptions", body, ctype)
            return _post(port, "/v1/audio/speech", job[1])
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(group) if concurrent else 1) as pool:
            answers = list(pool.map(one, group))
        took = time.perf_counter() - t0
        seconds = sum(c.numel() for c in chunks) / 16000 if kind == "asr" else sum(len(a) for a in answers) / 48000
        out[kind] = {"seconds": round(took, 2), "audio_s": round(seconds, 2), "audio_per_s": round(seconds / took, 3),
                     "answers": [a.decode(errors="replace") if kind == "asr" else len(a) for a in answers]}
    return out


def _official_one_at_a_time(folder, chunks, texts, steps: int) -> dict:
    """The official package in this process, one request at a time: ASR of each chunk, then TTS of each text
    with its Mimi decode (greedy, float32)."""
    import torch

    from fixtures import PROMPTS, load_official, official_generate

    model, processor = load_official(folder)
    from liquid_audio import ChatState  # importable once load_official has set it up
    out = {}
    t0 = time.perf_counter()
    for wave in chunks:
        chat = ChatState(processor)
        chat.new_turn("system"); chat.add_text(PROMPTS["asr"][0]); chat.end_turn()
        chat.new_turn("user"); chat.add_audio(wave[None], 16000); chat.end_turn(); chat.new_turn("assistant")
        official_generate(model, chat, "sequential", steps)
    took = time.perf_counter() - t0
    audio_s = sum(c.numel() for c in chunks) / 16000
    out["asr"] = {"seconds": round(took, 2), "audio_s": round(audio_s, 2), "audio_per_s": round(audio_s / took, 3)}
    t0, frames = time.perf_counter(), 0
    for text in texts:
        chat = ChatState(processor)
        chat.new_turn("system"); chat.add_text("Perform TTS. Use the UK male voice."); chat.end_turn()
        chat.new_turn("user"); chat.add_text(text); chat.end_turn(); chat.new_turn("assistant")
        codes = [v for k, v in official_generate(model, chat, "sequential", steps) if k == "audio" and 2048 not in v]
        if codes:
            with torch.no_grad():
                processor.mimi.decode(torch.tensor(codes).T[None])
        frames += len(codes)
    took = time.perf_counter() - t0
    out["tts"] = {"seconds": round(took, 2), "audio_s": round(frames * 0.08, 2),
                  "audio_per_s": round(frames * 0.08 / took, 3)}
    return out


def _first_audio(folder, args) -> dict:
    """Seconds to the first audio of the same spoken chat through respond() and over HTTP, alternating
    (args.rounds each, after a warm-up): the overhead of HTTP, JSON, base64 and the engine's thread. The server is
    serve.py's Server on a thread of this process, on the same model: two processes holding the same weights
    run at different speeds (BENCHMARKS.md), which would hide the milliseconds measured here."""
    import threading

    import serve
    import tasks
    from fixtures import ASSETS

    wav = (ASSETS / "question.wav").read_bytes()
    chat_body = {"model": "lfm2", "stream": True, "modalities": ["text", "audio"], "max_tokens": args.steps,
                 "audio": {"voice": "uk-male", "format": "pcm16"}, "messages": [{"role": "user", "content": [
                     {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode()}}]}]}
    cli = ["--model", str(folder), "--port", "0", "--batch", "1", "--greedy", "--max-new-tokens", str(args.steps),
           "--dtype", args.dtype, *(["--quantize", args.quantize] if args.quantize else [])]
    model, vocoder = tasks.load(folder, "cpu", args.dtype, args.quantize, context=4096)
    server = serve.Server(("127.0.0.1", 0), model, vocoder, serve.parse_args(cli))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port, local, http_s = server.server_address[1], [], []
    try:
        for i in range(args.rounds + 1):  # the first round warms both up and is not counted
            time.sleep(1)  # both sides start idle, as a user's turns do
            t_local = first_audio_in_process(model, vocoder, wav, args.steps)
            time.sleep(1)
            t_http = first_audio_over_http(port, chat_body)
            if i:
                local.append(t_local), http_s.append(t_http)
    finally:
        server.shutdown()
        server.engine.stop()
        server.server_close()
    overhead = {"in_process_s": [round(t, 3) for t in local], "http_s": [round(t, 3) for t in http_s],
                "overhead_ms": round(1000 * (statistics.median(http_s) - statistics.median(local)), 1),
                "paired_overhead_ms": round(1000 * statistics.median(h - t for h, t in zip(http_s, local)), 1)}
    print(f"first audio: in process {statistics.median(local):.3f} s, over HTTP {statistics.median(http_s):.3f} s "
          f"(medians of {args.rounds}, alternating): overhead {overhead['overhead_ms']} ms (median of the pairs' "
          f"differences {overhead['paired_overhead_ms']} ms)", flush=True)
    return overhead


def _throughputs(folder, options: list, args) -> dict:
    """{run: its _throughput} of the server one request at a time and all at once (batched), and of the official
    package one at a time."""
    import transcribe

    wave = long_recording(31 * args.chunks)
    chunks = [wave[a:b] for a, b in transcribe.split_at_pauses(wave, 16000, 30.0)[:args.chunks]]
    texts = ["Hello! The weather today is sunny with a light breeze.", "Please turn left at the next corner.",
             "The meeting starts at nine tomorrow morning.", "Thank you for calling, how can I help you?"][:args.speech]
    server, port = start_server(folder, *options, "--batch", max(len(chunks), len(texts)))
    try:
        runs = {"one_at_a_time": _throughput(port, chunks, texts, False),
                "batched": _throughput(port, chunks, texts, True)}
    finally:
        server.kill()
        server.wait()
    if not args.no_official:
        runs["official"] = _official_one_at_a_time(folder, chunks, texts, args.steps)
    return runs


def bench_serve(args) -> dict:
    """The server on the full-size checkpoint: time to the first audio byte over HTTP against respond() in this
    process for the same spoken chat (the overhead of HTTP, JSON and base64), then throughput (seconds of audio
    per second) of 8 transcriptions of 15-30 s and 4 speech requests, all at once (batched) against one at a
    time, and the official package one at a time."""
    import torch

    from fixtures import FULL_CONFIG, cached_checkpoint

    folder = Path(args.model) if args.model else cached_checkpoint(FULL_CONFIG, 0)
    options = ["--dtype", args.dtype, "--device", "cpu", "--greedy", "--max-new-tokens", args.steps,
               *(["--quantize", args.quantize] if args.quantize else [])]
    overhead = _first_audio(folder, args)
    runs = _throughputs(folder, options, args) if args.chunks and args.speech else {}
    same = all(runs["batched"][k]["answers"] == runs["one_at_a_time"][k]["answers"] for k in ("asr", "tts")) \
        if runs else None
    for name, run in runs.items():
        print(f"{name:>14}: ASR {run['asr']['audio_per_s']:.2f} s/s ({run['asr']['audio_s']} s in "
              f"{run['asr']['seconds']} s), TTS {run['tts']['audio_per_s']:.2f} s/s ({run['tts']['audio_s']} s in "
              f"{run['tts']['seconds']} s)")
    result = {"bench": "serve", "dtype": args.dtype, "quantize": args.quantize, "steps": args.steps,
              "threads": torch.get_num_threads(), "first_audio": overhead, "same_answers_batched": same,
              **{f"{n}_{k}": {x: v for x, v in r[k].items() if x != "answers"} for n, r in runs.items()
                 for k in ("asr", "tts")}}
    print(json.dumps(result))
    return result


def bench_tts(args) -> dict:
    """`run.py --mode tts` as a user runs it (its TTS sampling, streaming Mimi, the wav written) in a child
    process: its [time] line (load, first audio, RTF) and the process's peak RSS, and that of `run.py --help`
    (the interpreter with torch imported) for scale."""
    from fixtures import FULL_CONFIG, cached_checkpoint

    folder = Path(args.model) if args.model else cached_checkpoint(FULL_CONFIG, 0)
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(r.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")

    def peak(*cli):
        r = subprocess.run([sys.executable, "-c", probe, sys.executable, str(ROOT / "run.py"), *map(str, cli)],
                           capture_output=True, text=True, cwd="/tmp")
        lines = r.stdout.strip().splitlines()
        return int(lines[-1]) / 2**20, next((x for x in lines if x.startswith("[time]")), "")
    base, _ = peak("--help")
    cli = ["--model", folder, "--mode", "tts", "--text", args.text, "--dtype", args.dtype, "--seed", 0,
           "--out", "/tmp/bench-tts.wav", *(["--quantize", args.quantize] if args.quantize else []),
           *(["--compile"] if args.compile else [])]
    rss, line = peak(*cli)
    rtf = re.search(r"RTF ([\d.]+)", line)
    print(f"run.py --mode tts: {line}\npeak RSS {rss:.2f} GB (run.py --help: {base:.2f} GB)")
    result = {"bench": "tts", "quantize": args.quantize, "compile": args.compile, "dtype": args.dtype,
              "peak_rss_gb": round(rss, 3), "help_rss_gb": round(base, 3), "rtf": float(rtf.group(1)) if rtf else None,
              "time_line": line}
    print(json.dumps(result))
    return result


def add_parsers(sub):
    p = sub.add_parser("serve", help=bench_serve.__doc__)
    p.add_argument("--model", help="checkpoint folder (default: the full-size random-weight test fixture)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", choices=["int8", "int4"])
    p.add_argument("--steps", type=int, default=64, help="greedy steps per answer (the server's --max-new-tokens)")
    p.add_argument("--rounds", type=int, default=3, help="first-audio measurements on each side")
    p.add_argument("--chunks", type=int, default=8, help="transcription requests, 15-30 s each (0: first audio only)")
    p.add_argument("--speech", type=int, default=4, help="speech requests (0: first audio only)")
    p.add_argument("--no-official", action="store_true")
    p.set_defaults(fn=bench_serve)
    p = sub.add_parser("tts", help=bench_tts.__doc__)
    p.add_argument("--model", help="checkpoint folder (default: the full-size random-weight test fixture)")
    p.add_argument("--text", default="Hello! The weather today is sunny with a light breeze.")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "auto"])
    p.add_argument("--quantize", choices=["int8", "int4"])
    p.add_argument("--compile", action="store_true")
    p.set_defaults(fn=bench_tts)
