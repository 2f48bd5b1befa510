"""LFM2.5-Audio's audio detokenizer: 8 codebooks of audio codes at 12.5 Hz -> 24 kHz mono waveform.

The LFM2 vocoder in the checkpoint's `audio_detokenizer/` folder (official: `liquid_audio/detokenizer.py`):
mean of the 8 code embeddings -> x6 repeat in time (an 80 ms frame becomes 6 steps of 320 samples) -> an
8-layer LFM2 (gated short convs and attention over a 30-step sliding window, the blocks of lfm2audio.py) ->
a linear layer to a 641-bin log-magnitude and phase spectrum per step -> inverse STFT (n_fft 1280, hop 320)
with "same" padding.

Every layer is causal, so decoding streams: the state (conv inputs, the last 29 keys/values of each attention
layer, the inverse STFT's overlap-add tail) is preallocated and updated in place. The inverse STFT centres each
1280-sample window on its step, so a step's samples are final only once the next 1.5 steps have arrived: the
stream runs DELAY = 480 samples (20 ms) behind the codes. The first call returns 480 samples fewer than 1920 per
frame and `flush` returns those last 480, so a stream's concatenated output equals `decode` of all its codes.

    det = Detokenizer.from_folder(folder / "audio_detokenizer")
    wave = det.decode(codes)                                   # [B, 8, T] -> [B, 1, 1920 T]
    stream = det.new_stream(1)
    parts = [det.decode_step(c, stream) for c in chunks] + [det.flush(stream)]
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from checkpoint import check_state_dict, lfm2_config
from lfm2audio import Attention, Config, LFM2Block, RMSNorm, rope_rotate_half
from mimi import CARDINALITY, N_CODEBOOKS, check_codes

UPSAMPLE = 6  # spectrogram steps per 80 ms frame
N_FFT, HOP = 1280, 320
N_BINS = N_FFT // 2 + 1  # 641
FRAME_SIZE = UPSAMPLE * HOP  # 1920 samples per frame
DELAY = (N_FFT - HOP) // 2  # 480: the "same" padding, trimmed at both ends; the stream's lag in samples
WHOLE_PIECE_FRAMES = 125  # `decode` streams in pieces of 10 s: same samples, attention memory bounded


def config_from_dict(d: dict) -> tuple[Config, int]:
    """transformers' Lfm2Config dict (llama.cpp's layer names allowed) -> (the LFM2 block config, window)."""
    unknown = sorted(set(d.get("layer_types") or []) - {"conv", "sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"unknown layer types {unknown}")
    if d.get("conv_bias", False):
        raise ValueError("conv_bias true is not supported (LFM2's convolutions have no bias)")
    cfg = lfm2_config(d)
    # the official loader renames sliding_attention to full_attention, then masks every attention layer to
    # the window: both kinds are the same layer here
    cfg.layer_types = ["conv" if t == "conv" else "attention" for t in cfg.layer_types]
    return cfg, d.get("sliding_window") or 30


# ---- the LFM2 part, run on a batch with explicit state ------------------------------------------------

def window_attention(attn: Attention, x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor, mask: Tensor) -> Tensor:
    """lfm2audio's attention layer (same weights and math) over a sliding window. x [B, t, D]; kv [2, B, KV,
    W-1, hd] keys (after RoPE) and values of the W-1 steps before this call, replaced by the last W-1 of
    (them + these t); mask [t, W-1+t]."""
    B, t, _ = x.shape
    hd = attn.head_dim
    q = attn.q_layernorm(attn.q_proj(x).view(B, t, attn.n_heads, hd)).transpose(1, 2)  # [B, H, t, hd]
    k = attn.k_layernorm(attn.k_proj(x).view(B, t, attn.n_kv_heads, hd)).transpose(1, 2)  # [B, KV, t, hd]
    v = attn.v_proj(x).view(B, t, attn.n_kv_heads, hd).transpose(1, 2)
    q, k = rope_rotate_half(q, cos, sin), rope_rotate_half(k, cos, sin)
    keys, values = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)  # [B, KV, W-1+t, hd]
    kv[0].copy_(keys[:, :, -kv.shape[3]:])
    kv[1].copy_(values[:, :, -kv.shape[3]:])
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # [B, H, t, hd]
    return attn.out_proj(y.transpose(1, 2).flatten(2))


class Block(LFM2Block):
    """An LFM2 block as in lfm2audio.py (same modules, same keys), with the stream's state passed in."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, state: Tensor, mask: Tensor) -> Tensor:
        h = self.operator_norm(x)
        if hasattr(self, "conv"):
            h = self.conv(h, state)
        else:
            h = window_attention(self.self_attn, h, cos, sin, state, mask)
        h = x + h
        return h + self.feed_forward(self.ffn_norm(h))


class LFM2(nn.Module):
    """Keys lfm.*: transformers' Lfm2Model. `embed_tokens` is in the file but unused (inputs are embeddings)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, t) for t in cfg.layer_types)
        self.embedding_norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Embedding(nn.Module):
    """Keys emb.*: one table for all codebooks, row code_k + 2048 k; a frame is the mean of its 8 rows."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = nn.Embedding(N_CODEBOOKS * CARDINALITY, dim)

    def forward(self, codes: Tensor) -> Tensor:  # [B, 8, T] -> [B, T, dim]
        offsets = torch.arange(N_CODEBOOKS, device=codes.device)[:, None] * CARDINALITY
        return self.emb(codes + offsets).mean(1)


class ISTFT(nn.Module):
    """Keys istft.*: the analysis window (periodic Hann, stored in the file). The inverse real DFT of each step
    is one matmul with a basis built from that window (`make_basis`): real tensors only, so no backend needs
    complex or FFT support, and for 6 steps a frame a matmul costs about what an FFT does."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.ones(N_FFT))
        self.register_buffer("basis", None, persistent=False)  # [2 * N_BINS, N_FFT], made by make_basis

    def make_basis(self):
        """irfft(re + i im, N_FFT) * window == cat([re, im]) @ basis (norm "backward": 1/N; bins 1..N/2-1
        stand for their conjugates too, so count twice; the imaginary parts of bins 0 and N/2 drop out)."""
        f = torch.arange(N_BINS, dtype=torch.float64)[:, None]
        n = torch.arange(N_FFT, dtype=torch.float64)
        angle = 2 * math.pi * f * n / N_FFT  # [N_BINS, N_FFT]
        weight = torch.full((N_BINS, 1), 2.0, dtype=torch.float64)
        weight[0] = weight[-1] = 1.0
        w = self.window.double() * weight / N_FFT
        self.basis = torch.cat([angle.cos() * w, -angle.sin() * w]).float()

    def frames(self, spec: Tensor) -> Tensor:
        """spec [B, t, 2*N_BINS] (log-magnitude, phase) -> windowed frames [B, t, N_FFT], float32."""
        log_mag, phase = spec.float().chunk(2, dim=-1)
        mag = log_mag.exp()
        return torch.cat([mag * phase.cos(), mag * phase.sin()], dim=-1) @ self.basis


# ---- the detokenizer ----------------------------------------------------------------------------------

@dataclass
class DetokenizerStream:
    """What the detokenizer carries between calls, preallocated by `new_stream`, updated in place."""
    steps: int  # spectrogram steps decoded so far (6 per frame): the next step's RoPE position
    state: list  # per layer: conv inputs [B, kernel-1, D] or attention window [2, B, KV, W-1, hd]
    overlap: Tensor  # [B, N_FFT/HOP - 1, HOP] overlap-added samples past the finished ones, in hops
    envelope: Tensor  # [N_FFT/HOP - 1, HOP] the same for the squared window (the divisor)

    @property
    def batch_size(self) -> int:
        return self.overlap.shape[0]


class Detokenizer(nn.Module):
    def __init__(self, cfg: Config, window: int = 30):
        super().__init__()
        self.cfg, self.window = cfg, window
        self.emb = Embedding(cfg.dim)
        self.lfm = LFM2(cfg)
        self.lin = nn.Linear(cfg.dim, 2 * N_BINS)
        self.istft = ISTFT()
        self.register_buffer("inv_freq", None, persistent=False)  # RoPE, made by from_folder

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> "Detokenizer":
        """Load `audio_detokenizer/` (config.json, model.safetensors) with a strict load; missing,
        unexpected or mis-shaped tensors are named in one ValueError. `dtype` is the LFM2 part's; the
        spectrum and inverse STFT run in float32."""
        folder = Path(folder)
        config, weights = folder / "config.json", folder / "model.safetensors"
        for path, what in ((config, "detokenizer config"), (weights, "detokenizer weights")):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: {what} not found")
        try:
            cfg, window = config_from_dict(json.loads(config.read_text()))
        except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{config}: not an LFM2 detokenizer config ({type(e).__name__}: {e})") from None
        with torch.device("meta"):
            model = cls(cfg, window)
        try:
            state = load_file(str(weights), device=str(device))
        except SafetensorError as e:
            raise ValueError(f"{weights}: unreadable safetensors file ({e})") from None
        check_state_dict(model.state_dict(), state, weights)
        # every stored tensor in float32 first, as the official loader copies them into its float32 module: a
        # bf16 file's window squared in bf16 would round the inverse STFT's divisor
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        for part in (model.emb, model.lfm, model.lin):  # the window stays float32
            part.to(dtype=dtype)
        model.istft.make_basis()
        head_dim = cfg.dim // cfg.n_heads
        model.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
        return model.eval()

    def new_stream(self, batch_size: int = 1, max_frames: int = 1) -> DetokenizerStream:
        """A fresh decoding state. `max_frames`, Mimi.new_stream's bound on frames per call, is accepted so both
        decoders open streams alike; here a call may take any number of frames."""
        if batch_size < 1:
            raise ValueError(f"new_stream needs batch_size >= 1, got {batch_size}")
        w = self.lin.weight
        cfg, head_dim = self.cfg, self.cfg.dim // self.cfg.n_heads
        state = [w.new_zeros(batch_size, cfg.conv_kernel - 1, cfg.dim) if t == "conv" else
                 w.new_zeros(2, batch_size, cfg.n_kv_heads, self.window - 1, head_dim) for t in cfg.layer_types]
        tail = (N_FFT // HOP - 1, HOP)
        return DetokenizerStream(steps=0, state=state, overlap=w.new_zeros(batch_size, *tail, dtype=torch.float32),
                                 envelope=w.new_zeros(tail, dtype=torch.float32))

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, 8, T] (0..2047) -> waveform [B, 1, 1920 T] at 24 kHz, float32."""
        check_codes(codes, "detokenizer")
        stream = self.new_stream(codes.shape[0])
        return torch.cat([self.decode_step(codes, stream), self.flush(stream)], dim=-1)

    @torch.no_grad()
    def decode_step(self, codes: Tensor, stream: DetokenizerStream) -> Tensor:
        """The next frames of a stream: codes [B, 8, t] -> [B, 1, 1920 t] samples, DELAY behind: the first
        call with frames returns DELAY fewer, `flush` the last DELAY."""
        check_codes(codes, "detokenizer")
        if codes.shape[0] != stream.batch_size:
            raise ValueError(f"codes batch size {codes.shape[0]} does not match the stream's {stream.batch_size}")
        if codes.shape[-1] == 0:
            return stream.overlap.new_zeros(codes.shape[0], 1, 0)
        codes = codes.to(device=self.lin.weight.device, dtype=torch.long)
        return torch.cat([self._decode_piece(c, stream) for c in codes.split(WHOLE_PIECE_FRAMES, dim=-1)], dim=-1)

    @torch.no_grad()
    def flush(self, stream: DetokenizerStream) -> Tensor:
        """End a stream: its last DELAY samples [B, 1, DELAY] (the "same" padding trims the rest); nothing if it
        decoded no frame."""
        if stream.steps == 0:
            return stream.overlap.new_zeros(stream.batch_size, 1, 0)
        return (stream.overlap / stream.envelope).flatten(1)[:, None, :DELAY]

    def _decode_piece(self, codes: Tensor, stream: DetokenizerStream) -> Tensor:  # [B, 8, t] -> [B, 1, <=1920 t]
        x = self.emb(codes).repeat_interleave(UPSAMPLE, dim=1)  # [B, 6t, D]: nearest-exact x6
        n = x.shape[1]
        cos, sin, mask = self._rope_and_mask(stream.steps, n)
        for layer, state in zip(self.lfm.layers, stream.state):
            x = layer(x, cos, sin, state, mask)
        frames = self.istft.frames(self.lin(self.lfm.embedding_norm(x)))  # [B, n, N_FFT]
        wave = self._overlap_add(frames, stream)  # [B, HOP n]
        if stream.steps == 0:  # the stream's first samples are the left "same" padding
            wave = wave[:, DELAY:]
        stream.steps += n
        return wave[:, None]

    def _rope_and_mask(self, start: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """RoPE cos/sin [n, hd] at positions start.., in float32 then the model dtype (as transformers), and
        the attention mask [n, W-1+n] over (the W-1 steps held, these n): step p sees p-W+1..p, none before 0."""
        dev, W = self.inv_freq.device, self.window
        pos = torch.arange(start, start + n, device=dev)
        angles = pos.float()[:, None] * self.inv_freq  # [n, hd/2]
        angles = torch.cat([angles, angles], dim=-1)
        dtype = self.lin.weight.dtype
        key_pos = torch.arange(start - (W - 1), start + n, device=dev)  # [W-1+n]
        age = pos[:, None] - key_pos  # [n, W-1+n]
        mask = (age >= 0) & (age < W) & (key_pos >= 0)
        return angles.cos().to(dtype), angles.sin().to(dtype), mask

    def _overlap_add(self, frames: Tensor, stream: DetokenizerStream) -> Tensor:
        """Windowed frames [B, n, N_FFT] at hop HOP, after the stream's overlap -> the HOP n samples now
        complete, divided by the overlap-added squared window; the rest waits in the stream. Shifted adds of
        hop-sized blocks: elementwise ops only, like the rest of the inverse STFT."""
        B, n, _ = frames.shape
        k = N_FFT // HOP  # a frame spans 4 hops: its r-th hop lands on hop t + r
        blocks, squares = frames.view(B, n, k, HOP), self.istft.window.square().view(k, HOP)
        y, env = frames.new_zeros(B, n + k - 1, HOP), frames.new_zeros(n + k - 1, HOP)
        for r in range(k):
            y[:, r:r + n] += blocks[:, :, r]
            env[r:r + n] += squares[r]
        y[:, :k - 1] += stream.overlap
        env[:k - 1] += stream.envelope
        stream.overlap.copy_(y[:, n:])
        stream.envelope.copy_(env[n:])
        return (y[:, :n] / env[:n]).flatten(1)
