"""`python bench.py accuracy`: bf16 and int8 against float32, teacher-forced over the same greedy decisions; the
official package's bf16 against its own float32. test_quantize.py holds its floors with the same functions."""

import fcntl
import gc
import json
import sys
from pathlib import Path

from bench import task_prompt

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
                 model.generate(task_prompt(model, t), PROMPTS[t][3], steps)] for t in ACCURACY_TASKS}
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


def _replay(model, items) -> dict:
    runs = [teacher_forced(model, task_prompt(model, t), items[t]) for t in ACCURACY_TASKS]
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


def add_parsers(sub):
    p = sub.add_parser("accuracy", help=bench_accuracy.__doc__)
    p.add_argument("--model", help="checkpoint folder (default: the full-size random-weight test fixture)")
    p.add_argument("--steps", type=int, default=48, help="greedy backbone steps per task")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help=f"what to compare with float32 (default: {' '.join(ACCURACY_DEFAULT)}; also int8-fp32, "
                        "int4-backbone, int4-depthformer, int4-heads, int4-g32, int4-g64, int4-g128, int4-g256)")
    p.set_defaults(fn=bench_accuracy)
