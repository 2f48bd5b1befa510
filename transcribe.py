"""Long-form ASR: recordings of any length cut at pauses into chunks, decoded in batches, written as txt/srt/vtt.

    chunks = cut(model, [wave16k])                          # <= 30 s each, the official ASR prompt on each
    for chunk in in_order(chunks, transcribe_chunks(model, chunks, batch_size=8)):
        print(timestamp(chunk.start), timestamp(chunk.end), chunk.text)

Each chunk gets the official ASR prompt on its own, exactly as if the official package were given that chunk alone;
chunks that are digital silence are not decoded. Long audio has to be cut: the encoder's attention is quadratic in
the clip's length and the model was trained on short clips.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import audio
from batch import generate_batch
from lfm2audio import IM_END, Chat, Sampling
from tasks import MAX_NEW_TOKENS, SILENCE, TASKS, TextStream, add_user_turn, new_chat

CHUNK_SECONDS = 30.0  # the longest chunk
FORMATS = (".txt", ".srt", ".vtt")


@dataclass
class Chunk:
    file: int  # which recording
    start: float  # seconds into it
    end: float
    chat: Chat | None  # the ASR prompt of the chunk; None for a silent chunk, not transcribed
    items: list = field(default_factory=list)  # generated, without the final <|im_end|>
    text: str = ""
    cut: bool = False  # the transcript reached max_new_tokens before <|im_end|>


def split_at_pauses(wave: torch.Tensor, sr: int, max_seconds: float = 30.0, smooth_seconds: float = 0.2
                    ) -> list[tuple[int, int]]:
    """Mono wave [T] -> spans (start, end) in samples that tile it, each at most `max_seconds` long, cut at the
    quietest point of the second half of each window (so chunks are at least max_seconds / 2, but the last).
    Quiet = the lowest mean energy over `smooth_seconds` around a 10 ms step: the middle of a short pause (in a
    long silence, as late as the limit allows), or the softest sound when there is no pause.
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


def cut(model, waves: list[torch.Tensor], chunk_seconds: float = CHUNK_SECONDS, system: str = TASKS["asr"].system,
        text: str | None = None) -> list[Chunk]:
    """Every recording (mono, 16 kHz) cut at its pauses into chunks of at most `chunk_seconds`, each with the ASR
    prompt on its own (and `text` after the audio in the user turn)."""
    chunks = []
    for f, wave in enumerate(waves):
        for a, b in split_at_pauses(wave, audio.SAMPLE_RATE, chunk_seconds):
            chat = None
            if float(wave[a:b].abs().max()) >= SILENCE:
                chat = new_chat(model.tokenizer, system)
                add_user_turn(chat, wave[a:b], text)
            chunks.append(Chunk(f, a / audio.SAMPLE_RATE, b / audio.SAMPLE_RATE, chat))
    return chunks


def finish(chunk: Chunk, items: list, tokenizer) -> Chunk:
    """A chunk's items in: its transcript, and whether the bound cut it (only <|im_end|> ends a sequential turn)."""
    chunk.cut = not items or items[-1] != ("text", IM_END)
    chunk.items = items if chunk.cut else items[:-1]
    text = TextStream(tokenizer)
    for kind, value in chunk.items:
        if kind == "text":
            text.add(value)
    chunk.text = text.text.strip()
    return chunk


def transcribe_chunks(model, chunks: list[Chunk], batch_size: int = 8, max_new_tokens: int = MAX_NEW_TOKENS,
                      sampling: Sampling = Sampling()) -> Iterator[Chunk]:
    """The chunks that are not silent, transcribed `batch_size` at a time, yielded as each is done."""
    todo = [c for c in chunks if c.chat is not None]
    for i, items in generate_batch(model, [c.chat for c in todo], "sequential", max_new_tokens, batch_size,
                                   sampling):
        yield finish(todo[i], items, model.tokenizer)


def in_order(chunks: list[Chunk], done: Iterator[Chunk]) -> Iterator[Chunk]:
    """Every chunk, silent ones included, in the recording's order, each as soon as it and those before it are done."""
    finished, shown = set(), 0
    for chunk in done:
        finished.add(id(chunk))
        while shown < len(chunks) and (chunks[shown].chat is None or id(chunks[shown]) in finished):
            yield chunks[shown]
            shown += 1
    yield from chunks[shown:]  # trailing silent chunks (nothing was left to decode)


def timestamp(seconds: float, sep: str = ".") -> str:
    """HH:MM:SS.mmm (srt wants a comma before the milliseconds)."""
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def header(fmt: str) -> str:
    return "WEBVTT\n\n" if fmt == ".vtt" else ""


def cue(fmt: str, n: int, start: float, end: float, text: str) -> str:
    """Cue number n (from 1) of a transcript in format fmt (.txt: a line; .srt, .vtt: the time span too)."""
    if fmt == ".srt":
        return f"{n}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{text}\n\n"
    if fmt == ".vtt":
        return f"{timestamp(start)} --> {timestamp(end)}\n{text}\n\n"
    return text + "\n"


def subtitles(fmt: str, chunks: list[Chunk]) -> str:
    """The whole transcript in format fmt; chunks without text (silence) are left out."""
    spoken = [c for c in chunks if c.text]
    return header(fmt) + "".join(cue(fmt, n, c.start, c.end, c.text) for n, c in enumerate(spoken, 1))


class TranscriptWriter:
    """A transcript file in the format its suffix names, written chunk by chunk (a long run stopped half-way
    leaves a usable file); chunks without text are left out. Never overwrites: the file must not exist."""

    def __init__(self, path):
        self.fmt, self.cues = path.suffix.lower(), 0
        self.file = open(path, "x", encoding="utf-8")
        self.file.write(header(self.fmt))

    def write(self, start: float, end: float, text: str):
        if text:
            self.cues += 1
            self.file.write(cue(self.fmt, self.cues, start, end, text))
            self.file.flush()

    def close(self):
        self.file.close()
