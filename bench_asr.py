"""`python bench.py asr`: chunked ASR throughput on a long recording, ours at each batch size against the
official package one chunk at a time."""

import fcntl
import gc
import json
import time
from pathlib import Path

from bench import long_recording


def _ours(folder, wave, spans, batches: list[int], max_new_tokens: int) -> tuple[dict, dict]:
    """Seconds and items of our runs, one per batch size; building the prompts (mel, encoder) is timed too."""
    import torch

    import tasks
    from batch import generate_batch
    from fixtures import PROMPTS
    from lfm2audio import Chat, LFM2Audio

    model = LFM2Audio.from_pretrained(folder, dtype=torch.float32, max_seq_len=512 + max_new_tokens)
    results, items = {}, {}
    for batch in batches:
        t = time.perf_counter()
        chats = []
        for a, b in spans:
            chat = Chat(model.tokenizer)
            chat.new_turn("system"); chat.add_text(PROMPTS["asr"][0]); chat.end_turn()
            tasks.add_user_turn(chat, wave[a:b])
            chats.append(chat)
        got = dict(generate_batch(model, chats, "sequential", max_new_tokens, batch))
        results[f"ours_b{batch}"] = time.perf_counter() - t
        items[f"ours_b{batch}"] = [[(k, v if k == "text" else v.tolist()) for k, v in got[i]]
                                   for i in range(len(spans))]
    return results, items


def _official(folder, wave, spans, max_new_tokens: int) -> tuple[float, list]:
    """Seconds and items of the official package, one chunk at a time (its only way)."""
    from fixtures import PROMPTS, load_official, official_generate

    off, proc = load_official(folder)
    from liquid_audio import ChatState  # importable once load_official has set it up

    t = time.perf_counter()
    items = []
    for a, b in spans:
        chat = ChatState(proc)
        chat.new_turn("system"); chat.add_text(PROMPTS["asr"][0]); chat.end_turn()
        chat.new_turn("user"); chat.add_audio(wave[None, a:b], 16000); chat.end_turn()
        chat.new_turn("assistant")
        items.append(official_generate(off, chat, "sequential", max_new_tokens))
    return time.perf_counter() - t, items


def bench_asr(args) -> dict:
    """Chunked ASR throughput (seconds of audio per second) on a long recording cut into chunks of at most 30 s:
    ours at each batch size vs the official package one chunk at a time (its only way), greedy, prompt building
    (mel), encoder, prefill and decode all timed, one model in memory at a time; all must give the same items."""
    import torch

    import transcribe
    from fixtures import FULL_CONFIG, cached_checkpoint
    from lfm2audio import IM_END

    folder = Path(args.model) if args.model else cached_checkpoint(FULL_CONFIG, 0)
    wave = long_recording(31 * args.chunks)
    spans = transcribe.split_at_pauses(wave, 16000, 30.0)[:args.chunks]
    audio_s = sum(b - a for a, b in spans) / 16000
    batches = [int(b) for b in args.batches.split(",")]
    with open("/tmp/lfm2audio-bigmem.lock", "w") as lock, torch.no_grad():
        fcntl.flock(lock, fcntl.LOCK_EX)  # full-size models: one big-memory job on the machine at a time
        results, items = _ours(folder, wave, spans, batches, args.max_new_tokens)
        gc.collect()
        if not args.no_official:
            results["official"], items["official"] = _official(folder, wave, spans, args.max_new_tokens)
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


def add_parsers(sub):
    p = sub.add_parser("asr", help=bench_asr.__doc__)
    p.add_argument("--model", help="checkpoint folder (default: the full-size random-weight test fixture)")
    p.add_argument("--chunks", type=int, default=8, help="chunks of the long recording (each <= 30 s)")
    p.add_argument("--batches", default="1,4,8", help="our batch sizes, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy steps per chunk at most")
    p.add_argument("--no-official", action="store_true", help="ours only")
    p.set_defaults(fn=bench_asr)
