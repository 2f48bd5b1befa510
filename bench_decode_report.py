"""The report of `python bench.py decode` (bench_decode.py) from its runs: a table of medians over the rounds,
how the runs' greedy items agree, speed-ups over the official package and the floor the weight bandwidth sets."""

import statistics
from pathlib import Path

# the table's rows: (figure, where it is in a run's results)
METRICS = [("load_s", ("load_s",)), ("prefill_s", ("prefill_s",)), ("ttfa_s", ("ttfa_s",)),
           ("tts_frame_lm_s", ("tts", "frame_lm_s")), ("tts_frame_mimi_s", ("tts", "frame_mimi_s")),
           ("tts_fps", ("tts", "fps")), ("tts_rtf", ("tts", "rtf")),
           ("chat_frame_lm_s", ("chat", "frame_lm_s")), ("chat_text_lm_s", ("chat", "text_lm_s")),
           ("chat_fps", ("chat", "fps")), ("chat_rtf", ("chat", "rtf")), ("peak_rss_gb", ("peak_rss_gb",)),
           ("peak_gpu_gb", ("peak_gpu_gb",)), ("compile_s", ("compile_s",))]
SPEEDUP_METRICS = ("load_s", "prefill_s", "ttfa_s", "tts_frame_lm_s", "chat_frame_lm_s", "chat_text_lm_s",
                   "tts_rtf", "chat_rtf")


def report(runs: dict, bw: float, folder: Path, args, failed: int) -> dict:
    """Print the table of medians and how the runs' greedy items agree; return the JSON line's dict."""
    import torch

    names = list(runs)
    ref_items = runs[names[0]][0]["items"]
    # greedy items are equal only at equal precision: the float32 runs must agree exactly; the others are
    # reported by how many leading items they share with the first run (bench.py accuracy measures them)
    exact = [n for n in names if not any(s in n for s in ("bf16", "int8", "int4"))]
    same = all(r["items"] == ref_items for n in exact for r in runs[n])
    prefix = {n: _leading_items(runs[n][0]["items"], ref_items) for n in names}
    # the compiled path should give eager's greedy items at the same precision: measured, not assumed
    as_eager = {n: all(r["items"] == runs[e][0]["items"] for r in runs[n])
                for n in names if n.startswith("ours-compiled") and (e := n.replace("-compiled", "", 1)) in runs}
    table = {n: {m: _median(runs[n], path) for m, path in METRICS} for n in names}
    _print_table(runs, table, bw, folder, args, same)
    total = sum(len(ref_items[k]) for k in ("tts", "chat"))
    print(f"greedy items: leading items equal to {names[0]}'s (of {total}): " + ", ".join(
        f"{n} {prefix[n]}" for n in names[1:]) + "; compiled same as eager: " + ", ".join(
        f"{n} {v}" for n, v in as_eager.items()))
    wb = runs[next(n for n in names if n.startswith("ours"))][0]["weight_bytes"]
    return {"bench": "decode", "device": args.device, "dtype": args.dtype, "quantize": args.quantize,
            "steps": args.steps, "threads": torch.get_num_threads(), "same_items": same,
            "bandwidth_gb_s": round(bw / 1e9, 2), "floor_audio_step_s": round(wb["audio_step"] / bw, 4),
            "floor_text_step_s": round(wb["text_step"] / bw, 4),
            **{f"{n}_{m}": None if v is None else round(v, 4) for n in names for m, v in table[n].items()},
            **{f"{n}_prefix_items": prefix[n] for n in names if n not in exact},
            **{f"{n}_same_as_eager": v for n, v in as_eager.items()}, "failed_runs": failed,
            **_speedups(runs, table), **_vs_floor(runs, table, bw)}


def _leading_items(items: dict, ref_items: dict) -> int:
    """Leading items equal to the first run's, TTS and chat together."""
    return sum(next((i for i, (a, b) in enumerate(zip(items[k], ref_items[k])) if a != b),
                    min(len(items[k]), len(ref_items[k]))) for k in ("tts", "chat"))


def _median(results: list[dict], path: tuple) -> float | None:
    """The median over the rounds of the figure at `path` in a run's results (None where no round has it)."""
    vals = []
    for r in results:
        v = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


def _print_table(runs: dict, table: dict, bw: float, folder: Path, args, same: bool):
    import torch

    names, ours = list(runs), [n for n in runs if n.startswith("ours")]
    print(f"decode bench: {folder.name}, {args.device} {' '.join(args.dtype)}, {args.steps} greedy steps per "
          f"run, {torch.get_num_threads()} threads, rounds {args.rounds}, same greedy items in the float32 runs: "
          f"{same}")
    print(f"matvec bandwidth {bw / 1e9:.1f} GB/s (fp32); weights read per audio step, text step (GB): " + ", ".join(
        f"{n} {runs[n][0]['weight_bytes']['audio_step'] / 1e9:.2f}, {runs[n][0]['weight_bytes']['text_step'] / 1e9:.2f}"
        for n in ours))
    print(f"{'metric':<18}" + "".join(f"{n:>15}" for n in names))
    for m, _ in METRICS:
        if any(table[n][m] is not None for n in names):
            print(f"{m:<18}" + "".join(f"{table[n][m]:>15.3f}" if table[n][m] is not None else f"{'-':>15}"
                                       for n in names))
    n_items = {n: {k: (runs[n][0][k]["n_audio"], runs[n][0][k]["n_text"]) for k in ("tts", "chat")} for n in names}
    print(f"items per run (audio, text) after the first: {n_items[names[0]]}")


def _speedups(runs: dict, table: dict) -> dict:
    """Speed-ups of our runs over the official package, per official dtype: > 1 means ours is faster."""
    out = {}
    for base in ("official", "official-bf16"):
        if base not in runs:
            continue
        tag = "" if base == "official" else "_bf16"
        for n in (n for n in runs if n.startswith("ours")):
            for m in SPEEDUP_METRICS:
                ours_s, official_s = table[n][m], table[base][m]
                ratio = None if ours_s is None or official_s is None else round(official_s / ours_s, 3)
                out[f"speedup{tag}_{n}_{m}"] = ratio
    return out


def _vs_floor(runs: dict, table: dict, bw: float) -> dict:
    """Our step times over the floor of each run's own weight bytes (1: as fast as the bandwidth allows)."""
    out = {}
    for n in (n for n in runs if n.startswith("ours")):
        w = runs[n][0]["weight_bytes"]
        for kind in ("tts", "chat"):
            if table[n][f"{kind}_frame_lm_s"] is not None:
                out[f"{n}_{kind}_frame_vs_floor"] = round(table[n][f"{kind}_frame_lm_s"] * bw / w["audio_step"], 3)
        if table[n]["chat_text_lm_s"] is not None:
            out[f"{n}_text_step_vs_floor"] = round(table[n]["chat_text_lm_s"] * bw / w["text_step"], 3)
    return out
