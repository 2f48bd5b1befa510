"""Audio in, after the mel front end (audio.py): FastConformer encoder -> adapter -> LFM2 input embeddings.

    mels, lengths = pad_mels([mel])               # [B, 128, T], [B]
    h, h_lengths = encoder(mels, lengths)         # [B, ceil(T / 8), 512], ceil(lengths / 8)
    emb = adapter(h)                              # [B, T', 2048]; the first h_lengths[b] rows are clip b

Equal to the official liquid-audio 1.3.0 path (ConformerEncoder -> audio_adapter MLP). Parameter names equal the
checkpoint keys under `conformer.` and `audio_adapter.`. Inference only: no dropout, BatchNorm always uses its
running statistics.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

N_MELS = 128
MASK_VALUE = -10000.0  # attention scores of padded positions are set to this (not -inf), as in the official code


def emb_len(n_mel_frames):
    """Number of LFM2 positions (encoder frames) for a clip of n mel frames: ceil(n / 8). Int or tensor."""
    return -(-n_mel_frames // 8)


def pad_mels(mels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mel clips [128, T_i] -> ([B, 128, max T_i] zero-padded, lengths [B] int64)."""
    lengths = torch.tensor([m.shape[1] for m in mels], dtype=torch.long)
    batch = mels[0].new_zeros(len(mels), N_MELS, int(lengths.max()))
    for b, m in enumerate(mels):
        batch[b, :, : m.shape[1]] = m
    return batch, lengths


# ---- FastConformer encoder ----

@dataclass
class EncoderConfig:
    feat_in: int = N_MELS
    n_layers: int = 17
    d_model: int = 512
    n_heads: int = 8
    ff_expansion_factor: int = 4
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    conv_kernel_size: int = 9

    # checkpoint settings that pick an architecture we do not build: the value we implement
    _FIXED = {"subsampling": "dw_striding", "self_attention_model": "rel_pos", "xscaling": False,
              "untie_biases": True, "conv_norm_type": "batch_norm", "causal_downsampling": False,
              "reduction": None, "conv_context_size": None, "att_context_size": [-1, -1]}

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        """From config.json's "encoder" dict; training-only keys (dropout, ...) are ignored."""
        for key, want in cls._FIXED.items():
            if key in d and d[key] != want:
                raise ValueError(f"encoder config: {key}={d[key]!r} is not supported (only {want!r})")
        # feat_out > 0 would add an output projection to that size; -1 (none) and d_model (the official
        # code then skips the projection too) both mean the encoder emits d_model features, which we build
        d_model = d.get("d_model", cls.d_model)
        if d.get("feat_out", -1) not in (-1, d_model):
            raise ValueError(f"encoder config: feat_out={d['feat_out']!r} is not supported (only -1 or {d_model})")
        cfg = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        if cfg.subsampling_factor < 2 or cfg.subsampling_factor & (cfg.subsampling_factor - 1):
            raise ValueError(f"encoder config: subsampling_factor={cfg.subsampling_factor} is not a power of 2")
        return cfg


def _time_mask(lengths: torch.Tensor, t: int) -> torch.Tensor:
    return torch.arange(t, device=lengths.device) < lengths[:, None]  # [B, t], True = valid


class ConvSubsampling(nn.Module):
    """x8 in time and frequency: Conv2d s2, then (depthwise s2, pointwise) twice, ReLU after each stage."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        c, layers = cfg.subsampling_conv_channels, []
        for i in range(int(math.log2(cfg.subsampling_factor))):
            if i == 0:
                layers += [nn.Conv2d(1, c, 3, stride=2, padding=1), nn.ReLU()]
            else:
                layers += [nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c), nn.Conv2d(c, c, 1), nn.ReLU()]
        self.conv = nn.Sequential(*layers)  # indices 0, 2, 3, 5, 6 hold weights, as in the checkpoint
        f = cfg.feat_in
        for _ in range(int(math.log2(cfg.subsampling_factor))):
            f = (f - 1) // 2 + 1
        self.out = nn.Linear(c * f, cfg.d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, T, F] -> [B, ceil(T / 8), d_model]. Padded time steps are zeroed after every conv, so a
        # clip's output does not depend on the padding its batch added (the 3x3 kernels reach across).
        x = x[:, None] * _time_mask(lengths, x.shape[1])[:, None, :, None]  # [B, 1, T, F]
        for layer in self.conv:
            x = layer(x)
            if isinstance(layer, nn.Conv2d):
                if layer.stride[0] > 1:
                    lengths = (lengths - 1) // 2 + 1  # k3 p1 s2: ceil(len / 2)
                x = x * _time_mask(lengths, x.shape[2])[:, None, :, None]
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)), lengths  # channel-major features


def rel_pos_emb(t: int, d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embeddings of the relative positions t-1, ..., -(t-1): [2t - 1, d]."""
    pos = torch.arange(t - 1, -t, -1, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d))
    pe = torch.zeros(2 * t - 1, d, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe.to(dtype)


class RelPositionMultiHeadAttention(nn.Module):
    """Transformer-XL attention: content term (q + u) k^T plus position term (q + v) p^T over distances."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d, self.h = cfg.d_model, cfg.n_heads
        self.d_k = d // self.h
        self.linear_q, self.linear_k, self.linear_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.linear_out = nn.Linear(d, d)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x [B, T, d], pos [2T - 1, d], mask [B, T, T] True where query or key is padding
        b, t, d = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)  # [B, H, T, dk]
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos).view(2 * t - 1, self.h, self.d_k).transpose(0, 1)  # [H, 2T - 1, dk]
        content = (q + self.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)  # [B, H, T, T]
        position = (q + self.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1)  # [B, H, T, 2T - 1]
        # position[..., i, j] scores distance t-1-j; key k is at distance i-k from query i, so column
        # t-1-i+k: row i is a window starting at column t-1-i, read with a stride one short of a row
        position = position.contiguous()
        position = position.as_strided((b, self.h, t, t), (self.h * t * (2 * t - 1), t * (2 * t - 1), 2 * t - 2, 1),
                                       position.storage_offset() + t - 1)
        scores = (content + position) / math.sqrt(self.d_k)
        mask = mask[:, None]
        attn = scores.masked_fill(mask, MASK_VALUE).softmax(-1).masked_fill(mask, 0.0)
        return self.linear_out((attn @ v).transpose(1, 2).reshape(b, t, d))


class ConformerFeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_model * cfg.ff_expansion_factor)
        self.linear2 = nn.Linear(cfg.d_model * cfg.ff_expansion_factor, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.silu(self.linear1(x)))


class ConformerConvolution(nn.Module):
    """Pointwise conv + GLU, depthwise conv over time (symmetric), BatchNorm, SiLU, pointwise conv."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d, k = cfg.d_model, cfg.conv_kernel_size
        self.pointwise_conv1 = nn.Conv1d(d, 2 * d, 1)
        self.depthwise_conv = nn.Conv1d(d, d, k, padding=(k - 1) // 2, groups=d)
        self.batch_norm = nn.BatchNorm1d(d)
        self.pointwise_conv2 = nn.Conv1d(d, d, 1)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        # x [B, T, d], pad_mask [B, T] True = padding (zeroed so it does not leak into the time conv)
        x = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)  # [B, d, T]
        x = self.depthwise_conv(x.masked_fill(pad_mask[:, None], 0.0))
        bn = self.batch_norm  # inference: always the running statistics, whatever .training says
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        return self.pointwise_conv2(F.silu(x)).transpose(1, 2)


class ConformerLayer(nn.Module):
    """Macaron block: half FF, self-attention, convolution, half FF (all pre-norm residual), final norm."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.norm_feed_forward1, self.feed_forward1 = nn.LayerNorm(d), ConformerFeedForward(cfg)
        self.norm_self_att, self.self_attn = nn.LayerNorm(d), RelPositionMultiHeadAttention(cfg)
        self.norm_conv, self.conv = nn.LayerNorm(d), ConformerConvolution(cfg)
        self.norm_feed_forward2, self.feed_forward2 = nn.LayerNorm(d), ConformerFeedForward(cfg)
        self.norm_out = nn.LayerNorm(d)

    def forward(self, x, pos, att_mask, pad_mask):
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        x = x + self.self_attn(self.norm_self_att(x), pos, att_mask)
        x = x + self.conv(self.norm_conv(x), pad_mask)
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x))
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_encode = ConvSubsampling(cfg)
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, 128, T] (clip b valid for t < lengths[b]) -> (h [B, ceil(T/8), d_model], out lengths [B])."""
        if mel.dim() != 3 or mel.shape[1] != self.cfg.feat_in or mel.shape[2] == 0:
            raise ValueError(f"mel must be [B, {self.cfg.feat_in}, T>0], got shape {tuple(mel.shape)}")
        if lengths is None:
            lengths = torch.full((mel.shape[0],), mel.shape[2], dtype=torch.long, device=mel.device)
        x, lengths = self.pre_encode(mel.transpose(1, 2), lengths.to(device=mel.device, dtype=torch.long))
        t = x.shape[1]
        valid = _time_mask(lengths, t)  # [B, T']
        att_mask = ~(valid[:, :, None] & valid[:, None, :])  # [B, T', T'] True = query or key is padding
        pos = rel_pos_emb(t, self.cfg.d_model, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, pos, att_mask, ~valid)
        return x, lengths


class AudioAdapter(nn.Module):
    """Encoder frames -> LFM2 embeddings: LayerNorm, Linear, GELU (erf), Linear (keys `model.0/1/3`)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.model = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
