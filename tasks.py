"""The official tasks as data (system prompt, generation mode, sampling), loading, and one-call helpers.

    model, vocoder = load("LiquidAI/LFM2-Audio-1.5B")                 # a local folder works too
    text, wave = answer(model, vocoder, "assets/question.wav")         # the spoken answer, 24 kHz samples
    text = transcribe(model, "assets/asr.wav")                         # any length: transcribe.py
    wave = speak(model, vocoder, "Hello!", voice="uk-female")

The answers' sound is decoded as their items come by sound.py's `respond`.
"""

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import audio
import checkpoint
from detokenizer import Detokenizer
import conformer
from lfm2audio import AUDIO_IN, AUDIO_OUT, TEXT, Chat, LFM2Audio, Sampling
from mimi import Mimi
from sound import respond


@dataclass(frozen=True)
class Task:
    system: str  # the official system prompt ({voice} for TTS)
    mode: str  # interleaved (text and audio in runs) or sequential (text, then audio)
    sampling: Sampling  # the official examples' settings: text always greedy


VOICES = {"us-male": "US male", "us-female": "US female", "uk-male": "UK male", "uk-female": "UK female"}
TASKS = {
    "chat": Task("Respond with interleaved text and audio.", "interleaved", Sampling(audio_temperature=1.0,
                                                                                      audio_top_k=4)),
    "asr": Task("Perform ASR.", "sequential", Sampling()),
    "tts": Task("Perform TTS. Use the {voice} voice.", "sequential", Sampling(audio_temperature=0.8, audio_top_k=64)),
}
MAX_NEW_TOKENS = 512  # the official examples' value
SILENCE = 1e-4  # peak below this (~3 LSB of 16-bit audio) means there is nothing to hear
CONTEXT = 4096  # positions of the static caches: ~3 minutes of spoken conversation
LFM2_MAX_POSITIONS = 128000  # transformers' Lfm2Config default, for a config.json without max_position_embeddings
# the official code runs bf16 or fp32; fp16 is left out: nothing to compare it with, and its range can overflow
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def system_prompt(task: str, voice: str = "uk-male") -> str:
    if voice not in VOICES:
        raise ValueError(f"unknown voice {voice!r} (one of {', '.join(VOICES)})")
    return TASKS[task].system.format(voice=VOICES[voice])


def new_chat(tokenizer, system: str) -> Chat:
    chat = Chat(tokenizer)  # mel features kept in bf16, as the official ChatState does by default
    chat.new_turn("system")
    chat.add_text(system)
    chat.end_turn()
    return chat


def add_user_turn(chat: Chat, wave: torch.Tensor | None = None, text: str | None = None):
    """The user's turn (16 kHz audio first, then text, as the official prompts), closed; the assistant's opened."""
    chat.new_turn("user")
    if wave is not None:
        chat.add_audio(wave, audio.SAMPLE_RATE)
    if text:
        chat.add_text(text)
    chat.end_turn()
    chat.new_turn("assistant")


def drop_oldest_exchange(chat: Chat) -> int:
    """Forget the oldest user turn and the turns after it up to the next user turn (its answers); the system
    turn stays. Returns the number of positions dropped: 0 when only the latest user turn is left."""
    users = [start for start, role in chat.turns if role == "user"]
    if len(users) < 2:
        return 0
    a, b = users[0], users[1]
    before, gone = chat.modality[:a], chat.modality[a:b]
    for flag, items in ((TEXT, chat.text), (AUDIO_OUT, chat.frames)):
        del items[before.count(flag):before.count(flag) + gone.count(flag)]
    # a clip lies within one turn: the clips that end within [a, b) go whole
    ends = list(itertools.accumulate(conformer.emb_len(m.shape[1]) for m in chat.mels))  # in audio-in positions
    n_in = before.count(AUDIO_IN)
    del chat.mels[sum(e <= n_in for e in ends):sum(e <= n_in + gone.count(AUDIO_IN) for e in ends)]
    del chat.modality[a:b]
    chat.turns = [(start - (b - a) * (start >= b), role) for start, role in chat.turns if not a <= start < b]
    return b - a


def read_audio(source, name: str | None = None) -> torch.Tensor:
    """A recording (a path, or a file's bytes) -> mono wave [T] at 16 kHz; silence is refused rather than answered.
    Resampled here so that a rate that cannot be converted fails before anything else is done."""
    wave, rate = audio.load_audio(source, name)
    name = name or source
    peak = float(wave.abs().max())
    if peak < SILENCE:
        raise ValueError(f"{name}: audio is silent (peak {peak:.1e})")
    try:
        return audio.resample(wave, rate, audio.SAMPLE_RATE)
    except ValueError as e:  # e.g. a rate sharing too small a factor with 16 kHz
        raise ValueError(f"{name}: {e}") from None


class TextStream:
    """An answer's text as its ids arrive: `add` returns what can be shown now. A character's UTF-8 bytes can
    span several tokens, so the text is decoded from the start each time and a trailing U+FFFD (a character not
    yet complete) is held back. Control tokens (all of LFM2's added tokens) steer the generation and are not
    part of the text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0
        self.control = {t["id"] for t in tokenizer.added.values()}

    def add(self, token: int) -> str:
        if token in self.control:
            return ""
        self.ids.append(token)
        return self._new(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def close(self) -> str:
        return self._new(self.tokenizer.decode(self.ids))

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def _new(self, text: str) -> str:
        new = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return new


# ---- loading ----

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 halves the bytes read per step; without native bf16 a CPU is faster in fp32
        return torch.bfloat16 if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else torch.float32
    return DTYPES[name]


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic: AVX512-BF16 or AMX (torch's own CPU feature checks)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def pick_vocoder(folder: Path, choice: str | None) -> str:
    """"lfm2" or "mimi": `choice`, else the LFM2 detokenizer when the folder has one, as the official processor's
    decode does."""
    has_lfm2 = (folder / checkpoint.DETOKENIZER_DIR).is_dir()
    if choice == "lfm2" and not has_lfm2:
        raise FileNotFoundError(f"{folder / checkpoint.DETOKENIZER_DIR}: no LFM2 detokenizer in this checkpoint "
                                "(LFM2.5-Audio has one); use --vocoder mimi")
    return choice or ("lfm2" if has_lfm2 else "mimi")


def check_checkpoint(folder: Path, context: int, vocoder: str | None):
    """Fail before the long load: every file needed is there (no vocoder: ASR only) and `context` fits the
    model's positions (the caches for it are allocated up front)."""
    needed = {"config.json": "config file", "model.safetensors": "model weights", "tokenizer.json": "text tokenizer"}
    if vocoder == "mimi":
        needed[checkpoint.MIMI_FILE] = "Mimi checkpoint"
    elif vocoder == "lfm2":
        needed[f"{checkpoint.DETOKENIZER_DIR}/config.json"] = "detokenizer config"
        needed[f"{checkpoint.DETOKENIZER_DIR}/model.safetensors"] = "detokenizer weights"
    for name, what in needed.items():
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: {what} not found")
    config = folder / "config.json"
    try:
        limit = json.loads(config.read_text())["lfm"].get("max_position_embeddings", LFM2_MAX_POSITIONS)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{config}: not an LFM2-Audio config ({type(e).__name__}: {e})") from None
    if context > limit:
        raise ValueError(f"--context {context}: more positions than the model has ({limit}, "
                         f"max_position_embeddings in {config})")


def load(model: str | Path = "LiquidAI/LFM2-Audio-1.5B", device="auto", dtype="auto", quantize: str | None = None,
         compile: bool = False, context: int = CONTEXT, vocoder: str | None = None, sound: bool = True,
         sampling: Sampling = Sampling()) -> tuple[LFM2Audio, Mimi | Detokenizer | None]:
    """The model and its audio decoder (None when `sound` is False: ASR writes no audio). The decoders run in
    float32 whatever `dtype` (they are small, and the official ones do). `compile`: compiled.py, warmed up with
    `sampling`; `model.setup` names what was picked, e.g. "cpu bfloat16 int8"."""
    device = pick_device(str(device))
    dtype = pick_dtype(dtype, device) if isinstance(dtype, str) else dtype
    folder = checkpoint.checkpoint_folder(model)  # downloads on first use
    which = pick_vocoder(folder, vocoder) if sound else None
    check_checkpoint(folder, context, which)
    lm = LFM2Audio.from_pretrained(folder, device=device, dtype=dtype, max_seq_len=context, quantize=quantize)
    if compile:
        import compiled
        compiled.warm_up(compiled.compile_decode(lm), sampling)
    lm.setup = f"{device} {str(dtype).removeprefix('torch.')}" + (f" {quantize}" if quantize else "")
    decoder = None
    if which == "mimi":
        decoder = Mimi.from_file(folder / checkpoint.MIMI_FILE, device=device)
    elif which == "lfm2":
        decoder = Detokenizer.from_folder(folder / checkpoint.DETOKENIZER_DIR, device=device)
    return lm, decoder


# ---- one call per task ----

def _run(model, chat: Chat, task: str, vocoder=None, max_new_tokens=MAX_NEW_TOKENS, sampling=None):
    """(text, 24 kHz wave or None) of the assistant's answer to `chat`."""
    text, waves = TextStream(model.tokenizer), []
    items = model.generate(chat, TASKS[task].mode, max_new_tokens, sampling or TASKS[task].sampling)
    for kind, value in respond(items, vocoder, decode_frames=4):
        if kind == "text":
            text.add(value)
        elif kind == "wave":
            waves.append(value.cpu())
    return text.text.strip(), torch.cat(waves) if waves else None


def answer(model, vocoder, recording, text: str | None = None, **kw) -> tuple[str, torch.Tensor | None]:
    """Speech-to-speech chat: (the answer's text, its sound [n] at 24 kHz) for a recording (a path, or a wave at
    16 kHz) and/or a typed message."""
    chat = new_chat(model.tokenizer, TASKS["chat"].system)
    wave = read_audio(recording) if isinstance(recording, (str, Path, bytes)) else recording
    add_user_turn(chat, wave, text)
    return _run(model, chat, "chat", vocoder, **kw)


def transcribe(model, recording, **kw) -> str:
    """The transcript of a recording of up to 30 s (a path, or a wave at 16 kHz); transcribe.py for any length."""
    chat = new_chat(model.tokenizer, TASKS["asr"].system)
    add_user_turn(chat, read_audio(recording) if isinstance(recording, (str, Path, bytes)) else recording)
    return _run(model, chat, "asr", **kw)[0]


def speak(model, vocoder, text: str, voice: str = "uk-male", **kw) -> torch.Tensor:
    """TTS: the sound [n] at 24 kHz of `text` in one of VOICES."""
    chat = new_chat(model.tokenizer, system_prompt("tts", voice))
    add_user_turn(chat, None, text)
    wave = _run(model, chat, "tts", vocoder, **kw)[1]
    return wave if wave is not None else torch.zeros(0)


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())  # some messages (huggingface_hub's) span lines

