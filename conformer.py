"""Audio in: waveform -> log-mel -> FastConformer encoder -> adapter -> LFM2 input embeddings.

    wave, sr = load_audio("question.wav")         # float32 [T], native rate, channels averaged
    mel = audio_features(wave, sr)                # [128, 1 + T16k // 160] (resampled to 16 kHz)
    mels, lengths = pad_mels([mel])               # [B, 128, T], [B]
    h, h_lengths = encoder(mels, lengths)         # [B, ceil(T / 8), 512], ceil(lengths / 8)
    emb = adapter(h)                              # [B, T', 2048]; the first h_lengths[b] rows are clip b

Equal to the official liquid-audio 1.3.0 path (ChatState.add_audio -> NeMo mel featurizer in eval mode ->
ConformerEncoder -> audio_adapter MLP). Parameter names equal the checkpoint keys under `conformer.` and
`audio_adapter.`, so loading is a plain `load_state_dict`. Inference only: no dropout, BatchNorm always
uses its running statistics.

Very short audio is accepted, as the official code accepts it: any clip of at least one sample gives
1 + T // 160 mel frames and ceil(frames / 8) >= 1 embedding. Below 320 samples (20 ms at 16 kHz) there are
fewer than two valid frames to normalise over and the mel is all zeros, exactly as in the official code.
"""

import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

# ---- audio constants (the mel front end of the checkpoint's `preprocessor` config) ----
SAMPLE_RATE = 16000  # the encoder's input rate
N_FFT = 512
HOP_LENGTH = 160  # 10 ms
WIN_LENGTH = 400  # 25 ms, a symmetric hann window zero-padded to N_FFT
N_MELS = 128
PREEMPHASIS = 0.97
LOG_GUARD = 2**-24  # added before the log so silence stays finite
NORM_EPS = 1e-5  # added to the per-band std
# resampler (torchaudio's defaults, which the official code uses)
RESAMPLE_WIDTH = 6  # zero crossings of the sinc on each side
RESAMPLE_ROLLOFF = 0.99  # cutoff as a fraction of the lower Nyquist frequency
RESAMPLE_MAX_KERNEL = 2**26  # filter weights (256 MB in float32); rates sharing no factor need far more
# attention scores of padded positions are set to this (not -inf), as in the official code
MASK_VALUE = -10000.0


# ---- loading and resampling ----

def load_audio(path) -> tuple[torch.Tensor, int]:
    """Read an audio file with soundfile -> (float32 mono wave [T], native sample rate).

    Integer PCM is scaled to [-1, 1) as soundfile does (int16 / 32768, ...). Multi-channel audio is averaged
    to mono, the usual downmix (the official code accepts only one channel).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [T, C]
    except (sf.SoundFileError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read audio ({e})") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise ValueError(f"{path}: audio file has no samples")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: audio has NaN or infinite samples")
    return torch.from_numpy(data).mean(dim=1), sr


def _sinc_kernel(orig: int, new: int, width: int, dtype, device) -> torch.Tensor:
    """Windowed-sinc filters for `orig` -> `new` (coprime): [new, 1, 2 * width + orig].

    Output sample j of each block of `new` lies at time j / new (in input periods / orig); filter j holds
    the lowpassed sinc centred there, sampled at the input times -width .. width + orig - 1.
    """
    cutoff = min(orig, new) * RESAMPLE_ROLLOFF
    times = torch.arange(-width, width + orig, dtype=dtype, device=device)[None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None] / new + times  # [new, K]
    t = (t * cutoff).clamp(-RESAMPLE_WIDTH, RESAMPLE_WIDTH)  # in zero crossings
    window = torch.cos(t * math.pi / RESAMPLE_WIDTH / 2) ** 2  # hann over the filter's span
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), t.sin() / t)
    return (sinc * (window * (cutoff / orig)))[:, None]


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited sinc resampling of wave [..., T] -> [..., about T * new_sr / orig_sr] (length rule below).

    Equal to torchaudio.functional.resample with its defaults (sinc_interp_hann, width 6, rolloff 0.99).
    """
    if int(orig_sr) != orig_sr or int(new_sr) != new_sr or orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} -> {new_sr}")
    if not wave.is_floating_point():
        raise ValueError(f"wave must be a float tensor, got {wave.dtype}")
    if orig_sr == new_sr:
        return wave
    gcd = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // gcd, int(new_sr) // gcd  # the filters repeat every `orig` input samples
    # lowpass below the lower Nyquist (anti-aliasing / imaging); `width` input samples needed each side
    width = math.ceil(RESAMPLE_WIDTH * orig / (min(orig, new) * RESAMPLE_ROLLOFF))
    if new * (2 * width + orig) > RESAMPLE_MAX_KERNEL:
        raise ValueError(f"cannot resample {int(orig_sr)} Hz -> {int(new_sr)} Hz: the rates share too small a "
                         f"factor and the filter bank would have {new * (2 * width + orig):,} weights; convert "
                         f"the file to a common rate (e.g. 16000 or 48000 Hz) first")
    kernel = _sinc_kernel(orig, new, width, wave.dtype, wave.device)
    shape, n = wave.shape, wave.shape[-1]
    x = F.pad(wave.reshape(-1, 1, n), (width, width + orig))  # [N, 1, T + pad]
    y = F.conv1d(x, kernel, stride=orig)  # [N, new, blocks]: output j of every block
    # torchaudio's length: ceil(new * T / orig) with the ratio rounded to float32 first. That drops one
    # sample when the exact value lies just above an integer (e.g. 200101 samples at 44.1 kHz give 72599,
    # not 72600); we keep its rule so the official chat state and ours see the same number of mel frames.
    n_out = math.ceil(np.float32(new * n / orig))
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, :n_out]
    return y.reshape(*shape[:-1], -1)


# ---- log-mel front end ----

@functools.lru_cache(maxsize=None)
def mel_filters() -> torch.Tensor:
    """Slaney-style mel filterbank, bit-equal to librosa.filters.mel(sr=16000, n_fft=512, n_mels=128): [128, 257].

    Every step rounds as librosa does, so the official float32 buffer is reproduced exactly: the grid and the
    triangles in float64, the triangles stored as float32, then scaled by the (float64) slaney norm and
    stored as float32 again. Rounding the product only once differs in the last bit of a few weights.
    """
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp  # 14.999999999999998 in float64, not 15: librosa computes it so

    def hz_to_mel(f):  # linear below 1 kHz, logarithmic above
        return f / f_sp if f < min_log_hz else min_log_mel + np.log(f / min_log_hz) / logstep

    def mel_to_hz(m):
        return np.where(m < min_log_mel, f_sp * m, min_log_hz * np.exp(logstep * (m - min_log_mel)))

    fft_hz = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)  # exactly k * 31.25, as numpy's rfftfreq
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))  # [130]
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0, np.minimum((fft_hz - lo) / (mid - lo), (hi - fft_hz) / (hi - mid))).astype(np.float32)
    return torch.from_numpy((tri * (2 / (hi - lo))).astype(np.float32))  # slaney norm: each band has unit area


@functools.lru_cache(maxsize=None)
def _window() -> torch.Tensor:
    # symmetric (periodic=False) hann of WIN_LENGTH, centred in N_FFT zeros, as the official featurizer
    pad = (N_FFT - WIN_LENGTH) // 2
    return F.pad(torch.hann_window(WIN_LENGTH, periodic=False), (pad, N_FFT - WIN_LENGTH - pad))


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """Normalised log-mel of a 16 kHz mono wave [T] -> [128, 1 + T // 160].

    Only the first T // 160 frames are valid (the last one would see the zero padding of the centred STFT);
    each band is normalised to zero mean / unit std over them and the rest are zeros. The official chat
    state keeps the trailing zero frame as encoder input, and so do we.
    """
    if wave.dim() != 1 or wave.numel() == 0:
        raise ValueError(f"wave must be a non-empty 1-D tensor [T], got shape {tuple(wave.shape)}")
    if not torch.isfinite(wave).all():
        raise ValueError("wave has NaN or infinite samples")
    x = wave.float()
    x = torch.cat([x[:1], x[1:] - PREEMPHASIS * x[:-1]])  # pre-emphasis boosts high frequencies
    spec = torch.stft(x, N_FFT, HOP_LENGTH, window=_window().to(x.device), center=True, pad_mode="constant",
                      return_complex=True)  # [257, 1 + T // 160]
    # power = |X|^2 taken as sqrt(re^2 + im^2)^2: the sqrt-then-square is not a no-op in float32, and this
    # order rounds exactly as the official featurizer does (|X| first, then mag_power 2); spec.abs() (a
    # hypot) or re^2 + im^2 alone differ by an ulp in many bins, and bf16 rounding later can make that a step.
    power = torch.view_as_real(spec).pow(2).sum(-1).sqrt().pow(2)
    mel = torch.log(mel_filters().to(x.device) @ power + LOG_GUARD)  # [128, frames]
    n = wave.numel() // HOP_LENGTH  # valid frames
    out = torch.zeros_like(mel)
    if n >= 2:  # with fewer the official normaliser gives exact zeros (its std is 0/0, masked to 0)
        # mean and unbiased std per band, spelled out (not Tensor.std) to round as the official code does
        v = mel[:, :n]
        m = v.sum(1, keepdim=True) / n
        s = torch.sqrt(((v - m) ** 2).sum(1, keepdim=True) / (n - 1)) + NORM_EPS
        out[:, :n] = (v - m) / s
    return out


def audio_features(wave: torch.Tensor, sr: int) -> torch.Tensor:
    """Mono wave [T] at any sample rate -> the encoder's log-mel input [128, frames] (as ChatState.add_audio)."""
    return log_mel(resample(wave, sr, SAMPLE_RATE))


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


def split_at_pauses(wave: torch.Tensor, sr: int, max_seconds: float = 30.0, smooth_seconds: float = 0.2
                    ) -> list[tuple[int, int]]:
    """Mono wave [T] -> spans (start, end) in samples that tile it, each at most `max_seconds` long, cut at the
    quietest point of the second half of each window (so chunks are at least max_seconds / 2, but the last).
    Quiet = the lowest mean energy over `smooth_seconds` around a 10 ms step: the middle of a short pause (in a
    long silence, as late as the limit allows), or the softest sound when there is no pause. Long audio has to be cut: the encoder's attention is quadratic in the
    clip's length and the model was trained on short clips."""
    hop, n = max(1, sr // 100), wave.numel()
    limit = max(1, int(max_seconds * sr) // hop)  # in steps
    if n <= limit * hop:
        return [(0, n)]
    power = F.pad(wave.double() ** 2, (0, -n % hop)).view(-1, hop).mean(1)  # [steps], per 10 ms
    width = max(1, int(smooth_seconds * sr) // hop)
    csum = F.pad(power.cumsum(0), (1, 0))
    lo = (torch.arange(power.numel()) - width // 2).clamp(0, power.numel())
    hi = (lo + width).clamp(max=power.numel())
    energy = (csum[hi] - csum[lo]) / (hi - lo)  # [steps], centred moving average
    spans, start = [], 0  # in steps
    while (n - start * hop) > limit * hop:
        window = energy[start + (limit + 1) // 2: start + limit + 1]
        cut = start + limit - int(window.flip(0).argmin())  # the last quietest step: long silences, long chunks
        spans.append((start * hop, cut * hop))
        start = cut
    return spans + [(start * hop, n)]


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
