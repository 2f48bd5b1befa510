"""Sound out: an answer's generated items with the sound they complete, decoded as they come; that sound as bytes.

    for kind, value in respond(model.generate(chat, "interleaved"), vocoder):
        ...   # ("text", id), ("audio", codes [8]), and ("wave", samples [n] at 24 kHz) once a frame is decoded

`Sound` is the decoding itself, an item at a time (the server's engine.py runs it on its decoding thread);
`encode` writes a whole answer's samples as a file (wav, pcm, flac), `pcm16`, `float32` and `wav_header` a stream.
"""

import io
from collections.abc import Iterator

import numpy as np
import soundfile as sf
import torch

from lfm2audio import END_OF_AUDIO
from mimi import SAMPLE_RATE


def is_end_of_audio(frame) -> bool:
    """Whether an audio frame [8] is a signal to the model, not sound: the end-of-audio code in any codebook.
    Decoders have no code 2048: such a frame is never decoded (as in the official demo), but stays in the chat."""
    return END_OF_AUDIO in (frame.tolist() if torch.is_tensor(frame) else frame)


class Sound:
    """An answer's sound, decoded as its items come: `push` each item, `close` at the end; each returns the waves
    [n] at 24 kHz that are ready. The first frame is decoded at once (the first audio), later ones `decode_frames`
    at a time (a decoder call costs less per frame the more it takes: its weights are read once per call), and
    pending frames at the next item that is not sound; last comes what the decoder held back (the LFM2
    detokenizer's last 480 samples; nothing for Mimi)."""

    def __init__(self, vocoder, decode_frames: int = 1):
        if decode_frames < 1:
            raise ValueError(f"decode_frames must be >= 1, got {decode_frames}")
        self.vocoder, self.decode_frames = vocoder, decode_frames
        self.stream = vocoder.new_stream(1, decode_frames)
        self.pending, self.first = [], True  # frames waiting for the decoder; whether none was decoded yet

    def push(self, kind: str, value) -> list[torch.Tensor]:
        sound = kind == "audio" and not is_end_of_audio(value)
        if sound:
            self.pending.append(value)
        if self.pending and (not sound or self.first or len(self.pending) == self.decode_frames):
            self.first = False
            return [self._decode()]
        return []

    def close(self) -> list[torch.Tensor]:
        waves = [self._decode()] if self.pending else []
        tail = self.vocoder.flush(self.stream)[0, 0]
        return waves + ([tail] if tail.numel() else [])

    def _decode(self) -> torch.Tensor:
        frames, self.pending = torch.stack(self.pending, -1)[None], []  # [1, 8, t]
        return self.vocoder.decode_step(frames, self.stream)[0, 0]


def respond(items, vocoder, decode_frames: int = 1) -> Iterator[tuple[str, object]]:
    """The generated items as they come, ("text", id) and ("audio", codes [8]), each followed by the sound it
    completes: ("wave", samples [n] at 24 kHz), decoded as it comes (Sound); no sound without a vocoder.

      wav [T] -> 16 kHz -> log-mel [128, n = 1 + T/160]           audio.log_mel (Chat.add_audio)
      log-mel -> conformer [n/8, 512] -> adapter [n/8, 2048]     LFM2Audio.embed_prompt
      prompt [1, L, 2048] -> LFM2 -> h [2048] per item            prefill, then decode_one
      h -> text logits -> id | depthformer x 8 -> codes [8]       text_step | audio_step
      codes [1, 8, t] -> decoder, streaming -> wave [1920 t]      Mimi / Detokenizer decode_step"""
    sound = Sound(vocoder, decode_frames) if vocoder is not None else None
    for kind, value in items:
        yield kind, value
        for wave in sound.push(kind, value) if sound else ():
            yield "wave", wave
    for wave in sound.close() if sound else ():
        yield "wave", wave


# ---- as bytes ----

def pcm16(wave: torch.Tensor) -> bytes:
    """Samples [n] -> 16-bit signed little-endian PCM (clipped to [-1, 1])."""
    return (wave.float().clamp(-1, 1) * 32767).round().to(torch.int16).numpy().astype("<i2").tobytes()


def float32(wave: torch.Tensor) -> bytes:
    return wave.float().cpu().numpy().astype("<f4").tobytes()


def wav_header(n_samples: int | None = None) -> bytes:
    """A 24 kHz mono 32-bit float wav header; for a stream of unknown length the sizes are 0xFFFFFFFF."""
    data = 0xFFFFFFFF if n_samples is None else 4 * n_samples
    riff = 0xFFFFFFFF if n_samples is None else 4 + 26 + 12 + 8 + data
    fmt = (b"fmt " + (18).to_bytes(4, "little") + (3).to_bytes(2, "little") + (1).to_bytes(2, "little")
           + SAMPLE_RATE.to_bytes(4, "little") + (4 * SAMPLE_RATE).to_bytes(4, "little")
           + (4).to_bytes(2, "little") + (32).to_bytes(2, "little") + (0).to_bytes(2, "little"))
    fact = b"fact" + (4).to_bytes(4, "little") + (0 if n_samples is None else n_samples).to_bytes(4, "little")
    return b"RIFF" + riff.to_bytes(4, "little") + b"WAVE" + fmt + fact + b"data" + data.to_bytes(4, "little")


def encode(waves: list[torch.Tensor], fmt: str) -> bytes:
    """A whole answer's sound, its waves [n_i] in order (none: no samples), as a file in `fmt`: wav (32-bit float,
    the decoder's samples exactly), pcm / pcm16 (16-bit, no header) or flac (24-bit)."""
    wave = torch.cat(waves) if waves else torch.zeros(0)
    if fmt == "wav":
        return wav_header(wave.numel()) + float32(wave)
    if fmt in ("pcm", "pcm16"):
        return pcm16(wave)
    if wave.numel() == 0:  # libsndfile writes nothing for no samples: a FLAC file of its STREAMINFO block alone
        info = (SAMPLE_RATE << 44 | 23 << 36).to_bytes(8, "big")  # rate (20 bits), mono, 24 bits, 0 samples
        return b"fLaC" + b"\x80\x00\x00\x22" + (4096).to_bytes(2, "big") * 2 + bytes(6) + info + bytes(16)
    out = io.BytesIO()
    sf.write(out, np.clip(wave.float().cpu().numpy(), -1, 1), SAMPLE_RATE, format="FLAC", subtype="PCM_24")
    return out.getvalue()
