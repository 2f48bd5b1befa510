"""LFM2-Audio-1.5B: the LFM2 backbone, the audio depthformer, the chat prompt and both generation modes.

Reads the official Hugging Face checkpoint folder as it is (module names equal the keys of `model.safetensors`)
and reproduces the official `liquid-audio` 1.3.0 generation token for token. Decoding is gpt-fast style: static,
preallocated caches (KV for attention layers, the last two conv inputs for conv layers, an 8-step cache for the
depthformer), so that `decode_one` (a backbone step), `text_step` and `audio_step` (a token / a whole frame,
sampled on the device) have fixed shapes; `compile_decode()` compiles them (CUDA graphs on a GPU). `respond`, at
the end, is the whole data path of an answer, wav in to wav out; the README has an example.
"""

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

import conformer
from tokenizer import Tokenizer

# modality flags of prompt positions (the official LFMModality values)
TEXT, AUDIO_IN, AUDIO_OUT = 1, 2, 3

# text ids with a meaning for generation
IM_END = 7  # <|im_end|>: the assistant's turn is over
AUDIO_START = 128  # <|audio_start|>: sequential mode switches to audio
TEXT_END = 130  # <|text_end|>: interleaved mode has no more text, audio only

AUDIO_VOCAB = 2049  # 2048 Mimi codes + end of audio
END_OF_AUDIO = 2048

# the depthformer's attention shape is fixed in the official code, not in config.json
DEPTH_HEADS, DEPTH_KV_HEADS = 32, 8
DEPTH_ROPE_THETA = 1e6
NORM_EPS = 1e-5  # the official depthformer and embedding norms

PREFILL_CHUNK = 512  # positions per prefill chunk: bounds the activations and attention scores of a long prompt

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
CHECKPOINT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MIMI_FILE]
DETOKENIZER_DIR = "audio_detokenizer"  # LFM2.5-Audio's LFM2 vocoder (detokenizer.py); absent in LFM2-Audio
DOWNLOAD_PATTERNS = CHECKPOINT_FILES + [f"{DETOKENIZER_DIR}/*"]


def swiglu_width(ff_dim: int, multiplier: float | None = 1.0, multiple_of: int = 256) -> int:
    """The hidden width the official code derives from a nominal FF width: 2/3 of it, rounded up to 256."""
    width = int(2 * ff_dim / 3)
    if multiplier is not None:  # transformers rounds only inside this branch; so do we
        width = int(multiplier * width)
        width = multiple_of * ((width + multiple_of - 1) // multiple_of)
    return width


@dataclass
class Config:
    """What inference needs from config.json (the LFM2 block, the depthformer, the interleave pattern)."""

    dim: int = 2048
    layer_types: list[str] = field(default_factory=lambda: ["conv"] * 16)
    n_heads: int = 32
    n_kv_heads: int = 8
    ff_dim: int = 8192  # SwiGLU hidden width, after the official adjustment
    vocab_size: int = 65536
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    conv_kernel: int = 3
    codebooks: int = 8
    tie_audio_embeddings: bool = False
    depth_layers: int = 6
    depth_dim: int = 1024
    depth_tie: bool = True
    interleaved_n_text: int = 6
    interleaved_n_audio: int = 12
    encoder: dict = field(default_factory=dict)  # config.json's "encoder", for conformer.EncoderConfig

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        lfm, depth = d["lfm"], d["depthformer"]
        n_layers = lfm["num_hidden_layers"]
        layer_types = lfm.get("layer_types") or [
            "full_attention" if i in lfm["full_attn_idxs"] else "conv" for i in range(n_layers)]
        ff = lfm.get("block_ff_dim", lfm.get("intermediate_size"))  # transformers lets block_ff_dim win
        if lfm.get("block_auto_adjust_ff_dim", True):
            ff = swiglu_width(ff, lfm.get("block_ffn_dim_multiplier", 1.0), lfm.get("block_multiple_of", 256))
        rope = lfm.get("rope_parameters") or {}
        return cls(
            dim=lfm["hidden_size"], layer_types=list(layer_types[:n_layers]), n_heads=lfm["num_attention_heads"],
            n_kv_heads=lfm["num_key_value_heads"], ff_dim=ff, vocab_size=lfm["vocab_size"],
            norm_eps=lfm.get("norm_eps", 1e-5), rope_theta=rope.get("rope_theta", lfm.get("rope_theta", 1e6)),
            conv_kernel=lfm.get("conv_L_cache", 3), codebooks=d["codebooks"],
            tie_audio_embeddings=d["tie_audio_embeddings"], depth_layers=depth["layers"], depth_dim=depth["dim"],
            depth_tie=depth["tie"], interleaved_n_text=d["interleaved_n_text"],
            interleaved_n_audio=d["interleaved_n_audio"], encoder=d["encoder"])

    @classmethod
    def from_file(cls, path: Path) -> "Config":
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not an LFM2-Audio config ({type(e).__name__}: {e})") from None


# ---- shared pieces ----

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


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. The two official implementations apply the weight at different precisions
    (transformers after casting back, the depthformer before), which matters in bf16; `weight_in_fp32` picks."""

    def __init__(self, dim: int, eps: float = NORM_EPS, weight_in_fp32: bool = False):
        super().__init__()
        self.eps, self.weight_in_fp32 = eps, weight_in_fp32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: x * rsqrt(mean(x^2) + eps), computed in fp32 whatever x's dtype, rounded to it once
        if self.weight_in_fp32:
            return (F.rms_norm(x.float(), x.shape[-1:], eps=self.eps) * self.weight).type_as(x)
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KVCache(nn.Module):
    """Static key/value cache [batch, n_kv_heads, max_len, head_dim]: a row per sequence, written at `input_pos`."""

    def __init__(self, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device, batch: int = 1):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int = 0):
        """k/v [B, KV, T, hd] into rows row .. row+B-1 at input_pos [T] (every row) or [B, 1] (one per row);
        returns those rows of the cache [B, KV, S, hd]."""
        rows = torch.arange(row, row + k.shape[0], device=k.device)[:, None]  # [B, 1]
        self.k[rows, :, input_pos] = k.transpose(1, 2)  # indexed as [B, T, KV, hd]
        self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k[row:row + k.shape[0]], self.v[row:row + k.shape[0]]


def attend(q, k, v, kv_cache: KVCache, input_pos, mask, row: int = 0) -> torch.Tensor:
    """q [B, H, T, hd], k/v [B, KV, T, hd] -> [B, T, H*hd], k/v written to cache rows row .. row+B-1 at
    input_pos first; each query sees the cache's first S' positions where `mask` is True. T > 1: a chunk of a
    prefill of one row, mask [T, S'] (S' its end: the history before it plus itself, causally); T == 1: a decode
    step, mask [B, S'] (S' the furthest row's end, or the whole static cache when compiled: fixed shapes)."""
    k_all, v_all = kv_cache.update(input_pos, k, v, row)
    b, n_kv, s, hd = k_all.shape[0], k_all.shape[1], mask.shape[-1], k_all.shape[-1]
    k_all, v_all = k_all[:, :, :s], v_all[:, :, :s]
    if q.shape[2] > 1:
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2).flatten(2)
    # written out rather than SDPA: CPU SDPA with a mask is ~10x slower than these two small matmuls at a
    # 4096-position cache; the query heads of one KV head are grouped, so K/V are read once, not repeated
    qg = q.view(b, n_kv, -1, hd)  # [B, KV, H/KV, hd]: head h uses KV head h // (H/KV)
    scores = (qg @ k_all.transpose(-1, -2)) * hd ** -0.5  # [B, KV, H/KV, S']
    scores = scores.masked_fill(~mask.view(-1, 1, 1, s), -float("inf"))
    return (scores.softmax(-1) @ v_all).view(b, 1, -1)


# ---- LFM2 backbone (keys lfm.*) ----

def rope_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LFM2's RoPE: the two halves of each head form the pairs. x [B, H, T, hd], cos/sin [T, hd] or
    [B, 1, 1, hd] (a position per row)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class ShortConv(nn.Module):
    """Gated short convolution: B, C, x = in_proj(h); y = C * causal_depthwise_conv(B * x); out_proj(y).
    The last kernel-1 inputs of the conv (`state`) carry over from one call to the next (a prefill chunk or a
    decode step); zeroed at position 0."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.register_buffer("state", None, persistent=False)  # [batch, kernel-1, dim], made by setup_caches

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:  # x [B, T, D]
        """`state` [B, kernel-1, D]: a caller's own conv state (the audio detokenizer's streams); default ours."""
        state = self.state if state is None else state
        t = x.shape[1]
        b, c, xx = self.in_proj(x).chunk(3, dim=-1)  # each [B, T, D]
        window = torch.cat([state, b * xx], dim=1)  # [B, kernel-1+T, D]: the state is the left padding
        state.copy_(window[:, -(self.kernel - 1):])
        # the depthwise conv as kernel shifted products, time-major: conv1d on a one-step window is a slow
        # path on CPU (~20 ms per layer), and this needs no transposes
        taps = self.conv.weight[:, 0]  # [D, kernel]
        wf = window.float()  # summed in fp32 and rounded once, as conv1d accumulates
        y = sum(wf[:, j:j + t] * taps[:, j] for j in range(self.kernel))  # [B, T, D]
        return self.out_proj(c * y.type_as(x))


class Attention(nn.Module):
    """GQA attention, per-head RMSNorm on q and k before RoPE (keys lfm.layers.N.self_attn.*)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.q_layernorm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.k_layernorm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos, mask, row: int = 0) -> torch.Tensor:  # x [B, T, D]
        bsz, t, _ = x.shape
        q = self.q_layernorm(self.q_proj(x).view(bsz, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_layernorm(self.k_proj(x).view(bsz, t, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(bsz, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope_rotate_half(q, cos, sin), rope_rotate_half(k, cos, sin)
        return self.out_proj(attend(q, k, v, self.kv_cache, input_pos, mask, row))


class LFM2Block(nn.Module):
    def __init__(self, cfg: Config, layer_type: str):
        super().__init__()
        if layer_type == "conv":
            self.conv = ShortConv(cfg.dim, cfg.conv_kernel)
        else:
            self.self_attn = Attention(cfg)
        self.operator_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ff_dim)

    def forward(self, x, cos, sin, input_pos, mask, row: int = 0) -> torch.Tensor:
        h = self.operator_norm(x)
        if hasattr(self, "conv"):
            h = self.conv(h, self.conv.state[row:row + x.shape[0]])  # this batch's rows of the conv states
        else:
            h = self.self_attn(h, cos, sin, input_pos, mask, row)
        h = x + h
        return h + self.feed_forward(self.ffn_norm(h))


class LFM2(nn.Module):
    """The LFM2 backbone on input embeddings; returns hidden states after the final norm (`embedding_norm`)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(LFM2Block(cfg, t) for t in cfg.layer_types)
        self.embedding_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        for name in ("rope_cos", "rope_sin", "positions"):  # made by setup_caches
            self.register_buffer(name, None, persistent=False)
        self.max_seq_len = self.batch = 0
        self.cached: list = []  # per cache row, what it holds: a Chat.positions() key per position (generate)

    def setup_caches(self, max_seq_len: int, batch: int = 1):
        w = self.embed_tokens.weight
        head_dim = self.cfg.dim // self.cfg.n_heads
        # the official loader casts the whole model, RoPE inverse frequencies included, to the model dtype;
        # cos/sin are then computed in fp32 from those rounded values and cast back
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        inv_freq = inv_freq.to(w.dtype).float().to(w.device)
        freqs = torch.arange(max_seq_len, device=w.device).float()[:, None] * inv_freq  # [S, hd/2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [S, hd]
        self.rope_cos, self.rope_sin = angles.cos().to(w.dtype), angles.sin().to(w.dtype)
        self.positions = torch.arange(max_seq_len, device=w.device)
        for layer in self.layers:
            if hasattr(layer, "conv"):
                layer.conv.state = w.new_zeros(batch, self.cfg.conv_kernel - 1, self.cfg.dim)
            else:
                layer.self_attn.kv_cache = KVCache(self.cfg.n_kv_heads, max_seq_len, head_dim, w.dtype, w.device,
                                                   batch)
        self.max_seq_len, self.batch = max_seq_len, batch
        self.cached = [[] for _ in range(batch)]

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, row: int = 0) -> torch.Tensor:
        """x [B, T, D] of the sequences in cache rows row .. row+B-1 -> [B, T, D]. T > 1: consecutive positions
        input_pos [T] of one row, causal within, attending to every cached position before them; conv states
        carry on from the previous call (`reset` before position 0). T == 1, a decode step, one position per row
        (input_pos [B, 1]), masks the caches up to the furthest row; compiled, the whole static cache: fixed
        shapes."""
        if x.shape[1] == 1:
            input_pos = input_pos.view(-1, 1)  # [B, 1] ([1, 1]: the same for every row)
            # eager reads no further than the furthest row has written (a host sync: free on a CPU, and generate
            # syncs once a step anyway), rather than the whole static length
            end = self.max_seq_len if torch.compiler.is_compiling() else int(input_pos.max()) + 1
            mask = self.positions[:end] <= input_pos  # [B, end]
            cos, sin = self.rope_cos[input_pos][:, None], self.rope_sin[input_pos][:, None]  # [B, 1, 1, hd]
        else:  # a chunk reads the cache only up to its own end (a host sync; prefill is eager)
            mask = self.positions[:int(input_pos[-1]) + 1] <= input_pos[:, None]  # [T, end]
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [T, hd]
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask, row)
        return self.embedding_norm(x)

    def reset(self, row: int = 0):
        """Start a new sequence in cache row `row`: its conv states back to zero (the KV cache needs no reset,
        it is masked)."""
        self.cached[row] = []
        for layer in self.layers:
            if hasattr(layer, "conv"):
                layer.conv.state[row].zero_()


# ---- depthformer (keys depthformer.*) ----

def rope_interleaved(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """The depthformer's RoPE: adjacent pairs (x0, x1), (x2, x3), ... as complex numbers times `rot`, in fp32,
    as the official code does. x [B, H, T, hd], rot [hd/2] complex64."""
    return torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * rot).flatten(-2).type_as(x)


class QKNorm(nn.Module):
    """Per-head q/k RMSNorms; a module of its own only because the checkpoint nests them here."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.q_layernorm = RMSNorm(head_dim, NORM_EPS, weight_in_fp32=True)
        self.k_layernorm = RMSNorm(head_dim, NORM_EPS, weight_in_fp32=True)


class DepthAttention(nn.Module):
    """Fused-qkv GQA attention (32 heads, 8 KV heads), per-head q/k norm, interleaved RoPE."""

    def __init__(self, dim: int):
        super().__init__()
        self.head_dim = dim // DEPTH_HEADS
        self.qkv_proj = nn.Linear(dim, dim + 2 * DEPTH_KV_HEADS * self.head_dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.bounded_attention = QKNorm(self.head_dim)
        self.kv_cache: KVCache | None = None

    def forward(self, x, rot, step: int) -> torch.Tensor:  # x [B, 1, dim] of codebook `step`
        kv_width = DEPTH_KV_HEADS * self.head_dim
        q, k, v = self.qkv_proj(x).split([x.shape[-1], kv_width, kv_width], dim=-1)
        q = self.bounded_attention.q_layernorm(q.unflatten(-1, (DEPTH_HEADS, self.head_dim))).transpose(1, 2)
        k = self.bounded_attention.k_layernorm(k.unflatten(-1, (DEPTH_KV_HEADS, self.head_dim))).transpose(1, 2)
        q, k = rope_interleaved(q, rot), rope_interleaved(k, rot)  # [B, H or KV, 1, hd]
        ck, cv = self.kv_cache.k[:x.shape[0]], self.kv_cache.v[:x.shape[0]]  # this batch's rows [B, KV, 8, hd]
        ck[:, :, step], cv[:, :, step] = k[:, :, 0], v.unflatten(-1, (DEPTH_KV_HEADS, self.head_dim))[:, 0]
        # the steps so far, unmasked, through SDPA: the official computation (and its fp32 accumulation in bf16)
        y = F.scaled_dot_product_attention(q, ck[:, :, :step + 1], cv[:, :, :step + 1], enable_gqa=True)
        return self.out_proj(y.transpose(1, 2).flatten(2))


class DepthBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.operator = DepthAttention(dim)
        self.operator_norm = RMSNorm(dim, NORM_EPS, weight_in_fp32=True)
        self.ffn_norm = RMSNorm(dim, NORM_EPS, weight_in_fp32=True)
        self.feed_forward = FeedForward(dim, swiglu_width(4 * dim))

    def forward(self, x, rot, step: int) -> torch.Tensor:  # x [B, 1, dim] fp32, the residual stream
        dtype = self.ffn_norm.weight.dtype  # the branches run in the model's dtype, their inputs rounded once
        h = x + self.operator(self.operator_norm(x).to(dtype), rot, step).float()
        return h + self.feed_forward(self.ffn_norm(h).to(dtype)).float()


class Depthformer(nn.Module):
    """Small transformer run once per codebook of an audio frame: position k of its own 8-step cache."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(DepthBlock(cfg.depth_dim) for _ in range(cfg.depth_layers))
        self.codebooks = cfg.codebooks
        self.register_buffer("rope", None, persistent=False)  # made by setup_caches

    def setup_caches(self, batch: int = 1):
        w = self.layers[0].operator_norm.weight  # the model's dtype and device (the linears may be int8)
        head_dim = self.layers[0].operator.head_dim
        # fp32 whatever the model dtype: the official table is complex64 and is not cast with the model
        inv_freq = 1.0 / (DEPTH_ROPE_THETA ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.arange(self.codebooks).float()[:, None] * inv_freq  # [8, hd/2]
        self.rope = torch.polar(torch.ones_like(angles), angles).to(w.device)  # [8, hd/2] complex64
        for layer in self.layers:
            layer.operator.kv_cache = KVCache(DEPTH_KV_HEADS, self.codebooks, head_dim, w.dtype, w.device, batch)

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """x [B, 1, dim] for codebook k -> [B, 1, dim] fp32; attends to the cache's steps 0..k, so no reset is
        needed. The residual stream stays fp32 whatever the model dtype (the official one rounds it to the model
        dtype after every branch: in bf16 that is most of the audio codes' error; it is 1024 wide, so the
        casts cost nothing next to the weights)."""
        x = x.float()
        for layer in self.layers:
            x = layer(x, self.rope[k], k)
        return x  # no final norm: each codebook's head has its own


class SharedEmbedding(nn.Module):
    """An embedding table plus the norm and projection that turn a hidden state into logits over it."""

    def __init__(self, dim: int, vocab: int, tie: bool):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.embedding_norm = RMSNorm(dim, NORM_EPS, weight_in_fp32=True)
        self.to_logits = nn.Linear(dim, vocab, bias=False)
        self.tie = tie
        self.tie_weights()

    def tie_weights(self):
        if self.tie:
            self.to_logits.weight = self.embedding.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] (fp32 from the depthformer) -> logits [..., vocab]: normed in fp32, rounded once to the
        model dtype for the projection. Where that is coarser than fp32 (a bf16 model, int8 heads) the best
        ones are recomputed from the float weights (`exact_top`): int8 heads are copies of the tied table."""
        normed = self.embedding_norm(x)
        logits = self.to_logits(normed.to(self.embedding_norm.weight.dtype))
        if isinstance(self.to_logits, nn.Linear):
            return logits if logits.dtype == torch.float32 else exact_top(logits, self.to_logits.weight, normed)
        return exact_top(logits, self.embedding.weight, normed) if self.tie else logits


EXACT_TOP = 8  # logits recomputed exactly per row: greedy's choice and the top of any sampling are among them


def exact_top(logits: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """logits [..., V] ~ x [..., K] @ weight [V, K].T computed coarser (in bf16, or from int8 weights) -> fp32
    logits, the EXACT_TOP largest recomputed in fp32 from those rows of `weight`. A bf16 logit is rounded to 8
    significant bits (up to 0.03 near 8), an int8 weight's error is larger still: more than many margins between
    the two best. The rows cost EXACT_TOP * K weight reads."""
    top = logits.topk(EXACT_TOP, -1).indices  # [..., R]
    exact = (weight[top].float() @ x.float()[..., None])[..., 0]  # [..., R, K] @ [..., K, 1] -> [..., R]
    return logits.float().scatter(-1, top, exact)


# ---- sampling ----

def sample(logits: torch.Tensor, temperature: float | None = None, top_k: int | None = None) -> torch.Tensor:
    """logits [..., V] -> ids [..., 1], each row on its own. Greedy when temperature is None/<= 0 or top_k == 1;
    else temperature, top-k mask, softmax, multinomial (the official order, so seeded draws agree)."""
    if temperature is None or temperature <= 0 or top_k == 1:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(logits.softmax(-1), 1)


# ---- chat prompt ----

class Chat:
    """A conversation in the official prompt layout: `<|startoftext|>`, then per turn
    `<|im_start|>{role}\\n` + content + `<|im_end|>\\n`. Positions are text ids, audio-in clips (one position
    per encoder frame) or audio-out frames (8 codes), in order; `modality` holds one flag per position."""

    def __init__(self, tokenizer: Tokenizer, mel_dtype: torch.dtype = torch.bfloat16):
        self.tokenizer = tokenizer
        # the official ChatState stores mel features in its dtype, bf16 unless told otherwise, whatever the
        # model's dtype; rounding them the same way keeps the two pipelines equal
        self.mel_dtype = mel_dtype
        self.text: list[int] = []  # ids of the TEXT positions
        self.mels: list[torch.Tensor] = []  # log-mel [128, n] of each audio-in clip
        self.frames: list[torch.Tensor] = []  # codes [8] of each AUDIO_OUT position
        self.modality: list[int] = []
        self.turns: list[tuple[int, str]] = []  # (first position, role) of each turn
        self.add_text("<|startoftext|>")

    def __len__(self) -> int:
        return len(self.modality)

    def add_text(self, text: str):
        ids = self.tokenizer.encode(text)
        self.text += ids
        self.modality += [TEXT] * len(ids)

    def add_audio(self, wave: torch.Tensor, sample_rate: int):
        """A mono recording [T] at any rate, heard by the model through the conformer encoder."""
        if wave.dim() != 1 or wave.numel() == 0:
            raise ValueError(f"audio must be a non-empty mono wave [T], got shape {tuple(wave.shape)}")
        mel = conformer.audio_features(wave.float(), sample_rate)
        self.mels.append(mel.to(self.mel_dtype))
        self.modality += [AUDIO_IN] * conformer.emb_len(mel.shape[1])

    def new_turn(self, role: str):
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"role must be system, user or assistant, got {role!r}")
        self.turns.append((len(self), role))
        self.add_text(f"<|im_start|>{role}\n")

    def end_turn(self):
        self.add_text("<|im_end|>\n")

    def append(self, items):
        """Add generated ("text", id) / ("audio", codes [8]) items to the history, as the official demo does
        with ChatState.append (end-of-audio frames included)."""
        for kind, value in items:
            if kind == "text":
                self.text.append(int(value))
                self.modality.append(TEXT)
            else:
                self.frames.append(torch.as_tensor(value).long().flatten().cpu())
                self.modality.append(AUDIO_OUT)

    def positions(self) -> list:
        """One key per position, equal exactly when two positions' inputs are: a text id, an audio-out frame's
        8 codes, or (a fingerprint of the audio-in clip's features, the frame's index in it). The model's caches
        record the keys of what they hold, so a history edited in any way is noticed."""
        def clip_keys(mel):
            digest = hashlib.sha1(mel.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest()
            return ((str(mel.dtype), digest, j) for j in range(conformer.emb_len(mel.shape[1])))
        keys = {TEXT: iter(self.text), AUDIO_OUT: (tuple(f.tolist()) for f in self.frames),
                AUDIO_IN: (key for mel in self.mels for key in clip_keys(mel))}
        return [next(keys[flag]) for flag in self.modality]

    def drop_oldest_exchange(self) -> int:
        """Forget the oldest user turn and the turns after it up to the next user turn (its answers); the
        system turn stays. Returns the number of positions dropped: 0 when only the latest user turn is left.
        The model's caches no longer match what follows: the next generate prefills the whole chat again."""
        users = [start for start, role in self.turns if role == "user"]
        if len(users) < 2:
            return 0
        a, b = users[0], users[1]
        before, gone = self.modality[:a], self.modality[a:b]
        for flag, items in ((TEXT, self.text), (AUDIO_OUT, self.frames)):
            del items[before.count(flag):before.count(flag) + gone.count(flag)]
        # a clip lies within one turn: the clips that end within [a, b) go whole
        ends = list(itertools.accumulate(conformer.emb_len(m.shape[1]) for m in self.mels))  # in audio-in positions
        n_in = before.count(AUDIO_IN)
        del self.mels[sum(e <= n_in for e in ends):sum(e <= n_in + gone.count(AUDIO_IN) for e in ends)]
        del self.modality[a:b]
        self.turns = [(start - (b - a) * (start >= b), role) for start, role in self.turns if not a <= start < b]
        return b - a


# ---- the model ----

class LFM2Audio(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        enc = conformer.EncoderConfig.from_dict(cfg.encoder)
        self.lfm = LFM2(cfg)
        self.conformer = conformer.ConformerEncoder(enc)
        self.audio_adapter = conformer.AudioAdapter(enc.d_model, cfg.dim)
        # audio-out frames are embedded through this table; its norm and to_logits are training leftovers
        # that the checkpoint carries
        self.audio_embedding = SharedEmbedding(cfg.dim, AUDIO_VOCAB * cfg.codebooks, cfg.tie_audio_embeddings)
        self.register_buffer("codebook_offsets", torch.arange(cfg.codebooks) * AUDIO_VOCAB)
        self.register_buffer("audio_loss_weights", torch.ones(cfg.codebooks))  # training only; in the file
        self.depth_linear = nn.Linear(cfg.dim, cfg.codebooks * cfg.depth_dim)
        self.depthformer = Depthformer(cfg)
        self.depth_embeddings = nn.ModuleList(
            SharedEmbedding(cfg.depth_dim, AUDIO_VOCAB, cfg.depth_tie) for _ in range(cfg.codebooks))
        self.tokenizer: Tokenizer | None = None  # set by from_pretrained
        self.compiled: str | None = None  # the torch.compile mode of the decode path, set by compile_decode()

    # -- loading --

    @classmethod
    def from_pretrained(cls, repo_id_or_path: str | Path, device="cpu", dtype=torch.float32,
                        max_seq_len: int = 4096, compile: bool = False, quantize: str | None = None
                        ) -> "LFM2Audio":
        """Load a checkpoint folder, or a Hugging Face repo id (downloads only the files needed; honours
        HF_HUB_OFFLINE), cast to `dtype` on `device`, with caches for `max_seq_len` positions; `compile`:
        see `compile_decode()`; `quantize="int8"`: see `load_int8`."""
        folder = checkpoint_folder(repo_id_or_path)
        cfg = Config.from_file(folder / "config.json")
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: model weights not found")
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        # built on the meta device, then allocated uninitialised: every tensor is overwritten by the load,
        # and random init of 1.5B parameters would take longer than the load itself
        with torch.device("meta"):
            model = cls(cfg)
        if quantize:
            model = load_int8(model.to(dtype=dtype), weights, device)
        else:
            model = model.to(dtype=dtype).to_empty(device=device)
            for m in model.modules():  # moving off meta made separate copies of tied weights
                if isinstance(m, SharedEmbedding):
                    m.tie_weights()
            try:
                state = load_file(str(weights), device=str(device))
            except SafetensorError as e:  # the reader's message does not name the file
                raise ValueError(f"{weights}: unreadable safetensors file ({e})") from None
            model.load_checkpoint(state, name=str(weights))
        tok = folder / "tokenizer.json"
        if not tok.is_file():
            raise FileNotFoundError(f"{tok}: text tokenizer not found")
        model.tokenizer = Tokenizer.from_file(tok)
        model.setup_caches(max_seq_len)
        model.eval()
        return model.compile_decode() if compile else model

    def load_checkpoint(self, state: dict[str, torch.Tensor], name: str = "checkpoint"):
        """Strict load of a checkpoint state dict. A tied weight may be stored once or twice. Missing,
        unexpected or mis-shaped tensors are reported by name in one ValueError."""
        expected = self.state_dict()
        state = dict(state)
        for a, b in self._tied_pairs():  # safetensors stores a shared tensor under one of its names
            if a in state and b not in state:
                state[b] = state[a]
            elif b in state and a not in state:
                state[a] = state[b]
        check_state_dict(expected, state, name)
        self.load_state_dict(state, strict=True)

    def _tied_pairs(self) -> list[tuple[str, str]]:
        embeddings = [("audio_embedding", self.audio_embedding)] + [
            (f"depth_embeddings.{k}", e) for k, e in enumerate(self.depth_embeddings)]
        return [(f"{n}.embedding.weight", f"{n}.to_logits.weight") for n, e in embeddings if e.tie]

    def setup_caches(self, max_seq_len: int, batch: int = 1):
        """Allocate the static caches, a row per sequence of a batch: the backbone's for `max_seq_len` positions,
        the depthformer's 8 steps."""
        self.lfm.setup_caches(max_seq_len, batch)
        self.depthformer.setup_caches(batch)

    # -- prompt embedding --

    def embed_audio_out(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [8, N] -> [N, D]: the sum over codebooks k of audio_embedding[code_k + 2049 k]."""
        return self.audio_embedding.embedding(codes + self.codebook_offsets[:, None]).sum(0)

    def embed_audio_in(self, mels: list[torch.Tensor]) -> torch.Tensor:
        """log-mel clips [128, n_i] -> [sum_i ceil(n_i / 8), D]: batched through the encoder, then the adapter."""
        dev, dt = self.embed_tokens_weight.device, self.embed_tokens_weight.dtype
        batch, lengths = conformer.pad_mels(mels)
        h, out_lengths = self.conformer(batch.to(device=dev, dtype=dt), lengths.to(dev))  # [B, T', d]
        frames = torch.cat([h[b, :n] for b, n in enumerate(out_lengths.tolist())])
        return self.audio_adapter(frames)

    @property
    def embed_tokens_weight(self) -> torch.Tensor:
        return self.lfm.embed_tokens.weight

    def embed_prompt(self, chat: Chat, start: int = 0) -> torch.Tensor:
        """The chat's positions from `start` on -> input embeddings [1, L - start, D]; only the audio clips that
        reach past `start` go through the encoder."""
        w = self.embed_tokens_weight
        before = chat.modality[:start]
        flags = torch.tensor(chat.modality[start:], device=w.device)
        x = w.new_empty(len(flags), w.shape[1])
        ids = chat.text[before.count(TEXT):]
        x[flags == TEXT] = self.lfm.embed_tokens(torch.tensor(ids, dtype=torch.long, device=w.device))
        mels, skip = chat.mels, before.count(AUDIO_IN)  # skip: audio-in positions before start
        while mels and conformer.emb_len(mels[0].shape[1]) <= skip:
            skip, mels = skip - conformer.emb_len(mels[0].shape[1]), mels[1:]
        if mels:
            x[flags == AUDIO_IN] = self.embed_audio_in(mels)[skip:]
        frames = chat.frames[before.count(AUDIO_OUT):]
        if frames:
            x[flags == AUDIO_OUT] = self.embed_audio_out(torch.stack(frames, 1).to(w.device))
        return x[None]

    # -- the two steps of the backbone --

    def prefill(self, x: torch.Tensor, start: int = 0, row: int = 0) -> torch.Tensor:
        """Embeddings [1, L, D] of positions start .. start+L-1 -> the last one's hidden state [D]; fills cache
        row `row`, the other rows untouched. start 0 begins a new sequence, else the row must hold the positions
        before `start`. Runs in chunks of PREFILL_CHUNK positions, so memory stays bounded however long the
        prompt."""
        if start == 0:
            self.lfm.reset(row)
        self.lfm.cached[row] = []  # the caches change under the record: generate sets it again
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        for i in range(0, x.shape[1], PREFILL_CHUNK):
            h = self.lfm(x[:, i:i + PREFILL_CHUNK], positions[i:i + PREFILL_CHUNK], row)
        return h[0, -1]

    def cached_prefix(self, keys: list, row: int = 0) -> int:
        """How many of a chat's first positions (`keys`: its Chat.positions()) the backbone caches hold, to be
        prefilled no more: every cached position must be the chat's, in order, and at least one position new
        (the last one's hidden state is where generation starts). 0: prefill the whole chat."""
        held = self.lfm.cached[row]
        return len(held) if len(held) < len(keys) and keys[:len(held)] == held else 0

    def decode_one(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """One embedding per row [B, 1, D] at positions input_pos [B, 1] -> hidden states [B, D]. Fixed shapes:
        compilable. On a CPU the step reads the weights once whatever B: a batch costs little more than one."""
        return self.lfm(x, input_pos)[:, -1]

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens_weight  # tied to the input embedding
        if hasattr(self, "text_head"):  # an int8 copy of w (quantize)
            return exact_top(self.text_head(h), w, h)
        logits = F.linear(h, w)
        return logits if logits.dtype == torch.float32 else exact_top(logits, w, h)

    # -- one generated item, on the device: sampled ids and the next input embedding, no host sync --

    def text_step(self, h: torch.Tensor, temperature: float | None, top_k: int | None):
        """Hidden states [B, D] (or [D]) -> (tokens [B, 1] (or [1]), their embeddings [B, 1, D])."""
        token = sample(self.text_logits(h), temperature, top_k)
        return token, self.lfm.embed_tokens(token).view(-1, 1, h.shape[-1])

    def audio_step(self, h: torch.Tensor, temperature: float | None, top_k: int | None):
        """Hidden states [B, D] (or [D]) -> (frames [B, 8] (or [8]), their embeddings [B, 1, D]). The depthformer
        runs once per codebook, its input the frame's projection plus the embedding of the previous codebook's
        code. A frame whose codebook 0 is the end of audio becomes all end-of-audio codes (as the official loop
        does), without a host sync."""
        hb = h.view(-1, h.shape[-1])  # [B, D]
        d = self.depth_linear(hb).view(hb.shape[0], self.cfg.codebooks, -1)  # [B, 8, depth_dim]
        prev, codes = torch.zeros_like(d[:, 0]), []
        for k, head in enumerate(self.depth_embeddings):
            y = self.depthformer((d[:, k] + prev)[:, None], k)[:, 0]  # [B, depth_dim]
            codes.append(sample(head.logits(y), temperature, top_k))  # [B, 1]
            prev = head.embedding(codes[-1])[:, 0]
        frame = torch.cat(codes, dim=1)  # [B, 8]
        frame = torch.where(frame[:, :1] == END_OF_AUDIO, END_OF_AUDIO, frame)
        return frame.view(*h.shape[:-1], -1), self.embed_audio_out(frame.T)[:, None]

    def compile_decode(self, mode: str | None = None) -> "LFM2Audio":
        """Compile the decode path with torch.compile: the backbone step over the static caches, and each
        head (text token; a whole audio frame: 8 depthformer passes and their sampling). Prefill stays eager
        (its length varies). `mode` defaults to "reduce-overhead" on CUDA (CUDA graphs) and the default
        elsewhere. Sampling settings are constants of the graph: each setting compiles once."""
        import torch._inductor.config

        # process-wide: inductor otherwise draws random numbers with its own generator, so seeded sampling
        # would differ from eager (and from the official package)
        torch._inductor.config.fallback_random = True
        # fused kernels round their intermediates to the model dtype where eager does: in bf16 the compiled path
        # then keeps eager's greedy items far longer (tiny checkpoint, 2 x 96 steps: 177 leading items equal
        # against 59); what still differs is the order of a few reductions (softmax), not arithmetic
        torch._inductor.config.emulate_precision_casts = True
        cuda = self.embed_tokens_weight.is_cuda
        # on a CPU, a C++ wrapper calls the ~600 kernels of an audio frame with less overhead than Python: the
        # 8 depthformer passes of an int8 frame 37 -> 27 ms. Built apart from the kernels, it compiles ~3x faster.
        torch._inductor.config.cpp_wrapper = torch._inductor.config.cpp_wrapper_build_separate = not cuda
        if mode is None:
            mode = "reduce-overhead" if cuda else "default"
        for name in ("decode_one", "text_step", "audio_step"):  # instance attributes shadow the methods
            setattr(self, name, torch.compile(getattr(type(self), name).__get__(self), mode=mode, fullgraph=True))
        self.compiled = mode
        return self

    def begin_step(self):
        """Call before each decode step's heads and backbone step. With CUDA graphs, one step is one graph
        generation: its outputs stay readable within the step, and the next step's replays may overwrite them."""
        if self.compiled == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    # -- generation --

    @torch.no_grad()
    def generate(self, chat: Chat, mode: str = "interleaved", max_new_tokens: int = 512,
                 text_temperature: float | None = None, text_top_k: int | None = None,
                 audio_temperature: float | None = None, audio_top_k: int | None = None
                 ) -> Iterator[tuple[str, object]]:
        """Yield ("text", id) and ("audio", codes LongTensor[8]) as they are produced, by the rules of `mode`
        (see `Modality`); `max_new_tokens` counts backbone steps, as the official generate_interleaved /
        generate_sequential do. A prefill, then one loop of one item per step; each item costs one host sync
        (reading the id, or codebook 0, to choose what comes next); sampling and the next input embedding stay
        on the device.

        The backbone's caches outlive the call: they hold the prompt and every generated item fed back (all but
        the last). A chat that continues that history (its answer appended, a new turn added) prefills only its
        new positions; any other chat (edited, reset, or last run on another model) is prefilled whole."""
        for _, item, _ in self._generate([chat], mode, max_new_tokens, 1, text_temperature, text_top_k,
                                         audio_temperature, audio_top_k):
            if item is not None:
                yield item

    @torch.no_grad()
    def generate_batch(self, chats: list[Chat], mode: str = "interleaved", max_new_tokens: int = 512,
                       batch_size: int = 8, text_temperature: float | None = None, text_top_k: int | None = None,
                       audio_temperature: float | None = None, audio_top_k: int | None = None
                       ) -> Iterator[tuple[int, list]]:
        """Several chats decoded together, up to `batch_size` at once: yield (i, the items of chats[i]) as each
        answer ends, so in the order they end (`dict(model.generate_batch(chats))` collects them). Each chat's
        answer is generate()'s (greedy: item for item; sampled: from other draws): every chat has its own
        positions and stops on its own, and a chat that ends frees its cache row for the next one."""
        answers = {}
        for i, item, over in self._generate(chats, mode, max_new_tokens, batch_size, text_temperature,
                                            text_top_k, audio_temperature, audio_top_k):
            if item is not None:
                answers.setdefault(i, []).append(item)
            if over:
                yield i, answers.pop(i, [])

    def _generate(self, chats, mode, max_new_tokens, batch_size, text_temperature, text_top_k, audio_temperature,
                  audio_top_k) -> Iterator[tuple[int, tuple | None, bool]]:
        """The loop of generate and generate_batch: yields (chat index, item or None when not yielded, the
        answer is over) per running chat per step. Up to `batch_size` chats run at once, a cache row each: a
        row whose chat is over takes the next chat (prefilled alone, the others wait), the others go on. A step
        is one backbone pass over all rows, then the text head and/or the depthformer over all rows (a row
        that is over computes along, unused: fixed shapes), then one host sync for all."""
        if self.lfm.max_seq_len == 0:
            raise ValueError("caches not set up: call setup_caches(max_seq_len) first")
        for chat in chats:
            if len(chat) + max_new_tokens > self.lfm.max_seq_len:
                raise ValueError(f"prompt of {len(chat)} positions + {max_new_tokens} new tokens exceeds the "
                                 f"context of {self.lfm.max_seq_len} (raise max_seq_len)")
        n_rows = min(batch_size, len(chats))
        if self.lfm.batch < n_rows:
            self.setup_caches(self.lfm.max_seq_len, n_rows)
        w = self.embed_tokens_weight
        h = w.new_zeros(n_rows, w.shape[1])  # [B, D]: each row's last hidden state
        pos = torch.zeros(n_rows, 1, dtype=torch.long, device=w.device)  # [B, 1]: where each row's next input goes
        rows: list[_Row | None] = [None] * n_rows
        queue = iter(enumerate(chats))
        while True:
            for r in range(n_rows):  # free rows take the next chats
                if rows[r] is None and (job := next(queue, None)) is not None:
                    i, chat = job
                    keys = chat.positions()
                    start = self.cached_prefix(keys, r)
                    h[r] = self.prefill(self.embed_prompt(chat, start), start, r)
                    self.lfm.cached[r] = keys
                    pos[r] = len(chat)
                    turn = Modality(mode, self.cfg.interleaved_n_text, self.cfg.interleaved_n_audio)
                    rows[r] = _Row(i, turn, max_new_tokens, keys)
            live = [r for r in range(n_rows) if rows[r] is not None]
            if not live:
                return
            self.begin_step()
            text = [rows[r] is None or rows[r].turn.text for r in range(n_rows)]  # rows that are over: either
            if any(text[r] for r in live):
                tokens, x = self.text_step(h, text_temperature, text_top_k)
                tokens = tokens[:, 0].tolist()  # the host sync of this step
            if not all(text[r] for r in live):
                frames, xa = self.audio_step(h, audio_temperature, audio_top_k)
                codes = frames.tolist()  # the host sync of this step (codebook 0 decides what comes next)
                x = xa if all(not text[r] for r in live) else torch.where(
                    torch.tensor(text, device=w.device)[:, None, None], x, xa)
            for r in live:
                row = rows[r]
                if text[r]:
                    item, row.fed = ("text", tokens[r]), tokens[r]
                else:  # the caller keeps the frame; a graph replay would overwrite it
                    item, row.fed = ("audio", frames[r].clone()), tuple(codes[r])
                emit, done = row.turn.next(item[0], row.fed)
                row.left -= 1
                yield row.i, item if emit else None, done or not row.left
                if done or not row.left:
                    rows[r] = None
            running = [rows[r] is not None for r in range(n_rows)]
            if any(running):
                # the step writes every row: a row that is over no longer matches its record, nor does a row cut
                # half-way through the step
                for r in range(n_rows):
                    self.lfm.cached[r] = []
                # a copy: with CUDA graphs the output belongs to the graph, and the next step (a new graph
                # generation, see begin_step) may overwrite it before its heads read it
                h = self.decode_one(x, pos).clone()
                pos += torch.tensor(running, device=w.device)[:, None]
                for r in range(n_rows):
                    if running[r]:
                        rows[r].keys.append(rows[r].fed)
                        self.lfm.cached[r] = rows[r].keys


@dataclass
class _Row:
    """A chat being answered in a cache row of `LFM2Audio._generate`."""

    i: int  # its index in the chats
    turn: "Modality"
    left: int  # backbone steps left
    keys: list  # Chat.positions() keys of what its cache row holds
    fed: object = None  # the key of its latest item, which the next step feeds back


class Modality:
    """Which head runs next and when the turn ends, by the official rules. interleaved (chat): runs of 6 text
    tokens and 12 audio frames; <|text_end|> ends text for good; an end-of-audio frame switches to text;
    <|im_end|> ends the turn, not yielded. sequential (ASR, TTS): text until <|audio_start|>, then audio until
    an end-of-audio frame; <|im_end|> is yielded and ends the turn."""

    def __init__(self, mode: str, n_text: int, n_audio: int):
        if mode not in ("interleaved", "sequential"):
            raise ValueError(f"mode must be 'interleaved' or 'sequential', got {mode!r}")
        self.interleaved, self.n_text, self.n_audio = mode == "interleaved", n_text, n_audio
        self.text, self.left, self.text_done = True, n_text, False  # left: items of the current run

    def next(self, kind: str, value) -> tuple[bool, bool]:
        """After a generated item: (yield it, the turn is over)."""
        self.left -= 1
        if kind == "text" and value == IM_END:
            return not self.interleaved, True
        if kind == "audio":
            if self.interleaved and not self.left and not self.text_done:
                self.text, self.left = True, self.n_text
            self.text = self.text or bool(value[0] == END_OF_AUDIO)  # codebook 0 decides (then all are 2048)
        elif not self.interleaved:
            self.text = value != AUDIO_START
        else:
            self.text_done = self.text_done or value == TEXT_END
            if not self.left or self.text_done:
                self.text, self.left = False, self.n_audio
        return True, False


def is_end_of_audio(frame: torch.Tensor) -> bool:
    """Whether an audio frame [8] is a signal to the model, not sound: the end-of-audio code in any codebook.
    Decoders have no code 2048: such a frame is never decoded (as in the official demo), but stays in the chat."""
    return bool((frame == END_OF_AUDIO).any())


def respond(model: LFM2Audio, chat: Chat, vocoder=None, mode: str = "interleaved", decode_frames: int = 1,
            **generate_kw) -> Iterator[tuple[str, object, torch.Tensor | None]]:
    """The assistant's turn along the whole data path, streamed: yields the items as they are generated,
    ("text", id, None) and ("audio", codes [8], None), and with a vocoder the sound as it is decoded,
    ("wave", None, wave [n] at 24 kHz). The answer's first frame is decoded at once (the first audio), later
    ones `decode_frames` at a time (on a CPU a decoder call costs less per frame the more frames it takes: the
    decoder's weights are read once per call), and pending frames at the next item that is not sound; last
    comes what the decoder held back (the LFM2 detokenizer's last 480 samples; nothing for Mimi).

      wav [T] -> 16 kHz -> log-mel [128, n = 1 + T/160]           Chat.add_audio
      log-mel -> conformer [n/8, 512] -> adapter [n/8, 2048]     embed_prompt (text ids -> embed_tokens)
      prompt [1, L, 2048] -> LFM2 -> h [2048] per item            prefill, then decode_one
      h -> text logits -> id | depthformer x 8 -> codes [8]       text_step | audio_step
      codes [1, 8, t] -> decoder, streaming -> wave [1920 t]      vocoder.decode_step (Mimi, Detokenizer)"""
    if decode_frames < 1:
        raise ValueError(f"decode_frames must be >= 1, got {decode_frames}")
    stream = vocoder.new_stream(1, decode_frames) if vocoder is not None else None
    pending, first = [], True  # frames waiting for the decoder; whether none was decoded yet

    def decoded():  # the pending frames' sound
        return "wave", None, vocoder.decode_step(torch.stack(pending, -1)[None], stream)[0, 0]

    for kind, value in model.generate(chat, mode, **generate_kw):
        yield kind, value, None
        sound = stream is not None and kind == "audio" and not is_end_of_audio(value)
        if sound:
            pending.append(value)
        if pending and (not sound or first or len(pending) == decode_frames):
            yield decoded()
            pending, first = [], False
    if stream is not None:
        if pending:
            yield decoded()
        if (tail := vocoder.flush(stream)[0, 0]).numel():
            yield "wave", None, tail


def checkpoint_folder(repo_id_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id, fetched (only the files the model needs) into
    the hub cache. With HF_HUB_OFFLINE=1 only the cache is used."""
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
        raise FileNotFoundError(f"{name}: could not get the checkpoint from Hugging Face "
                                f"({type(e).__name__}: {e})") from None


# ---- int8 weight-only quantization (from_pretrained(..., quantize="int8")) ----
# gpt-fast's scheme: symmetric int8 weights, one scale per output channel, activations left as they are.
# Decoding reads every weight once per step, so a quarter of fp32's bytes is the whole speed-up.

INT8_ROWS = 4096  # rows quantized at a time: the fp32 temporaries of a 65536-row table would be ~1 GB


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int8, scales [N] fp32) with w ~= q * scales[:, None]; +-127, so that
    -w quantizes to -q."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], device=w.device)
    for i in range(0, w.shape[0], INT8_ROWS):
        rows = w[i:i + INT8_ROWS].float()
        s = rows.abs().amax(1).clamp(min=1e-12) / 127  # an all-zero row gets zeros, not NaNs
        q[i:i + INT8_ROWS] = torch.round(rows / s[:, None]).clamp(-127, 127)
        scales[i:i + INT8_ROWS] = s
    return q, scales


FOLD_K = (2048, 4096)  # on the CPU, int8 rows of K in [2048, 4096) bytes are stored in pairs (see Int8Linear)
FOLD_MAX_ROWS = 16  # inputs of up to this many rows multiply folded weights directly (see Int8Linear)


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scales (+ bias), q int8 [N, K], one scale per output channel.

    On the CPU: the int8 kernel `_weight_int8pack_mm` with bf16 activations (with fp32 ones it runs ~6x slower).
    It is bound by how fast each core streams weight rows, and it streams rows of 4 KB ~1.3x faster than rows of
    2 KB, so with `fold` 2 the rows are stored in pairs, `weight` [N/2, 2K]: row i beside row N/2 + i. An input x
    [M, K] of a few rows (decoding) multiplies them as block_diag(x, x) [2M, 2K], whose two row blocks are the
    two halves of y (the zeros cost little next to the reads: 1.02 against 1.27 ms for 8192x2048, one row);
    a longer one (a prefill chunk) multiplies an unfolded copy. Elsewhere: dequantize-then-matmul, which
    torch.compile fuses into one kernel."""

    def __init__(self, out_features: int, in_features: int, scale_dtype: torch.dtype,
                 bias: torch.Tensor | None = None, fold: int = 1):
        super().__init__()
        self.fold = fold
        self.register_buffer("weight", torch.empty(out_features // fold, fold * in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=scale_dtype))
        self.register_buffer("unit", None, persistent=False)  # folded: the kernel's own scales, ones [N/2]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def load_float(self, w: torch.Tensor):
        """Quantize float weights w [N, K] into this layer."""
        q, scales = int8_per_channel(w)
        self.weight.copy_(q.view(self.fold, -1, q.shape[1]).transpose(0, 1).reshape(self.weight.shape))
        self.scales.copy_(scales)
        if self.fold > 1:
            self.unit = self.scales.new_ones(self.weight.shape[0])

    def unfolded(self) -> torch.Tensor:
        """q int8 [N, K] (a copy when folded)."""
        return self.weight.view(self.weight.shape[0], self.fold, -1).transpose(0, 1).flatten(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N]
        if not self.weight.is_cpu:
            y = F.linear(x, self.unfolded().to(x.dtype)) * self.scales
            return y if self.bias is None else y + self.bias
        # ~300 calls per audio frame: the casts are skipped when they would be no-ops (a bf16 model)
        x2 = x.reshape(-1, x.shape[-1])  # the kernel takes 2-D input only
        if x.dtype != self.scales.dtype:
            x2 = x2.to(self.scales.dtype)
        m = x2.shape[0]
        if self.fold == 1 or m > FOLD_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.unfolded().contiguous(), self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(torch.block_diag(x2, x2), self.weight, self.unit)  # [2M, N/2]
            y = y.view(2, m, -1).transpose(0, 1).reshape(m, -1) * self.scales
        y = y.view(*x.shape[:-1], -1)
        if self.bias is not None:
            y = y + self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)


def quantize(model: LFM2Audio, device) -> LFM2Audio:
    """Swap the linear layers decoding reads (backbone blocks, depth_linear, depthformer, codebook heads) for
    Int8Linear, quantizing their weights (on the meta device: only the shapes), and add `text_head`, an int8
    copy of the tied text logits; laid out for `device`. The embeddings, norms, encoder and adapter stay as
    they are."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}".lstrip(".")
            if isinstance(child, nn.Linear) and full.startswith(("lfm.layers.", "depth")):
                setattr(parent, name, _int8_from(child.weight, child.bias, device))
    model.text_head = _int8_from(model.embed_tokens_weight, None, device)
    return model


def _int8_from(weight: torch.Tensor, bias: torch.Tensor | None, device) -> Int8Linear:
    """An Int8Linear for `weight` [N, K] to run on `device`: on the CPU, bf16 scales (the kernel's) and rows of
    K in FOLD_K folded; elsewhere scales in the weight's dtype."""
    cpu = torch.device(device).type == "cpu"
    fold = 2 if cpu and FOLD_K[0] <= weight.shape[1] < FOLD_K[1] and weight.shape[0] % 2 == 0 else 1
    with torch.device(weight.device):
        layer = Int8Linear(*weight.shape, torch.bfloat16 if cpu else weight.dtype, bias, fold)
    if weight.device.type != "meta":
        with torch.no_grad():
            layer.load_float(weight)
    return layer


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64}


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a safetensors file, one tensor at a time, in file order, read with plain reads: a
    memory map (as safetensors' own reader uses) would leave the whole file in this process's RSS."""
    with open(path, "rb") as f:
        try:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            entries = sorted((v["data_offsets"][0], k, v) for k, v in header.items() if k != "__metadata__")
            for begin, name, v in entries:
                end = v["data_offsets"][1]
                buf = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(8 + n + begin)
                if f.readinto(buf.numpy()) != end - begin:
                    raise ValueError("truncated")
                yield name, buf.view(SAFETENSORS_DTYPES[v["dtype"]]).view(v["shape"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:  # bad header, unknown dtype, short file
            raise ValueError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None


def load_int8(model: LFM2Audio, weights: Path, device) -> LFM2Audio:
    """`model` (float, on the meta device) filled from the safetensors file `weights`, its decode linears
    quantized to int8 (`quantize`) as each tensor is read: peak memory is the int8 model plus one float tensor
    (about 2 GB for the 1.5B model in bf16, where reading the whole file first would take 3 GB more).
    On the CPU the int8 matmuls run with bf16 activations whatever the model dtype (see Int8Linear)."""
    device = torch.device(device)
    try:
        with safe_open(str(weights), framework="pt") as f:  # the header only
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except SafetensorError as e:  # the reader's message does not name the file
        raise ValueError(f"{weights}: unreadable safetensors file ({e})") from None
    # names and shapes checked as a plain load checks them, with meta tensors: nothing is read yet
    model.load_checkpoint({k: torch.empty(shape, device="meta") for k, shape in shapes.items()}, name=str(weights))
    sources = {k: k for k in model.state_dict()}  # each tensor of the model -> its name in the file
    for a, b in model._tied_pairs():  # a tied pair may be stored once
        sources[a] = sources[b] = a if a in shapes else b
    sources["text_head.weight"] = sources["lfm.embed_tokens.weight"]
    targets = {}  # name in the file -> the model tensors it fills
    for target, source in sources.items():
        targets.setdefault(source, []).append(target)
    model = quantize(model, device).to_empty(device=device)
    for m in model.modules():  # tied weights left float (none by default) were copied apart by to_empty
        if isinstance(m, SharedEmbedding) and isinstance(m.to_logits, nn.Linear):
            m.tie_weights()
    with torch.no_grad():
        for name, tensor in read_safetensors(weights):
            tensor = tensor.to(device)
            for target in targets.get(name, []):
                owner, _, attr = target.rpartition(".")
                module = model.get_submodule(owner)
                if isinstance(module, Int8Linear) and attr == "weight":
                    module.load_float(tensor)
                else:
                    getattr(module, attr).copy_(tensor)
    return model
