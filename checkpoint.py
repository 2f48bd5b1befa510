"""A checkpoint folder, found (a local folder, or a Hugging Face repo id fetched into the hub cache) and loaded:
the config, a strict load of `model.safetensors` into a model built on the meta device, the tokenizer.

    model = checkpoint.load("LiquidAI/LFM2-Audio-1.5B", device="cpu", dtype=torch.bfloat16)  # = from_pretrained

Only the files the model needs are downloaded; with HF_HUB_OFFLINE=1 only the cache is used.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lfm2audio import Config, LFM2Audio, swiglu_width
from tokenizer import Tokenizer

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
DETOKENIZER_DIR = "audio_detokenizer"  # LFM2.5-Audio's LFM2 vocoder (detokenizer.py); absent in LFM2-Audio
CHECKPOINT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MIMI_FILE]
DOWNLOAD_PATTERNS = CHECKPOINT_FILES + [f"{DETOKENIZER_DIR}/*"]


def checkpoint_folder(repo_id_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id (owner/name), fetched into the hub cache."""
    path = Path(repo_id_or_path)
    if path.is_dir():
        return path
    name = str(repo_id_or_path)
    if isinstance(repo_id_or_path, Path) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name}: no such checkpoint folder (nor a Hugging Face repo id owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=DOWNLOAD_PATTERNS))
    except (OSError, ValueError) as e:  # offline cache miss, unknown repo, network down (hub errors are OSErrors)
        raise FileNotFoundError(f"{name}: could not get the checkpoint from Hugging Face ({type(e).__name__}: "
                                f"{e}); a local folder works too (--model DIR), and HF_HUB_OFFLINE=1 uses what "
                                "the hub cache already holds") from None


def lfm2_config(d: dict, **fields) -> Config:
    """transformers' Lfm2Config dict -> the Config of its LFM2 blocks; `fields` sets the other fields."""
    n_layers = d["num_hidden_layers"]
    layer_types = d.get("layer_types") or [
        "full_attention" if i in d["full_attn_idxs"] else "conv" for i in range(n_layers)]
    ff = d.get("block_ff_dim", d.get("intermediate_size"))  # transformers lets block_ff_dim win
    if d.get("block_auto_adjust_ff_dim", True):
        ff = swiglu_width(ff, d.get("block_ffn_dim_multiplier", 1.0), d.get("block_multiple_of", 256))
    rope = d.get("rope_parameters") or {}
    return Config(
        dim=d["hidden_size"], layer_types=list(layer_types[:n_layers]), n_heads=d["num_attention_heads"],
        n_kv_heads=d["num_key_value_heads"], ff_dim=ff, vocab_size=d["vocab_size"],
        norm_eps=d.get("norm_eps", 1e-5), rope_theta=rope.get("rope_theta", d.get("rope_theta", 1e6)),
        conv_kernel=d.get("conv_L_cache", 3), **fields)


def read_config(path: Path) -> Config:
    """An LFM2-Audio config.json: the backbone's Lfm2Config under "lfm", the depthformer, the interleave."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        d = json.loads(path.read_text())
        depth = d["depthformer"]
        return lfm2_config(
            d["lfm"], codebooks=d["codebooks"], tie_audio_embeddings=d["tie_audio_embeddings"],
            depth_layers=depth["layers"], depth_dim=depth["dim"], depth_tie=depth["tie"],
            interleaved_n_text=d["interleaved_n_text"], interleaved_n_audio=d["interleaved_n_audio"],
            encoder=d["encoder"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not an LFM2-Audio config ({type(e).__name__}: {e})") from None


def check_state_dict(expected: dict, state: dict, name) -> None:
    """One ValueError naming the missing, unexpected and mis-shaped tensors of `state`, if any."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{what}: {', '.join(names[:8])}" + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
                for what, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                    ("wrong shapes", wrong)) if names]
    if problems:
        raise ValueError(f"{name}: " + "; ".join(problems))


def load_state(model: LFM2Audio, state: dict[str, torch.Tensor], name: str = "checkpoint"):
    """Strict load of a checkpoint state dict; a tied weight may be stored once or twice. Missing, unexpected
    or mis-shaped tensors are reported by name in one ValueError."""
    state = dict(state)
    for a, b in model.tied_pairs():  # safetensors stores a shared tensor under one of its names
        if a in state and b not in state:
            state[b] = state[a]
        elif b in state and a not in state:
            state[a] = state[b]
    check_state_dict(model.state_dict(), state, name)
    model.load_state_dict(state, strict=True)


def load(folder: str | Path, device="cpu", dtype=torch.float32, max_seq_len: int = 4096,
         quantize: str | None = None) -> LFM2Audio:
    """The model of a checkpoint folder (or repo id), cast to `dtype` on `device`, with caches for `max_seq_len`
    positions; `quantize` "int8" or "int4": quantize.py."""
    folder = checkpoint_folder(folder)
    cfg = read_config(folder / "config.json")
    weights, tok = folder / "model.safetensors", folder / "tokenizer.json"
    for path, what in ((weights, "model weights"), (tok, "text tokenizer")):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {what} not found")
    # built on the meta device, then allocated uninitialised: every tensor is overwritten by the load
    with torch.device("meta"):
        model = LFM2Audio(cfg).to(dtype=dtype)
    if quantize:
        import quantize as q
        model = q.load_quantized(model, weights, device, quantize)
    else:
        model = model.to_empty(device=device)
        model.tie_weights()  # moving off meta made separate copies of tied weights
        try:
            state = load_file(str(weights), device=str(device))
        except SafetensorError as e:  # the reader's message does not name the file
            raise ValueError(f"{weights}: unreadable safetensors file ({e})") from None
        load_state(model, state, str(weights))
    model.tokenizer = Tokenizer.from_file(tok)
    model.setup_caches(max_seq_len)
    return model.eval()
