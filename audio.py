"""Sound in: reading audio files, resampling, and the log-mel front end the encoder hears.

    wave, sr = load_audio("question.wav")     # float32 mono [T] at its own rate (channels averaged)
    wave16 = resample(wave, sr, SAMPLE_RATE)  # torchaudio's sinc resampler, equal to it sample for sample
    mel = log_mel(wave16)                     # [128, 1 + T // 160], the official NeMo featurizer in eval mode

Very short audio is accepted, as the official code accepts it: any clip of at least one sample gives
1 + T // 160 mel frames. Below 320 samples there are fewer than two valid frames to normalise over and the mel is
all zeros, exactly as in the official code.
"""

import functools
import io
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

# the mel front end (the checkpoint's `preprocessor` config)
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


# ---- loading and resampling ----

def load_audio(source, name: str | None = None) -> tuple[torch.Tensor, int]:
    """An audio file (a path, or its bytes) in any format soundfile reads -> (float32 mono wave [T], its rate).

    Integer PCM is scaled to [-1, 1) as soundfile does (int16 / 32768, ...). Multi-channel audio is averaged
    to mono, the usual downmix (the official code accepts only one channel). `name` names bytes in errors.
    """
    path = name or ("audio" if isinstance(source, bytes) else Path(source))
    if not isinstance(source, bytes) and not Path(source).exists():
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        data, sr = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source), dtype="float32",
                           always_2d=True)  # [T, C]
    except (sf.SoundFileError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: cannot read audio ({' '.join(str(e).split())})") from None
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
