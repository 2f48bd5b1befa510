"""`python bench.py vocoder`: decode time per 80 ms frame, the LFM2 detokenizer vs Mimi, ours (streaming and
whole-sequence) vs the official modules."""

import json
import statistics
from pathlib import Path

from bench import median_time


def _decoders(folder: Path, device, official: bool) -> tuple[dict, dict]:
    """({"lfm2": ours, "mimi": ours}, the same of the official package, or {} without `official`)."""
    import fixtures
    from checkpoint import DETOKENIZER_DIR, MIMI_FILE
    from detokenizer import Detokenizer
    from mimi import Mimi

    ours = {"lfm2": Detokenizer.from_folder(folder / DETOKENIZER_DIR, device=device),
            "mimi": Mimi.from_file(folder / MIMI_FILE, device=device)}
    theirs = {}
    if official:
        theirs["lfm2"] = fixtures.official_detokenizer(folder / DETOKENIZER_DIR).to(device)
        theirs["mimi"] = fixtures.official_mimi().to(device)  # same shapes; weights do not change the time
    return ours, theirs


def _runs(ours: dict, official: dict, codes) -> dict:
    """{name: a function decoding all of `codes` [1, 8, frames]}: ours streamed 1 and 12 frames per call and
    whole, the official modules whole."""
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
    return runs


def bench_vocoder(args) -> dict:
    """Seconds per 80 ms frame of audio: LFM2.5's LFM2 detokenizer and Mimi, ours streaming (1 frame and 12
    frames, chat's interleave, per call) and whole-sequence, and the official modules (whole-sequence only;
    the official detokenizer has no streaming), alternating in one process; the same random codes for all."""
    import torch

    import fixtures

    folder = Path(args.model) if args.model else fixtures.cached_lfm25_checkpoint(fixtures.TINY_CONFIG, 0)
    dev = torch.device(args.device)
    ours, official = _decoders(folder, dev, not args.no_official)
    codes = torch.randint(0, 2048, (1, 8, args.frames), generator=torch.Generator().manual_seed(0)).to(dev)
    runs = _runs(ours, official, codes)
    times = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for k, fn in runs.items():
                times[k].append(median_time(fn, 1) / args.frames)
    result = {"bench": "vocoder", "device": str(dev), "frames": args.frames, "threads": torch.get_num_threads()}
    print(f"seconds per 80 ms frame ({args.frames} frames, {args.rounds} rounds, median; {dev}, "
          f"{torch.get_num_threads()} threads)")
    for k, ts in times.items():
        result[k] = round(statistics.median(ts), 5)
        print(f"  {k:34s} {result[k] * 1e3:7.2f} ms")
    print(json.dumps(result))
    return result


def add_parsers(sub):
    p = sub.add_parser("vocoder", help=bench_vocoder.__doc__)
    p.add_argument("--model", help="LFM2.5 checkpoint folder (default: the LFM2.5-shaped random test fixture)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames", type=int, default=150, help="frames of codes decoded per run (150 = 12 s)")
    p.add_argument("--rounds", type=int, default=3, help="alternate the decoders this many times")
    p.add_argument("--no-official", action="store_true", help="ours only")
    p.set_defaults(fn=bench_vocoder)
