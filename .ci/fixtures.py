"""Test checkpoints and helpers around the official package, without pytest: `conftest.py` (the test fixtures)
and `bench.py` both import this module.

- an LFM2-shaped BPE tokenizer trained with `tokenizers`;
- checkpoint folders in the real Hugging Face layout with random weights (`make_checkpoint`, cached on disk by
  `cached_checkpoint`), tiny (`TINY_CONFIG`) and full size (`FULL_CONFIG`);
- the official prompts, generation and multi-turn history update (`official_prompt`, `official_generate`,
  `official_append`), for side-by-side runs.

The official `liquid-audio` is set up by `python .ci/reference.py`; `official()` imports it or raises ImportError.
"""

import copy
import fcntl
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
sys.path.insert(0, str(ROOT / ".ci"))
import reference  # noqa: E402  (.ci/reference.py)


def official():
    """Import and return the official `liquid_audio` package (ImportError, with how to set it up, if missing)."""
    reference.ensure_on_path()
    try:
        import liquid_audio
    except ImportError as e:
        raise ImportError(f"official liquid-audio not importable ({e}); run `python .ci/reference.py`") from None
    return liquid_audio


# ---- an LFM2-shaped text tokenizer -------------------------------------------------------------------

# LFM2's pre-tokenizer split, as its tokenizer.json writes it
LFM2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NAMED_SPECIALS = {
    0: "<|pad|>", 1: "<|startoftext|>", 2: "<|endoftext|>", 3: "<|fim_pre|>", 4: "<|fim_mid|>",
    5: "<|fim_suf|>", 6: "<|im_start|>", 7: "<|im_end|>", 8: "<|tool_list_start|>", 9: "<|tool_list_end|>",
    10: "<|tool_call_start|>", 11: "<|tool_call_end|>", 12: "<|tool_response_start|>",
    13: "<|tool_response_end|>", 128: "<|audio_start|>", 129: "<|text_start|>", 130: "<|text_end|>",
    131: "<|mixed_start|>", 132: "<|mixed_end|>",
}
SPECIALS = [NAMED_SPECIALS.get(i, f"<|reserved_{i - 10}|>") for i in range(501)]


def training_corpus():
    """Text to train a small BPE on: the standard library's sources (prose in docstrings, and code)."""
    stdlib = Path(json.__file__).resolve().parent.parent
    for path in sorted(stdlib.glob("*.py"))[:120]:
        yield path.read_text(encoding="utf-8", errors="replace")
    yield ("Café naïve résumé Ünïcödé 東京都 北京 مرحبا بالعالم "
           "👩‍👩‍👧 123 4567 89012\n\t\r\n")


def write_tokenizer(folder: Path, vocab_size: int = 4000, merges_as_pairs: bool = False) -> Path:
    """Train a byte-level BPE shaped like LFM2's and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LFM2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    spec = json.loads(path.read_text())
    if not merges_as_pairs:  # the older "a b" string form
        spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    path.write_text(json.dumps(spec, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>",
        "eos_token": "<|im_end|>", "pad_token": "<|pad|>", "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 128000,
    }, indent=1))
    return path


# ---- checkpoint folders in the Hugging Face snapshot layout, with random weights --------------------
#
# `make_checkpoint(folder, config, seed)` writes what `LiquidAI/LFM2-Audio-1.5B` ships: config.json,
# model.safetensors (bf16, the official model's state_dict keys, tied tensors as separate equal copies),
# the Mimi file (fp32, attention named `in_proj_weight` / `out_proj.weight` as in Kyutai's release),
# and the text tokenizer files. The weights are random but shaped so that greedy decoding is varied and
# switches modality (see `_tune_switches`): plain random weights almost never emit <|audio_start|>,
# <|text_end|>, <|im_end|> or the end-of-audio code, so the generation loops would go untested.


FULL_CONFIG = json.loads((ROOT / ".ci" / "lfm2-audio-config.json").read_text())
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
AUDIO_START, TEXT_END, IM_END, END_OF_AUDIO = 128, 130, 7, 2048
CACHE_ROOT = Path(os.environ.get("LFM2AUDIO_TEST_CACHE", Path.home() / ".cache" / "lfm2audio-test"))
FIXTURE_VERSION = 1  # bump to invalidate cached checkpoints when the recipe changes in a way hashing misses


def _tiny_config() -> dict:
    """The real config shrunk: same codebooks, interleaving and layer mix, small widths."""
    cfg = copy.deepcopy(FULL_CONFIG)
    cfg["encoder"].update(n_layers=2, d_model=128, n_heads=4, subsampling_conv_channels=64)
    cfg["lfm"].update(
        hidden_size=128, block_dim=128, conv_dim=128, conv_dim_out=128, intermediate_size=384,
        block_ff_dim=384, num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "full_attention"],
        num_attention_heads=4, num_heads=4, num_key_value_heads=2, vocab_size=4096,
    )
    cfg["depthformer"].update(layers=2, dim=128)  # the official depthformer always has 32 heads
    return cfg


TINY_CONFIG = _tiny_config()


def _gen(seed: int, name: str) -> "torch.Generator":
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _randn(shape, seed: int, name: str, std: float = 1.0, mean: float = 0.0):
    import torch

    return torch.randn(shape, generator=_gen(seed, name)) * std + mean


def _official_config(config: dict):
    """The official dataclass config, as `LFM2AudioModel.from_pretrained` builds it."""
    official()
    from liquid_audio.model.conformer.encoder import ConformerEncoderConfig
    from liquid_audio.model.lfm2_audio import DepthformerConfig, LFM2AudioConfig
    from transformers import Lfm2Config

    c = copy.deepcopy(config)
    return LFM2AudioConfig(lfm=Lfm2Config(**c.pop("lfm")), encoder=ConformerEncoderConfig(**c.pop("encoder")),
                           depthformer=DepthformerConfig(**c.pop("depthformer")), **c)


def _official_skeleton(config: dict):
    """The official model with parameters on the meta device (buffers real): names, shapes, buffers."""
    official()
    from accelerate import init_empty_weights
    from liquid_audio.model.lfm2_audio import LFM2AudioModel

    conf = _official_config(config)
    with init_empty_weights():
        return LFM2AudioModel(conf)


# Out-projections of every residual branch are scaled up so the layers dominate the residual stream:
# otherwise the last hidden state is ~ the input embedding and, with tied logits, greedy repeats a token.
LAYER_GAIN = 2.0
OFFSET_RMS = 1.0  # a direction shared by every input embedding, so hidden states have a common mean
# Output rows get log-normal norms: the winner then stands out from the runner-up (greedy decisions far
# from ties, so two float32 implementations agree) while still dozens of distinct tokens win.
ROW_NORM_SIGMA = 1.0


def _init_tensor(name: str, shape, fan_in: int, seed: int):
    """Random values for one state_dict entry; scale chosen by what the tensor is."""
    leaf = name.rsplit(".", 1)[-1]
    if name == "lfm.embedding_norm.weight":
        # zero-mean gains: with tied logits, e_x . (g * e_x) would otherwise make the input token win
        return _randn(shape, seed, name)
    if name.endswith(("norm.weight", "layernorm.weight", "norm1.weight", "norm2.weight")) or \
            ".norm_" in name and leaf == "weight" or name.endswith("batch_norm.weight") or \
            name.endswith("audio_adapter.model.0.weight"):
        return _randn(shape, seed, name, 0.1, 1.0)  # norm gains near 1
    if name.endswith("running_var"):
        return _randn(shape, seed, name).abs() * 0.5 + 0.5
    if leaf in ("bias", "running_mean") or name.endswith(("pos_bias_u", "pos_bias_v")):
        return _randn(shape, seed, name, 0.1)
    if "embed_tokens" in name or name.startswith("depth_embeddings.") or name.startswith("audio_embedding.to_logits"):
        return _randn(shape, seed, name)
    if name.startswith("audio_embedding.embedding.weight"):
        return _randn(shape, seed, name, 1 / math.sqrt(8))  # eight rows are summed per frame
    gain = LAYER_GAIN if name.endswith(("out_proj.weight", "w2.weight")) else 1.0
    return _randn(shape, seed, name, gain / math.sqrt(fan_in))


def _fan_in(shape) -> int:
    return max(1, math.prod(shape[1:])) if len(shape) > 1 else 1


def _random_state_dict(config: dict, seed: int, dtype) -> dict:
    """Every key of the official state_dict, random, in `dtype` (integer buffers stay int64)."""
    import torch

    skeleton = _official_skeleton(config)
    offset = _randn(config["lfm"]["hidden_size"], seed, "shared-offset", OFFSET_RMS)
    sd = {}
    for name, t in skeleton.state_dict().items():
        if name in ("codebook_offsets", "audio_loss_weights"):
            sd[name] = t.clone() if t.dtype == torch.int64 else t.to(dtype)  # computed by the model
        elif name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(1000 + seed, dtype=torch.int64)
        else:
            v = _init_tensor(name, tuple(t.shape), _fan_in(tuple(t.shape)), seed)
            if name.endswith("embedding.weight") and "depth_emb" in name:
                v *= _randn((v.shape[0], 1), seed, name + "/row-norms", ROW_NORM_SIGMA).exp()
            if name in ("lfm.embed_tokens.weight", "audio_adapter.model.3.bias"):
                v += offset
            elif name == "audio_embedding.embedding.weight":
                v += offset / config["codebooks"]
            sd[name] = v.to(dtype)
    for k in range(config["codebooks"]):  # tie=True: to_logits IS the embedding; stored as a copy
        if config["depthformer"]["tie"]:
            sd[f"depth_embeddings.{k}.to_logits.weight"] = sd[f"depth_embeddings.{k}.embedding.weight"].clone()
    if config["tie_audio_embeddings"]:
        sd["audio_embedding.to_logits.weight"] = sd["audio_embedding.embedding.weight"].clone()
    return sd


def _model_from_state_dict(config: dict, sd: dict):
    """The official model holding `sd`'s tensors as they are (no copy), for the tuning forward passes."""
    model = _official_skeleton(config)
    model.load_state_dict(sd, assign=True, strict=True)
    for m in model.modules():  # non-persistent buffers (RoPE tables) follow the weights' dtype
        for n, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point() and not b.is_complex():
                m._buffers[n] = b.to(sd["lfm.embed_tokens.weight"].dtype)
    return model.eval()


# target win rates of the special outputs over the tuning states (tuned by hand on real prompts)
SWITCH_RATES = {AUDIO_START: 0.10, TEXT_END: 0.03, IM_END: 0.02, END_OF_AUDIO: 0.08}


def _tuning_states(model, config: dict, seed: int):
    """Final hidden states [N, D] of a synthetic history mixing text tokens and audio frames."""
    import torch

    g = _gen(seed, "tuning-sequence")
    n_text = min(config["lfm"]["vocab_size"], 4000)  # ids the fixture tokenizer can produce
    parts = []
    for _ in range(3):
        ids = torch.randint(501, n_text, (40,), generator=g)
        parts.append(model.lfm.embed_tokens(ids))
        codes = torch.randint(0, 2048, (config["codebooks"], 40), generator=g) + model.codebook_offsets[:, None]
        parts.append(model.audio_embedding(codes).sum(0))
    with torch.no_grad():
        return model.lfm(inputs_embeds=torch.cat(parts)[None]).last_hidden_state[0].float()


def _lift_row(weight, row: int, states, rate: float, rows_exclude=()):
    """Move `weight[row]` along the mean direction of `states` so it wins for a `rate` share of them.

    logit_row(h) + a * (m.h) > max of the other rows  <=>  a > (max_other - logit_row) / (m.h);
    `a` is that threshold's `rate`-quantile, so the row wins sometimes, not always.
    """
    import torch

    m = states.mean(0)
    m = m / m.norm()
    logits = states @ weight.float().T  # [N, V]
    others = logits.clone()
    others[:, [row, *rows_exclude]] = -float("inf")
    proj = states @ m
    need = torch.where(proj > 0, (others.max(1).values - logits[:, row]) / proj.clamp_min(1e-6), float("inf"))
    a = torch.quantile(need, rate).clamp_min(0)
    weight[row] += (a * m).to(weight.dtype)
    return float(a)


def _tune_switches(config: dict, sd: dict, seed: int) -> dict:
    """Make <|audio_start|>, <|text_end|>, <|im_end|> and the end-of-audio code win now and then."""
    import torch

    model = _model_from_state_dict(config, sd)
    states = _tuning_states(model, config, seed)
    specials = (AUDIO_START, TEXT_END, IM_END)
    emb = sd["lfm.embed_tokens.weight"]  # also the text logits (tied)
    lifts = {t: _lift_row(emb, t, states, SWITCH_RATES[t], specials) for t in specials}
    with torch.no_grad():  # codebook 0 of the depthformer sees depth_linear(h)[:dim] with no previous code
        d0 = model.depth_linear(states.to(emb.dtype))[:, : config["depthformer"]["dim"]]
        out = model.depth_embeddings[0].embedding_norm(model.depthformer(d0[:, None])[:, 0]).float()
    table = sd["depth_embeddings.0.embedding.weight"]
    lifts[END_OF_AUDIO] = _lift_row(table, END_OF_AUDIO, out, SWITCH_RATES[END_OF_AUDIO])
    if config["depthformer"]["tie"]:
        sd["depth_embeddings.0.to_logits.weight"] = table.clone()
    return lifts


MIMI_RMS = 0.3  # level of random codes decoded by the random Mimi: audio-like, so absolute tolerances bite


def _mimi_random_state(sd: dict, seed: int) -> dict:
    """Random values for every tensor of the official Mimi state dict, scaled so each stage stays O(1)."""
    import torch

    out = {}
    for name, t in sd.items():
        g = _gen(seed, name)
        if name.endswith("cluster_usage"):
            v = torch.rand(t.shape, generator=g) * 1.5 + 0.5
        elif name.endswith("embedding_sum"):
            v = torch.randn(t.shape, generator=g)
        elif name.endswith("_initialized"):
            v = torch.ones(t.shape)
        elif "layer_scale" in name:  # trained Mimi scales are far from the 0.01 init
            v = torch.rand(t.shape, generator=g) * 0.4 + 0.1
        elif "norm" in name and name.endswith("weight"):
            v = torch.randn(t.shape, generator=g) * 0.1 + 1.0
        elif name.endswith("bias"):
            v = torch.randn(t.shape, generator=g) * 0.1
        elif "convtr" in name:  # [C_in, C_out/groups, K]: each output sums C_in/groups * K/S taps (K = 2S)
            v = torch.randn(t.shape, generator=g) * (2 * (t.shape[0] if t.shape[1] > 1 else 1)) ** -0.5
        else:
            v = torch.randn(t.shape, generator=g) * t[0].numel() ** -0.5
        out[name] = v.to(t.dtype)
    # ~5% dead codes: usage below the codebook's 1e-5 clamp, centroid sums scaled to match, so the clamp matters
    for name in [k for k in out if k.endswith("cluster_usage")]:
        dead = torch.rand(out[name].shape, generator=_gen(seed, name + "/dead")) < 0.05
        out[name][dead] = 1e-7
        out[name.replace("cluster_usage", "embedding_sum")][dead] *= 1e-5
    return out


def official_mimi(seed: int = 0):
    """The official Mimi codec (`get_mimi`) with every tensor random, in eval mode.

    Random codes decode to a waveform of RMS ~MIMI_RMS (the last conv is scaled to it): not silence.
    """
    import torch

    official()
    from liquid_audio.moshi.models.loaders import get_mimi

    with torch.random.fork_rng():  # get_mimi initialises from the global RNG; every tensor is replaced anyway
        mimi = get_mimi(None, "cpu").eval()
    sd = _mimi_random_state(mimi.state_dict(), seed)
    mimi.load_state_dict(sd, strict=True)
    codes = torch.randint(0, 2048, (1, 8, 8), generator=_gen(seed, "mimi-probe"))
    with torch.no_grad():
        rms = float(mimi.decode(codes).pow(2).mean().sqrt())
    last = max((k for k in sd if k.startswith("decoder.model.") and k.endswith("conv.conv.weight")),
               key=lambda k: int(k.split(".")[2]))
    for k in (last, last.replace("weight", "bias")):
        sd[k] = sd[k] * (MIMI_RMS / rms)
    mimi.load_state_dict(sd, strict=True)
    return mimi


def mimi_file_tensors(mimi, kyutai_names: bool = True) -> dict:
    """The official Mimi's whole state dict as the real file stores it: fp32, attention named as in Kyutai's
    release (`in_proj_weight`, `out_proj.weight`), or with kyutai_names=False as the official module names it.

    Renamed here, not with mimi._canonical_key, so the file layout does not come from the code under test.
    """
    out = {}
    for name, t in mimi.state_dict().items():
        if kyutai_names:
            name = name.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight")
            name = name.replace("self_attn.out_projs.0.weight", "self_attn.out_proj.weight")
        out[name] = t.detach().float().contiguous().clone()
    return out


def write_mimi(path: Path, seed: int = 0):
    """Write `official_mimi(seed)` to `path` like the real Mimi file; return the official module read back from
    that file with `load_state_dict(strict=True)`, as `LFM2AudioProcessor.mimi` reads it."""
    from safetensors.torch import load_file, save_file

    mimi = official_mimi(seed)
    save_file(mimi_file_tensors(mimi), str(path), metadata={"format": "pt"})
    mimi.load_state_dict(load_file(str(path)), strict=True)
    return mimi


_ST_DTYPES = {"torch.bfloat16": "BF16", "torch.float32": "F32", "torch.int64": "I64"}


def _save_safetensors(tensors: dict, path: Path) -> None:
    """safetensors' file format, written one tensor at a time (its save_file copies everything first)."""
    import struct

    import torch

    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))  # safetensors' own order
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in names:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[str(t.dtype)], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for k in names:
            t = tensors[k].contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


CHAT_TEMPLATE = (
    "{{- bos_token -}}\n{%- for message in messages -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n{{- '<|im_start|>assistant\\n' -}}\n{%- endif -%}\n"
)


def make_checkpoint(folder: Path, config: dict, seed: int = 0) -> Path:
    """Write a checkpoint folder in the layout of the Hugging Face snapshot, with random weights."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder)
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}, indent=1))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    sd = _random_state_dict(config, seed, torch.bfloat16)
    _tune_switches(config, sd, seed)
    _save_safetensors(sd, folder / "model.safetensors")
    del sd
    write_mimi(folder / MIMI_FILE, seed)
    return folder


_BUILDER_PARTS = [training_corpus, write_tokenizer, _gen, _randn, _official_skeleton, _init_tensor, _fan_in,
                  _random_state_dict, _model_from_state_dict, _tuning_states, _lift_row, _tune_switches,
                  _mimi_random_state, official_mimi, mimi_file_tensors, write_mimi, _save_safetensors, make_checkpoint]


def _checkpoint_key(config: dict, seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(repr((seed, FIXTURE_VERSION, LAYER_GAIN, OFFSET_RMS, ROW_NORM_SIGMA, SWITCH_RATES, MIMI_RMS, SPECIALS,
                   CHAT_TEMPLATE)).encode())
    for f in _BUILDER_PARTS:
        h.update(inspect.getsource(f).encode())
    return h.hexdigest()[:16]


def cached_checkpoint(config: dict, seed: int = 0) -> Path:
    """`make_checkpoint` once per (config, seed, recipe) into CACHE_ROOT, written atomically, reused."""
    final = CACHE_ROOT / _checkpoint_key(config, seed)
    if final.is_dir():
        return final
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the folder
        if not final.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=CACHE_ROOT))
            try:
                make_checkpoint(tmp, config, seed)
                os.chmod(tmp, 0o755)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_official(ckpt: Path):
    """(LFM2AudioModel, LFM2AudioProcessor) from the official package, float32 on CPU, eval mode."""
    import torch

    official()
    from liquid_audio import LFM2AudioModel, LFM2AudioProcessor

    model = LFM2AudioModel.from_pretrained(Path(ckpt), dtype=torch.float32, device="cpu").eval()
    processor = LFM2AudioProcessor.from_pretrained(Path(ckpt), device="cpu").eval()
    return model, processor


# ---- the official prompts (as the official README and demo build them) ------------------------------

ASSETS = ROOT / "assets"  # the recordings the repository ships
PROMPTS = {  # task: (system prompt, user audio file or None, user text or None, generation mode)
    "chat": ("Respond with interleaved text and audio.", "question.wav", None, "interleaved"),
    "text_chat": ("Respond with interleaved text and audio.", None, "What is the capital of France?",
                  "interleaved"),
    "asr": ("Perform ASR.", "asr.wav", None, "sequential"),
    "tts": ("Perform TTS. Use the UK male voice.", None,
            "Hello! The weather today is sunny with a light breeze.", "sequential"),
}


def load_wav(path: Path):
    """(wave [channels, samples] float32 tensor, sample rate), like torchaudio.load."""
    import soundfile as sf
    import torch

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), rate


def build_prompt(chat, task: str, read_audio):
    """Fill `chat` with the turns of PROMPTS[task], as the official README builds them; the assistant turn is
    left open. `chat` is the official ChatState or our lfm2audio.Chat (both have new_turn / add_text /
    add_audio / end_turn); `read_audio(path) -> (wave, rate)` gives the wave in the form its add_audio takes.
    """
    system, audio, text, _ = PROMPTS[task]
    chat.new_turn("system")
    chat.add_text(system)
    chat.end_turn()
    chat.new_turn("user")
    if audio is not None:
        chat.add_audio(*read_audio(ASSETS / audio))
    if text is not None:
        chat.add_text(text)
    chat.end_turn()
    chat.new_turn("assistant")
    return chat


def official_prompt(processor, task: str):
    """The official ChatState for `task` (a PROMPTS key), ready for the assistant turn."""
    official()
    from liquid_audio import ChatState

    return build_prompt(ChatState(processor), task, load_wav)


def official_generate(model, chat, mode: str, max_new_tokens: int, drop_im_end: bool = False, **sampling) -> list:
    """The official generate_interleaved / generate_sequential (`mode`) from `chat`, greedy unless sampling
    options are given, as items ("text", id) / ("audio", [8 codes]) (our generate's form, and run.py's).

    drop_im_end: drop a final <|im_end|> (sequential mode yields it; run.py does not write it).
    """
    import torch

    gen = model.generate_interleaved if mode == "interleaved" else model.generate_sequential
    with torch.no_grad():
        items = [("text", int(t)) if t.numel() == 1 else ("audio", t.flatten().tolist())
                 for t in gen(**chat, max_new_tokens=max_new_tokens, **sampling)]
    if drop_im_end and items and items[-1] == ("text", IM_END):
        items.pop()
    return items


def official_append(chat, items) -> None:
    """The official multi-turn history update (README, demo): ChatState.append of a finished turn's items
    (text ids and audio frames, end-of-audio included, in order). The turn is not ended."""
    import torch

    official()
    from liquid_audio import LFMModality

    text = [v for k, v in items if k == "text"]
    audio = [v for k, v in items if k == "audio"]
    chat.append(text=torch.tensor(text, dtype=torch.long).view(1, -1),
                audio_out=torch.tensor(audio, dtype=torch.long).view(-1, 8).T,
                modality_flag=torch.tensor([LFMModality.TEXT if k == "text" else LFMModality.AUDIO_OUT
                                            for k, _ in items]))


def stream_events(items) -> list:
    """Compress generated items: runs of ("text", n) / ("audio", n), and the special items by name."""
    names = {AUDIO_START: "audio_start", TEXT_END: "text_end", IM_END: "im_end"}
    events = []
    for kind, value in items:
        if kind == "text" and value in names:
            events.append(names[value])
        elif kind == "audio" and all(c == END_OF_AUDIO for c in value):
            events.append("end_of_audio")
        else:
            if events and isinstance(events[-1], tuple) and events[-1][0] == kind:
                events[-1] = (kind, events[-1][1] + 1)
            else:
                events.append((kind, 1))
    return events


# ---- LFM2.5-Audio: the same folder plus `audio_detokenizer/` (the LFM2 vocoder) ------------------------

DETOKENIZER_DIR = "audio_detokenizer"
# transformers' Lfm2Config form with llama.cpp's layer names, as LFM2.5-Audio-1.5B ships it; the SwiGLU width
# is 2304 after LFM2's adjustment (int(2 * 3456 / 3) = 2304, already a multiple of 256)
DETOKENIZER_CONFIG = {
    "architectures": ["Lfm2Model"], "model_type": "lfm2", "hidden_size": 512, "num_hidden_layers": 8,
    "layer_types": ["conv", "conv", "sliding_attention", "conv", "sliding_attention", "conv", "sliding_attention",
                    "conv"],
    "sliding_window": 30, "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 3456,
    "block_auto_adjust_ff_dim": True, "block_multiple_of": 256, "block_ffn_dim_multiplier": 1.0,
    "conv_L_cache": 3, "conv_bias": False, "norm_eps": 1e-5, "rope_theta": 1000000.0, "vocab_size": 65536,
    "max_position_embeddings": 128000, "tie_word_embeddings": True, "torch_dtype": "float32",
}
DETOKENIZER_RMS = 0.3  # level of random codes decoded by the random detokenizer: audio-like


def official_detokenizer(folder: Path):
    """The official LFM2AudioDetokenizer read from `folder` (an `audio_detokenizer/`) exactly as
    `LFM2AudioProcessor.audio_detokenizer` reads it (config, layer renaming, strict load), but left on the CPU:
    the official property calls `.cuda()` unconditionally."""
    official()
    from liquid_audio.detokenizer import LFM2AudioDetokenizer
    from safetensors.torch import load_file
    from transformers import Lfm2Config

    config = Lfm2Config.from_pretrained(Path(folder) / "config.json")
    config.layer_types = ["full_attention" if t == "sliding_attention" else t for t in config.layer_types]
    detok = LFM2AudioDetokenizer(config).eval()
    detok.load_state_dict(load_file(Path(folder) / "model.safetensors"))
    return detok.eval()


def official_processor_cpu(ckpt: Path):
    """The official LFM2AudioProcessor of an LFM2.5 folder on the CPU, its detokenizer (CUDA-only in the official
    property) put in place by `official_detokenizer`, so `processor.decode` runs as the official code does."""
    official()
    from liquid_audio import LFM2AudioProcessor

    processor = LFM2AudioProcessor.from_pretrained(Path(ckpt), device="cpu").eval()
    processor._audio_detokenizer = official_detokenizer(Path(ckpt) / DETOKENIZER_DIR)
    return processor


def _detokenizer_init(name: str, shape, seed: int):
    if name == "istft.window":
        import torch

        return torch.hann_window(shape[0])  # what the official module stores
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return _randn(shape, seed, name, 0.1, 1.0)
    if name.endswith("bias"):
        return _randn(shape, seed, name, 0.1)
    if name.endswith(("emb.weight", "embed_tokens.weight")):
        return _randn(shape, seed, name)
    gain = LAYER_GAIN if name.endswith(("out_proj.weight", "w2.weight")) else 1.0
    return _randn(shape, seed, name, gain / math.sqrt(_fan_in(shape)))


def write_detokenizer(folder: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Write `audio_detokenizer/` (config.json, model.safetensors with the official module's keys, its tensors
    stored in `dtype`: float32 or bfloat16, the real file's dtype being unknown) with random weights; the
    magnitude bias is shifted so random codes decode at RMS ~DETOKENIZER_RMS."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(DETOKENIZER_CONFIG, indent=2))
    official()
    from liquid_audio.detokenizer import LFM2AudioDetokenizer
    from transformers import Lfm2Config

    config = Lfm2Config.from_pretrained(folder / "config.json")
    config.layer_types = ["full_attention" if t == "sliding_attention" else t for t in config.layer_types]
    with torch.random.fork_rng():  # its init draws from the global RNG; every tensor is replaced below
        skeleton = LFM2AudioDetokenizer(config).eval()
    sd = {k: _detokenizer_init(k, tuple(t.shape), seed).contiguous() for k, t in skeleton.state_dict().items()}
    skeleton.load_state_dict(sd, strict=True)
    codes = torch.randint(0, 2048, (1, 8, 16), generator=_gen(seed, "detokenizer-probe"))
    with torch.no_grad():
        rms = float(skeleton(codes).pow(2).mean().sqrt())
    sd["lin.bias"][: sd["lin.bias"].shape[0] // 2] += math.log(DETOKENIZER_RMS / rms)  # |X| x c: wave x c
    sd = {k: v.to(getattr(torch, dtype)) for k, v in sd.items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def cached_lfm25_checkpoint(config: dict, seed: int = 0, detokenizer_dtype: str = "float32") -> Path:
    """`cached_checkpoint(config, seed)` plus `audio_detokenizer/` (stored in `detokenizer_dtype`): an
    LFM2.5-Audio-shaped folder, cached (files of the LFM2 folder hard-linked, not copied)."""
    base = cached_checkpoint(config, seed)
    h = hashlib.sha256(base.name.encode())
    h.update(json.dumps(DETOKENIZER_CONFIG, sort_keys=True).encode() + repr((DETOKENIZER_RMS, seed)).encode())
    if detokenizer_dtype != "float32":  # the float32 folder keeps its name (and its cache)
        h.update(detokenizer_dtype.encode())
    for f in (_detokenizer_init, write_detokenizer):
        h.update(inspect.getsource(f).encode())
    final = CACHE_ROOT / f"lfm25-{h.hexdigest()[:16]}"
    if final.is_dir():
        return final
    with open(CACHE_ROOT / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=CACHE_ROOT))
            try:
                shutil.copytree(base, tmp, dirs_exist_ok=True, copy_function=os.link)
                write_detokenizer(tmp / DETOKENIZER_DIR, seed, detokenizer_dtype)
                os.chmod(tmp, 0o755)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv=None):
    """`python .ci/fixtures.py [tiny|full|lfm25] [--link DIR]`: build (once, cached) the random-weight checkpoint
    the tests use and print its folder, so that `--model` can be given one without the real weights."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("size", nargs="?", default="tiny", choices=["tiny", "full", "lfm25"],
                   help="tiny (a few MB, seconds), full (the real shapes, 3.3 GB), lfm25 (tiny + an LFM2.5 "
                        "detokenizer)")
    p.add_argument("--link", help="also make DIR a symlink to the folder")
    args = p.parse_args(argv)
    official()  # the skeleton's key layout comes from the official package (python .ci/reference.py)
    folder = {"tiny": lambda: cached_checkpoint(TINY_CONFIG), "full": lambda: cached_checkpoint(FULL_CONFIG),
              "lfm25": lambda: cached_lfm25_checkpoint(TINY_CONFIG)}[args.size]()
    if args.link:
        link = Path(args.link)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(folder, target_is_directory=True)
    print(args.link or folder)


if __name__ == "__main__":
    main()
