"""Mimi decoder: 8 codebooks of audio codes at 12.5 Hz -> 24 kHz mono waveform.

Only the decoder half of Kyutai's Mimi codec (as shipped in `tokenizer-e351c8d8-checkpoint125.safetensors`):
codebook lookup -> 1x1 projection -> x2 transposed-conv upsample -> 8-layer causal transformer (250-step
window) -> SEANet decoder (x960 upsample). Every layer is causal, so decoding runs as a stream: the state
(conv left context, transposed-conv overlap, a fixed-size KV ring) is preallocated and updated in place,
and frame-by-frame decoding gives the same samples as decoding the whole sequence at once.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # samples per 80 ms frame (12.5 Hz)
N_CODEBOOKS = 8
CARDINALITY = 2048  # codes 0..2047; the LM's 2048 (end of audio) is not a Mimi code
WHOLE_PIECE_FRAMES = 125  # `decode` streams in pieces of 10 s: same samples, memory bounded by the piece

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class MimiConfig:
    n_codebooks: int = N_CODEBOOKS
    cardinality: int = CARDINALITY
    codebook_dim: int = 256
    dim: int = 512  # latent width = transformer width
    n_layers: int = 8
    n_heads: int = 8
    ffn_dim: int = 2048
    context: int = 250  # attention window in transformer steps (25 Hz, so 10 s)
    rope_max_period: float = 10000.0
    upsample: int = 2  # 12.5 Hz frames -> 25 Hz transformer steps
    n_filters: int = 64
    ratios: tuple = (8, 6, 5, 4)  # SEANet upsampling, 8*6*5*4 = 960 samples per step
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3


# ---- causal convolutions ------------------------------------------------------------------------------
# The official modules wrap each conv twice (a streaming wrapper and a norm wrapper), so the file's keys read
# `conv.conv.weight` / `convtr.convtr.weight`; the ModuleDicts below only reproduce that nesting.

class CausalConv1d(nn.Module):
    """Stride-1 conv padded on the left only; the cache holds the previous K-1 inputs (zeros at the start)."""

    def __init__(self, c_in: int, c_out: int, kernel: int):
        super().__init__()
        self.conv = nn.ModuleDict(dict(conv=nn.Conv1d(c_in, c_out, kernel)))

    def new_cache(self, batch_size: int) -> Tensor | None:
        conv = self.conv.conv
        if conv.kernel_size[0] == 1:
            return None
        return conv.weight.new_zeros(batch_size, conv.in_channels, conv.kernel_size[0] - 1)

    def forward(self, x: Tensor, cache: Tensor | None) -> Tensor:  # [B, C_in, T] -> [B, C_out, T]
        if cache is not None:
            x = torch.cat([cache, x], dim=-1)
            cache.copy_(x[..., x.shape[-1] - cache.shape[-1]:])
        return self.conv.conv(x)


class CausalConvTranspose1d(nn.Module):
    """Transposed conv with kernel 2*stride, trimmed on the right (causal). Each input step emits 2S samples:
    the first S form its own output block, the last S overlap the next step's block and wait in the cache.
    Written as one matmul plus that overlap-add (the weights stay in a ConvTranspose1d for their key): on CPU,
    torch's conv_transpose1d takes a slow path for short inputs (~40 ms for the 1024-channel layer)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int = 1, bias: bool = True):
        super().__init__()
        self.convtr = nn.ModuleDict(dict(convtr=nn.ConvTranspose1d(c_in, c_out, 2 * stride, stride,
                                                                   groups=groups, bias=bias)))

    def new_cache(self, batch_size: int) -> Tensor:
        convtr = self.convtr.convtr
        return convtr.weight.new_zeros(batch_size, convtr.out_channels, convtr.stride[0])

    def forward(self, x: Tensor, cache: Tensor) -> Tensor:  # [B, C_in, T] -> [B, C_out, T*S]; cache [B, C_out, S]
        convtr = self.convtr.convtr
        G, S = convtr.groups, convtr.stride[0]
        B, C_in, T = x.shape
        w = convtr.weight.view(G, C_in // G, -1)  # [G, C_in/G, C_out/G * 2S]
        taps = torch.einsum("bgit,gio->bgto", x.view(B, G, C_in // G, T), w)
        taps = taps.view(B, G, T, -1, 2, S).transpose(2, 3)  # [B, G, C_out/G, T, 2 halves, S]
        y = taps[..., 0, :].contiguous()  # [B, G, C_out/G, T, S]
        y[..., 1:, :] += taps[..., :-1, 1, :]
        y[..., 0, :] += cache.view(y[..., 0, :].shape)
        cache.copy_(taps[..., -1, 1, :].reshape(cache.shape))
        y = y.view(B, -1, T * S)
        return y if convtr.bias is None else y + convtr.bias[:, None]


class ResBlock(nn.Module):
    """SEANet residual unit: x + conv1x1(ELU(conv_k3(ELU(x)))), halving the width inside."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.block = nn.ModuleList([nn.ELU(), CausalConv1d(dim, dim // 2, kernel),
                                    nn.ELU(), CausalConv1d(dim // 2, dim, 1)])

    def new_cache(self, batch_size: int) -> Tensor | None:
        return self.block[1].new_cache(batch_size)

    def forward(self, x: Tensor, cache: Tensor | None) -> Tensor:
        h = self.block[1](self.block[0](x), cache)
        return x + self.block[3](self.block[2](h), None)


class SEANetDecoder(nn.Module):
    """conv k7 -> [ELU, transposed conv x r, ResBlock] for r in ratios -> ELU, conv k3 to one channel."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        width = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [CausalConv1d(cfg.dim, width, cfg.kernel_size)]
        for r in cfg.ratios:
            layers += [nn.ELU(), CausalConvTranspose1d(width, width // 2, r),
                       ResBlock(width // 2, cfg.residual_kernel_size)]
            width //= 2
        layers += [nn.ELU(), CausalConv1d(width, 1, cfg.last_kernel_size)]
        self.model = nn.ModuleList(layers)

    def new_cache(self, batch_size: int) -> list[Tensor | None]:
        return [layer.new_cache(batch_size) for layer in self.model if not isinstance(layer, nn.ELU)]

    def forward(self, x: Tensor, caches: list[Tensor | None]) -> Tensor:  # [B, dim, T] -> [B, 1, T*960]
        caches = iter(caches)
        for layer in self.model:
            x = layer(x) if isinstance(layer, nn.ELU) else layer(x, next(caches))
        return x


# ---- transformer --------------------------------------------------------------------------------------

def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the angles of their time step; in fp32 like the original.
    x [B, H, T, D], cos/sin [T, D/2]."""
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.dim, cfg.dim))  # q, k, v stacked, no bias
        self.out_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
        # x [B, T, dim]; kv [2, B, H, S, Dh] this layer's ring; slots [T] where this call's keys go; mask [T, S]
        B, T, dim = x.shape
        q, k, v = F.linear(x, self.in_proj_weight).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        kv[0].index_copy_(2, slots, apply_rope(k, cos, sin))
        kv[1].index_copy_(2, slots, v)
        y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), kv[0], kv[1], attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, dim))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x


class TransformerLayer(nn.Module):
    """Pre-norm block: x += s1 * attn(LN(x)); x += s2 * linear2(gelu(linear1(LN(x))))."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.linear1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.linear2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.layer_scale_1 = LayerScale(cfg.dim)
        self.layer_scale_2 = LayerScale(cfg.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), cos, sin, kv, slots, mask))
        return x + self.layer_scale_2(self.linear2(F.gelu(self.linear1(self.norm2(x)))))


class Transformer(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
        for layer, layer_kv in zip(self.layers, kv):  # kv [L, 2, B, H, S, Dh]
            x = layer(x, cos, sin, layer_kv, slots, mask)
        return x


# ---- codebooks ----------------------------------------------------------------------------------------

class Codebook(nn.Module):
    """Centroids are stored as EMA sums and counts; dividing gives the table (counts clamped at 1e-5, so a
    dead code stays finite, as in training)."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.register_buffer("embedding_sum", torch.zeros(cfg.cardinality, cfg.codebook_dim))
        self.register_buffer("cluster_usage", torch.ones(cfg.cardinality))

    def forward(self, codes: Tensor) -> Tensor:  # [B, T] -> [B, T, codebook_dim]
        return self.embedding_sum[codes] / self.cluster_usage[codes].clamp(min=1e-5)[..., None]


class VQLayer(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self._codebook = Codebook(cfg)


class ResidualVQ(nn.Module):
    """Sum of the codebook vectors (256-d), then a 1x1 projection to the latent width."""

    def __init__(self, cfg: MimiConfig, n_q: int):
        super().__init__()
        self.vq = nn.ModuleDict(dict(layers=nn.ModuleList(VQLayer(cfg) for _ in range(n_q))))
        self.output_proj = nn.Conv1d(cfg.codebook_dim, cfg.dim, 1, bias=False)

    def forward(self, codes: Tensor) -> Tensor:  # [B, n_q, T] -> [B, dim, T]
        emb = sum(layer._codebook(codes[:, i]) for i, layer in enumerate(self.vq.layers))
        return self.output_proj(emb.transpose(1, 2))


class SplitRVQ(nn.Module):
    """Codebook 0 (semantic) and codebooks 1.. (acoustic) have their own output projections."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.rvq_first = ResidualVQ(cfg, 1)
        self.rvq_rest = ResidualVQ(cfg, cfg.n_codebooks - 1)

    def forward(self, codes: Tensor) -> Tensor:  # [B, n_codebooks, T] -> [B, dim, T]
        return self.rvq_first(codes[:, :1]) + self.rvq_rest(codes[:, 1:])


# ---- the decoder --------------------------------------------------------------------------------------

@dataclass
class MimiStream:
    """What the decoder carries between calls. Preallocated by `Mimi.new_stream`, updated in place (never
    reallocated), so a decode step can be captured in a CUDA graph."""
    offset: Tensor  # [] long: transformer steps decoded so far (2 per frame)
    slot_pos: Tensor  # [S] long: the step held by each KV slot, -1 while empty
    kv: Tensor  # [L, 2, B, H, S, Dh] keys (after RoPE) and values, a ring indexed by step % S
    upsample: Tensor  # [B, dim, 2] overlap of the x2 transposed conv
    decoder: list  # SEANet conv left contexts and transposed-conv overlaps
    max_frames: int  # frames per internal step; S = context + 2*max_frames - 1

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]


class Mimi(nn.Module):
    def __init__(self, cfg: MimiConfig = MimiConfig()):
        super().__init__()
        self.cfg = cfg
        self.quantizer = SplitRVQ(cfg)
        # depthwise (groups = channels), no bias: the official "channel-wise" upsample
        self.upsample = nn.ModuleDict(dict(convtr=CausalConvTranspose1d(cfg.dim, cfg.dim, cfg.upsample,
                                                                         groups=cfg.dim, bias=False)))
        self.decoder_transformer = nn.ModuleDict(dict(transformer=Transformer(cfg)))
        self.decoder = SEANetDecoder(cfg)

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> "Mimi":
        """Load the decoder from the Mimi safetensors file; its encoder half and the codebooks past 8 are
        ignored. Attention may be stored as `in_proj_weight`/`out_proj.weight` or `in_projs.0.weight`/
        `out_projs.0.weight`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Mimi checkpoint not found")
        with torch.device("meta"):
            model = cls()
        expected = model.state_dict()
        state = {}
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = {_canonical_key(k): k for k in f.keys()}
                for key, ref in expected.items():
                    if key not in names:
                        raise ValueError(f"{path}: missing Mimi decoder tensor {key}")
                    t = f.get_tensor(names[key])
                    if t.shape != ref.shape:
                        raise ValueError(f"{path}: tensor {names[key]} has shape {tuple(t.shape)}, "
                                         f"expected {tuple(ref.shape)}")
                    state[key] = t.to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        model.load_state_dict(state, assign=True)
        return model.eval()

    def new_stream(self, batch_size: int = 1, max_frames: int = 1) -> MimiStream:
        """A fresh decoding state. Calls with more than `max_frames` frames are split internally; the KV
        ring holds context + 2*max_frames - 1 steps, just enough that the first step of a call still sees
        its full 250-step window."""
        if batch_size < 1 or max_frames < 1:
            raise ValueError(f"new_stream needs batch_size >= 1 and max_frames >= 1, got {batch_size}, {max_frames}")
        cfg = self.cfg
        w = self.decoder_transformer.transformer.layers[0].self_attn.in_proj_weight
        slots = cfg.context + cfg.upsample * max_frames - 1
        return MimiStream(
            offset=torch.zeros((), dtype=torch.long, device=w.device),
            slot_pos=torch.full((slots,), -1, dtype=torch.long, device=w.device),
            kv=w.new_zeros(cfg.n_layers, 2, batch_size, cfg.n_heads, slots, cfg.dim // cfg.n_heads),
            upsample=self.upsample.convtr.new_cache(batch_size),
            decoder=self.decoder.new_cache(batch_size),
            max_frames=max_frames,
        )

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, 8, T] (0..2047) -> waveform [B, 1, 1920*T] at 24 kHz."""
        check_codes(codes)
        stream = self.new_stream(codes.shape[0], max_frames=max(1, min(codes.shape[-1], WHOLE_PIECE_FRAMES)))
        return self._decode(codes, stream)

    @torch.no_grad()
    def decode_step(self, codes: Tensor, stream: MimiStream) -> Tensor:
        """Decode the next frames of a stream: codes [B, 8, t] -> [B, 1, 1920*t]. Concatenated outputs equal
        `decode` of the concatenated codes."""
        check_codes(codes)
        if codes.shape[0] != stream.batch_size:
            raise ValueError(f"codes batch size {codes.shape[0]} does not match the stream's {stream.batch_size}")
        return self._decode(codes, stream)

    def flush(self, stream: MimiStream) -> Tensor:
        """End a stream: nothing is held back (every layer is causal), so [B, 1, 0]; here for the interface
        run.py shares with the LFM2 detokenizer, whose inverse STFT needs a tail."""
        return stream.kv.new_zeros(stream.batch_size, 1, 0)

    def _decode(self, codes: Tensor, stream: MimiStream) -> Tensor:
        if codes.shape[-1] == 0:
            return stream.kv.new_zeros(codes.shape[0], 1, 0)
        codes = codes.to(device=stream.kv.device, dtype=torch.long)
        pieces = [self._decode_piece(c, stream) for c in codes.split(stream.max_frames, dim=-1)]
        return torch.cat(pieces, dim=-1)

    def _decode_piece(self, codes: Tensor, stream: MimiStream) -> Tensor:  # [B, 8, t] -> [B, 1, 1920*t]
        x = self.quantizer(codes)  # [B, dim, t]
        x = self.upsample.convtr(x, stream.upsample)  # [B, dim, T], T = 2t
        rope, slots, mask = self._advance_window(stream, x.shape[-1])
        x = self.decoder_transformer.transformer(x.transpose(1, 2), *rope, stream.kv, slots, mask)
        return self.decoder(x.transpose(1, 2), stream.decoder)

    def _advance_window(self, stream: MimiStream, T: int):
        """Claim ring slots for the next T steps and return RoPE (cos, sin) [T, Dh/2], the slots [T] and the
        mask [T, S]: step p sees the steps p-249..p that the ring holds."""
        cfg = self.cfg
        pos = stream.offset + torch.arange(T, device=stream.offset.device)  # [T] absolute steps
        slots = pos % stream.slot_pos.shape[0]
        stream.slot_pos.index_copy_(0, slots, pos)
        stream.offset += T
        delta = pos[:, None] - stream.slot_pos  # [T, S]
        mask = (stream.slot_pos >= 0) & (delta >= 0) & (delta < cfg.context)
        head_dim = cfg.dim // cfg.n_heads
        inv = -2 * math.log(cfg.rope_max_period) / head_dim
        freqs = torch.exp(torch.arange(head_dim // 2, device=pos.device) * inv)  # max_period^(-2i/Dh)
        angles = pos.float()[:, None] * freqs  # [T, Dh/2]
        return (angles.cos(), angles.sin()), slots, mask


def _canonical_key(key: str) -> str:
    """Both attention namings found in Mimi files -> ours (`in_proj_weight`, `out_proj.weight`)."""
    return key.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight") \
              .replace("self_attn.out_projs.0.weight", "self_attn.out_proj.weight")


def check_codes(codes: Tensor, who: str = "Mimi") -> None:
    """Codes a decoder can take: integers [batch, 8, frames] in 0..2047 (the LM's 2048 is no sound)."""
    if not isinstance(codes, Tensor):
        raise ValueError(f"{who} codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype not in _INT_DTYPES:
        raise ValueError(f"{who} codes must be integers, got dtype {codes.dtype}")
    if codes.ndim != 3 or codes.shape[1] != N_CODEBOOKS:
        raise ValueError(f"{who} codes must have shape [batch, {N_CODEBOOKS}, frames], got {list(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= CARDINALITY):
        raise ValueError(f"{who} codes must be in 0..{CARDINALITY - 1}, got values in "
                         f"{codes.min().item()}..{codes.max().item()} (2048 = end of audio is not decodable)")
