"""LFM2-Audio-1.5B: config, the LFM2 backbone, the audio depthformer, the chat prompt and generation.

Module names equal the keys of the checkpoint's `model.safetensors`, so loading is a strict `load_state_dict`.
Decoding is gpt-fast's: static caches written at `input_pos` (KV for attention layers, the last two conv inputs
for conv layers, 8 steps for the depthformer), `prefill`, `decode_one` (one backbone step), `text_step` and
`audio_step` (one item, sampled on the device), and `generate`, one sequence's loop over them. Batched decoding
(batch.py), quantization (quantize.py), compiling (compiled.py) and the tasks (tasks.py) build on these pieces.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import audio
import conformer
from tokenizer import Tokenizer

TEXT, AUDIO_IN, AUDIO_OUT = 1, 2, 3  # modality flags of prompt positions (the official LFMModality values)
IM_END = 7  # <|im_end|>: the assistant's turn is over
AUDIO_START = 128  # <|audio_start|>: sequential mode switches to audio
TEXT_END = 130  # <|text_end|>: interleaved mode has no more text, audio only
AUDIO_VOCAB = 2049  # 2048 Mimi codes + end of audio
END_OF_AUDIO = 2048
DEPTH_HEADS, DEPTH_KV_HEADS = 32, 8  # the depthformer's attention shape: fixed in the official code
DEPTH_ROPE_THETA = 1e6
NORM_EPS = 1e-5  # the official depthformer and embedding norms
PREFILL_CHUNK = 512  # positions per prefill chunk: bounds the activations of a long prompt
EXACT_TOP = 8  # coarse logits: the best recomputed exactly per row (greedy's choice and any top-k's top)


def swiglu_width(ff_dim: int, multiplier: float | None = 1.0, multiple_of: int = 256) -> int:
    """The hidden width the official code derives from a nominal FF width: 2/3 of it, rounded up to 256."""
    width = int(2 * ff_dim / 3)
    if multiplier is not None:  # transformers rounds only inside this branch; so do we
        width = int(multiplier * width)
        width = multiple_of * ((width + multiple_of - 1) // multiple_of)
    return width


@dataclass
class Config:
    """What inference needs from config.json (LFM2 block, depthformer, interleave pattern); checkpoint.py reads it."""

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


# ---- shared blocks ----

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
    input_pos first; queries see the cache's first S' positions where `mask` [T, S'] (a prefill chunk of one
    row) or [B, S'] (a decode step, one position per row) is True."""
    k_all, v_all = kv_cache.update(input_pos, k, v, row)
    b, n_kv, s, hd = k_all.shape[0], k_all.shape[1], mask.shape[-1], k_all.shape[-1]
    k_all, v_all = k_all[:, :, :s], v_all[:, :, :s]
    if q.shape[2] > 1:
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2).flatten(2)
    # written out: CPU SDPA with a mask is far slower than these two small matmuls at a long cache; the query
    # heads of one KV head are grouped, so K/V are read once, not repeated
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
    The conv's last kernel-1 inputs (`state` [batch, kernel-1, D]) carry over from one call to the next."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.register_buffer("state", None, persistent=False)  # made by setup_caches

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:  # x [B, T, D], state [B, k-1, D]
        t = x.shape[1]
        b, c, xx = self.in_proj(x).chunk(3, dim=-1)  # each [B, T, D]
        window = torch.cat([state, b * xx], dim=1)  # [B, kernel-1+T, D]: the state is the left padding
        state.copy_(window[:, -(self.kernel - 1):])
        # the depthwise conv as shifted products, time-major: conv1d on a one-step window is a slow CPU path
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

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, row: int = 0) -> torch.Tensor:
        """x [B, T, D] of the sequences in cache rows row .. row+B-1 -> [B, T, D]. T > 1: consecutive positions
        input_pos [T] of one row, causal, attending to every cached position before them. T == 1: a decode
        step, one position per row (input_pos [B, 1]); compiled, it reads the whole static cache (fixed
        shapes), eager only up to the furthest row."""
        if x.shape[1] == 1:
            input_pos = input_pos.view(-1, 1)  # [B, 1] ([1, 1]: the same for every row)
            end = self.max_seq_len if torch.compiler.is_compiling() else int(input_pos.max()) + 1
            mask = self.positions[:end] <= input_pos  # [B, end]
            cos, sin = self.rope_cos[input_pos][:, None], self.rope_sin[input_pos][:, None]  # [B, 1, 1, hd]
        else:  # a chunk reads the cache only up to its own end
            mask = self.positions[:int(input_pos[-1]) + 1] <= input_pos[:, None]  # [T, end]
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [T, hd]
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask, row)
        return self.embedding_norm(x)

    def reset(self, row: int = 0):
        """Start a new sequence in cache row `row`: its conv states to zero (the KV cache is masked)."""
        for conv in (layer.conv for layer in self.layers if hasattr(layer, "conv")):
            conv.state[row].zero_()


# ---- depthformer (keys depthformer.*) ----

def rope_interleaved(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """The depthformer's RoPE: adjacent pairs (x0, x1), (x2, x3), ... as complex numbers times `rot`, in fp32,
    as the official code does. x [B, H, T, hd], rot [hd/2] complex64."""
    return torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * rot).flatten(-2).type_as(x)


class DepthAttention(nn.Module):
    """Fused-qkv GQA attention (32 heads, 8 KV heads), per-head q/k norm, interleaved RoPE."""

    def __init__(self, dim: int):
        super().__init__()
        self.head_dim = dim // DEPTH_HEADS
        self.qkv_proj = nn.Linear(dim, dim + 2 * DEPTH_KV_HEADS * self.head_dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.bounded_attention = nn.ModuleDict(dict(  # per-head q/k norms, nested as the checkpoint nests them
            q_layernorm=RMSNorm(self.head_dim, NORM_EPS, weight_in_fp32=True),
            k_layernorm=RMSNorm(self.head_dim, NORM_EPS, weight_in_fp32=True)))
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
        w = self.layers[0].operator_norm.weight  # the model's dtype and device (the linears may be quantized)
        head_dim = self.layers[0].operator.head_dim
        # fp32 whatever the model dtype: the official table is complex64 and is not cast with the model
        inv_freq = 1.0 / (DEPTH_ROPE_THETA ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.arange(self.codebooks).float()[:, None] * inv_freq  # [8, hd/2]
        self.rope = torch.polar(torch.ones_like(angles), angles).to(w.device)  # [8, hd/2] complex64
        for layer in self.layers:
            layer.operator.kv_cache = KVCache(DEPTH_KV_HEADS, self.codebooks, head_dim, w.dtype, w.device, batch)

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """x [B, 1, dim] for codebook k -> [B, 1, dim] fp32; attends to the cache's steps 0..k (no reset
        needed). The residual stream stays fp32 whatever the model dtype (the official one rounds it after
        every branch, most of the audio codes' error in bf16; 1024 wide, the casts cost nothing)."""
        x = x.float()
        for layer in self.layers:
            x = layer(x, self.rope[k], k)
        return x  # no final norm: each codebook's head has its own


# ---- logits and sampling ----

def exact_top(logits: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """logits [..., V] ~ x [..., K] @ weight [V, K].T computed coarser (bf16, or from quantized weights) -> fp32
    logits, the EXACT_TOP largest recomputed in fp32 from those rows of `weight`: a bf16 logit has 8 significant
    bits, coarser than many margins between the two best. Costs EXACT_TOP * K weight reads per row."""
    top = logits.topk(EXACT_TOP, -1).indices  # [..., R]
    exact = (weight[top].float() @ x.float()[..., None])[..., 0]  # [..., R, K] @ [..., K, 1] -> [..., R]
    return logits.float().scatter(-1, top, exact)


def head_logits(head: nn.Module, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [..., K] through a logits head over the float table [V, K] (the head holds the table, tied, or a
    quantized copy of it), x rounded to the table's dtype -> fp32 logits [..., V]; exact_top (from x as given)
    where the head is coarser than fp32."""
    logits = head(x.to(table.dtype))
    if logits.dtype == torch.float32 and head.weight.dtype == torch.float32:
        return logits  # the official computation, untouched
    return exact_top(logits, table, x)


class SharedEmbedding(nn.Module):
    """An embedding table plus the norm and projection that turn a hidden state into logits over it."""

    def __init__(self, dim: int, vocab: int, tie: bool):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.embedding_norm = RMSNorm(dim, NORM_EPS, weight_in_fp32=True)
        self.to_logits = nn.Linear(dim, vocab, bias=False)
        self.tie = tie

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] (fp32 from the depthformer) -> fp32 logits [..., vocab]: normed in fp32, rounded once
        to the model dtype for the projection."""
        normed = self.embedding_norm(x)
        return head_logits(self.to_logits, normed, self.embedding.weight if self.tie else self.to_logits.weight)


def sample(logits: torch.Tensor, temperature, top_k) -> torch.Tensor:
    """logits [B, V] -> ids [B, 1], each row on its own. One setting for all rows (greedy when temperature is
    None/<= 0 or top_k == 1, else temperature, top-k, softmax, multinomial: the official order, so seeded
    draws agree), or one per row as tensors [B, 1] (temperature 0: greedy; top_k 0: no top-k)."""
    if torch.is_tensor(temperature):
        greedy = logits.argmax(-1, keepdim=True)
        scaled = logits / torch.where(temperature > 0, temperature, 1.0)
        k = torch.where(top_k > 0, top_k, logits.shape[-1]).clamp(max=logits.shape[-1])
        kth = scaled.sort(-1, descending=True).values.gather(-1, k - 1)  # [B, 1]
        drawn = torch.multinomial(scaled.masked_fill(scaled < kth, -float("inf")).softmax(-1), 1)
        return torch.where(temperature > 0, drawn, greedy)
    if temperature is None or temperature <= 0 or top_k == 1:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(logits.softmax(-1), 1)


@dataclass(frozen=True)
class Sampling:
    """How a turn's items are drawn (see `sample`); the default is greedy."""

    text_temperature: float | None = None
    text_top_k: int | None = None
    audio_temperature: float | None = None
    audio_top_k: int | None = None


# ---- the chat prompt ----

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
        mel = audio.audio_features(wave.float(), sample_rate)
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


# ---- generation ----

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
        """After a generated item (a text id, or an audio frame's codebook 0): (yield it, the turn is over)."""
        self.left -= 1
        if kind == "text" and value == IM_END:
            return not self.interleaved, True
        if kind == "audio":
            if self.interleaved and not self.left and not self.text_done:
                self.text, self.left = True, self.n_text
            self.text = self.text or value == END_OF_AUDIO  # codebook 0 decides (then all are 2048)
        elif not self.interleaved:
            self.text = value != AUDIO_START
        else:
            self.text_done = self.text_done or value == TEXT_END
            if not self.left or self.text_done:
                self.text, self.left = False, self.n_audio
        return True, False


class LFM2Audio(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        enc = conformer.EncoderConfig.from_dict(cfg.encoder)
        self.lfm = LFM2(cfg)
        self.conformer = conformer.ConformerEncoder(enc)
        self.audio_adapter = conformer.AudioAdapter(enc.d_model, cfg.dim)
        # audio-out frames are embedded through this table; its norm and to_logits are training leftovers
        self.audio_embedding = SharedEmbedding(cfg.dim, AUDIO_VOCAB * cfg.codebooks, cfg.tie_audio_embeddings)
        self.register_buffer("codebook_offsets", torch.arange(cfg.codebooks) * AUDIO_VOCAB)
        self.register_buffer("audio_loss_weights", torch.ones(cfg.codebooks))  # training only; in the file
        self.depth_linear = nn.Linear(cfg.dim, cfg.codebooks * cfg.depth_dim)
        self.depthformer = Depthformer(cfg)
        self.depth_embeddings = nn.ModuleList(
            SharedEmbedding(cfg.depth_dim, AUDIO_VOCAB, cfg.depth_tie) for _ in range(cfg.codebooks))
        # the text logits, tied to lfm.embed_tokens (the file stores the table once; quantize.py swaps this)
        self.text_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.tokenizer: Tokenizer | None = None  # set by checkpoint.load
        self.prefills = 0  # prefills and cache setups so far: batch.py notices cache writes that are not its own

    @classmethod
    def from_pretrained(cls, folder: str | Path, device="cpu", dtype=torch.float32, max_seq_len: int = 4096,
                        quantize: str | None = None) -> "LFM2Audio":
        """A checkpoint folder or Hugging Face repo id, loaded on `device` in `dtype`, with caches for
        `max_seq_len` positions (checkpoint.load); `quantize` "int8" or "int4": quantize.py."""
        import checkpoint
        return checkpoint.load(folder, device, dtype, max_seq_len, quantize)

    def tied_pairs(self) -> list[tuple[str, str]]:
        """(name, name) of tensors that are one: the text head and the tied codebook tables."""
        embeddings = [("audio_embedding", self.audio_embedding)] + [
            (f"depth_embeddings.{k}", e) for k, e in enumerate(self.depth_embeddings)]
        return [("lfm.embed_tokens.weight", "text_head.weight")] + [
            (f"{n}.embedding.weight", f"{n}.to_logits.weight") for n, e in embeddings if e.tie]

    def tie_weights(self):
        for a, b in self.tied_pairs():
            owner, _, name = b.rpartition(".")
            if isinstance(getattr(self.get_submodule(owner), name), nn.Parameter):  # a quantized copy stays apart
                setattr(self.get_submodule(owner), name, self.get_parameter(a))

    def setup_caches(self, max_seq_len: int, batch: int = 1):
        """Static caches, a row per sequence: the backbone's for `max_seq_len` positions, the depthformer's 8."""
        self.lfm.setup_caches(max_seq_len, batch)
        self.depthformer.setup_caches(batch)
        self.prefills += 1

    # -- prompt embedding --

    def embed_audio_out(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [8, N] -> [N, D]: the sum over codebooks k of audio_embedding[code_k + 2049 k]."""
        return self.audio_embedding.embedding(codes + self.codebook_offsets[:, None]).sum(0)

    def embed_audio_in(self, mels: list[torch.Tensor]) -> torch.Tensor:
        """log-mel clips [128, n_i] -> [sum_i ceil(n_i / 8), D]: batched through the encoder, then the adapter."""
        w = self.lfm.embed_tokens.weight
        batch, lengths = conformer.pad_mels(mels)
        h, out_lengths = self.conformer(batch.to(device=w.device, dtype=w.dtype), lengths.to(w.device))
        return self.audio_adapter(torch.cat([h[b, :n] for b, n in enumerate(out_lengths.tolist())]))

    def embed_prompt(self, chat: Chat, start: int = 0) -> torch.Tensor:
        """The chat's positions from `start` on -> input embeddings [1, L - start, D]; only the audio clips that
        reach past `start` go through the encoder."""
        w = self.lfm.embed_tokens.weight
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

    # -- the steps: a prefill, a backbone step, one item of either head --

    def prefill(self, x: torch.Tensor, start: int = 0, row: int = 0) -> torch.Tensor:
        """Embeddings [1, L, D] of positions start .. start+L-1 -> the last one's hidden state [D], written to
        cache row `row` in chunks of PREFILL_CHUNK positions. start 0 begins a new sequence, else the row must
        hold the positions before `start`."""
        if start == 0:
            self.lfm.reset(row)
        self.prefills += 1
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        for i in range(0, x.shape[1], PREFILL_CHUNK):
            h = self.lfm(x[:, i:i + PREFILL_CHUNK], positions[i:i + PREFILL_CHUNK], row)
        return h[0, -1]

    def decode_one(self, x: torch.Tensor, input_pos: torch.Tensor, row: int = 0) -> torch.Tensor:
        """One embedding per row [B, 1, D] at positions input_pos [B, 1], for cache rows row .. row+B-1 -> hidden
        states [B, D]. Fixed shapes: compilable. Every row's weights are read once per step, whatever B."""
        return self.lfm(x, input_pos, row)[:, -1]

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        return head_logits(self.text_head, h, self.lfm.embed_tokens.weight)

    def text_step(self, h: torch.Tensor, temperature=None, top_k=None):
        """Hidden states [B, D] -> (tokens [B, 1], their embeddings [B, 1, D]), on the device."""
        token = sample(self.text_logits(h), temperature, top_k)
        return token, self.lfm.embed_tokens(token)

    def audio_step(self, h: torch.Tensor, temperature=None, top_k=None):
        """Hidden states [B, D] -> (frames [B, 8], their embeddings [B, 1, D]), on the device. The depthformer
        runs once per codebook, its input the frame's projection plus the previous codebook's code embedding.
        A frame whose codebook 0 is the end of audio becomes all end-of-audio codes, as the official loop does."""
        d = self.depth_linear(h).view(h.shape[0], self.cfg.codebooks, -1)  # [B, 8, depth_dim]
        prev, codes = torch.zeros_like(d[:, 0]), []
        for k, head in enumerate(self.depth_embeddings):
            y = self.depthformer((d[:, k] + prev)[:, None], k)[:, 0]  # [B, depth_dim]
            codes.append(sample(head.logits(y), temperature, top_k))  # [B, 1]
            prev = head.embedding(codes[-1])[:, 0]
        frame = torch.cat(codes, dim=1)  # [B, 8]
        frame = torch.where(frame[:, :1] == END_OF_AUDIO, END_OF_AUDIO, frame)
        return frame, self.embed_audio_out(frame.T)[:, None]

    def check_room(self, prompt_len: int, max_new_tokens: int):
        if prompt_len + max_new_tokens > self.lfm.max_seq_len:
            raise ValueError(f"prompt of {prompt_len} positions + {max_new_tokens} new tokens exceeds the context "
                             f"of {self.lfm.max_seq_len} (raise max_seq_len)")

    @torch.no_grad()
    def generate(self, chat: Chat, mode: str = "interleaved", max_new_tokens: int = 512,
                 sampling: Sampling = Sampling()) -> Iterator[tuple[str, object]]:
        """The assistant's turn for `chat`, yielded as it is generated: ("text", id) and ("audio", codes [8]),
        by the rules of `mode` (Modality). `max_new_tokens` counts backbone steps, as the official
        generate_interleaved / generate_sequential do. One sequence, prefilled whole into cache row 0; each
        step reads one value back to the host (the id, or codebook 0) to choose the next head."""
        self.check_room(len(chat), max_new_tokens)
        turn = Modality(mode, self.cfg.interleaved_n_text, self.cfg.interleaved_n_audio)
        h = self.prefill(self.embed_prompt(chat))[None]  # [1, D]
        pos = torch.tensor([[len(chat)]], device=h.device)  # [1, 1]: where the next input goes
        for step in range(max_new_tokens):
            if turn.text:
                token, x = self.text_step(h, sampling.text_temperature, sampling.text_top_k)
                item = "text", int(token)  # the host sync of this step
            else:
                frame, x = self.audio_step(h, sampling.audio_temperature, sampling.audio_top_k)
                item = "audio", frame[0]
            emit, done = turn.next(item[0], item[1] if item[0] == "text" else int(frame[0, 0]))
            if emit:
                yield item
            if done or step == max_new_tokens - 1:
                return
            h = self.decode_one(x, pos)
            pos += 1
