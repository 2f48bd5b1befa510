"""LFM2-Audio from the command line: speech-to-speech chat, ASR and TTS.

    python run.py --wav assets/question.wav               # spoken answer: text on stdout, audio in answer.wav
    python run.py --text "What is the capital of France?"
    python run.py --mode asr --wav assets/asr.wav         # transcript on stdout
    python run.py --mode asr --wav a.wav --wav b.wav --text-out a.srt   # any length, cut into <= 30 s chunks
    python run.py --mode tts --text "Hello!" --voice uk-female --out hello.wav
    python run.py --chat                                  # multi-turn: type text or a wav path per turn

The checkpoint (`LiquidAI/LFM2-Audio-1.5B`, ~3.3 GB) is downloaded into the Hugging Face cache on first use;
HF_HUB_OFFLINE=1 uses the cache only. Text is printed as it is generated; audio is decoded as it is generated, a few
frames at a time (streaming Mimi, or for LFM2.5-Audio its LFM2 detokenizer), and appended to the wav file, so the
file is playable before the answer ends.
Errors are one line on stderr (`error: ...`) and a non-zero exit.
"""

import argparse
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch

import conformer
from detokenizer import Detokenizer
from lfm2audio import DETOKENIZER_DIR, IM_END, MIMI_FILE, Chat, LFM2Audio, checkpoint_folder, respond
from mimi import SAMPLE_RATE, Mimi

DEFAULT_MODEL = "LiquidAI/LFM2-Audio-1.5B"
CHAT_SYSTEM = "Respond with interleaved text and audio."
ASR_SYSTEM = "Perform ASR."
TTS_SYSTEM = "Perform TTS. Use the {} voice."
VOICES = {"us-male": "US male", "us-female": "US female", "uk-male": "UK male", "uk-female": "UK female"}
GENERATION = {"chat": "interleaved", "asr": "sequential", "tts": "sequential"}
# sampling of the official README examples per task: (text temperature, text top-k, audio temperature,
# audio top-k); None = greedy. Text is always greedy there; chat audio uses 1.0 / 4, TTS audio 0.8 / 64.
SAMPLING = {"chat": (None, None, 1.0, 4), "asr": (None, None, None, None), "tts": (None, None, 0.8, 64)}
MAX_NEW_TOKENS = 512  # the official examples' value
DECODE_FRAMES = 4  # Mimi on a 2-core CPU: 14.8 ms a frame one at a time, 7.1 four at a time
CHUNK_SECONDS = 30.0  # ASR: longer recordings are cut at pauses into chunks of at most this
TEXT_FORMATS = (".txt", ".srt", ".vtt")
BATCH = 8  # ASR chunks decoded together
CONTEXT = 4096  # positions of the static caches: ~3 minutes of spoken conversation
SILENCE = 1e-4  # peak below this (~3 LSB of 16-bit audio) means there is nothing to hear
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
# the official code runs bf16 or fp32; fp16 is left out: nothing to compare it with, and its range can overflow
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
LFM2_MAX_POSITIONS = 128000  # transformers' Lfm2Config default, for a config.json without max_position_embeddings


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of the CLI (argparse adds the usage)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description="LFM2-Audio-1.5B: speech-to-speech chat, ASR and TTS.")
    p.add_argument("--mode", choices=["chat", "asr", "tts"], default="chat",
                   help="chat: interleaved text+audio answer (default); asr: transcript; tts: speech of --text")
    p.add_argument("--wav", action="append",
                   help="the user's audio (any rate; multi-channel is averaged to mono); --mode asr takes several")
    p.add_argument("--text", help="the user's text (with --wav: after the audio in the same turn)")
    p.add_argument("--voice", choices=list(VOICES), default="uk-male", help="TTS voice (default uk-male)")
    p.add_argument("--chat", action="store_true",
                   help="multi-turn: read one turn per line from stdin (a wav path or text); empty line ends")
    p.add_argument("--out", default="answer.wav",
                   help="24 kHz wav of the spoken answer (default answer.wav; --chat: answer_1.wav, ...)")
    p.add_argument("--text-out", help="ASR: also write the transcript as .txt, or .srt/.vtt subtitles with the "
                                      "chunks' time spans (several --wav: FILE_1.srt, ...); never overwrites")
    p.add_argument("--chunk-seconds", type=float, default=CHUNK_SECONDS,
                   help=f"ASR: longest chunk a recording is cut into, at its quietest points "
                        f"(default {CHUNK_SECONDS:g})")
    p.add_argument("--batch", type=int, default=BATCH,
                   help=f"ASR: chunks decoded at once (default {BATCH}); on a CPU a batch costs little more than one")
    p.add_argument("--codes-out", help="write the prompt ids and generated items as JSON (--chat: FILE_1.json, ...)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Hugging Face repo id or local folder ({DEFAULT_MODEL})")
    p.add_argument("--system", help="system prompt (default: the official one of the mode)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help=f"per answer (default {MAX_NEW_TOKENS})")
    p.add_argument("--context", type=int, default=CONTEXT, help=f"context length in positions (default {CONTEXT})")
    p.add_argument("--drop-old-turns", action="store_true",
                   help="--chat: when the context is full, forget the oldest exchanges (a question and its answer; "
                        "the system prompt stays) instead of ending the chat")
    p.add_argument("--greedy", action="store_true", help="greedy text and audio (overrides the sampling options)")
    p.add_argument("--temperature", type=float, help="text temperature (default: greedy, as the official examples)")
    p.add_argument("--top-k", type=int, help="text top-k")
    p.add_argument("--audio-temperature", type=float, help="audio temperature (default chat 1.0, tts 0.8)")
    p.add_argument("--audio-top-k", type=int, help="audio top-k (default chat 4, tts 64)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--vocoder", choices=["mimi", "lfm2"],
                   help="audio decoder: lfm2 = the LFM2 detokenizer of LFM2.5-Audio (its audio_detokenizer/ folder; "
                        "the default when there is one, as in the official package), mimi = Mimi (otherwise)")
    p.add_argument("--decode-frames", type=int, default=DECODE_FRAMES,
                   help=f"audio frames the decoder takes per call after an answer's first, decoded at once (default "
                        f"{DECODE_FRAMES}, 320 ms): on a CPU more frames per call cost less each, fewer reach the "
                        f"file sooner")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="model dtype (auto: bfloat16 on cuda and on CPUs with native bf16, AVX512-BF16 or AMX; "
                        "float32 elsewhere); the audio decoder always runs in float32")
    p.add_argument("--quantize", choices=["int8"],
                   help="int8 weight-only quantization of the decoder's linear layers (about 1.5 GB of weights; "
                        "on a 2-core CPU the fastest setting)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode path at load (CUDA graphs on cuda); ~2 minutes more to load the "
                        "first time, ~20 s later: worth it for long answers (on a CPU ~1.35x faster int8 frames)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.context < 2:
        p.error("--max-new-tokens must be >= 1 and --context >= 2")
    if args.decode_frames < 1:
        p.error("--decode-frames must be >= 1")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if not 0.1 <= args.chunk_seconds <= CHUNK_SECONDS:
        p.error(f"--chunk-seconds must be between 0.1 and {CHUNK_SECONDS:g}")
    if args.mode != "asr" and (args.text_out or len(args.wav or []) > 1):
        p.error("--text-out and several --wav are for --mode asr")
    if not args.chat:
        if args.drop_old_turns:
            p.error("--drop-old-turns needs --chat")
        if args.mode == "tts" and not args.text:
            p.error("--mode tts needs --text")
        if args.mode == "asr" and not args.wav:
            p.error("--mode asr needs --wav")
        if args.mode == "chat" and not (args.wav or args.text):
            p.error("give --wav and/or --text (or --chat for a conversation on stdin)")
    return args


# ---- setup ----

def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
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


def sampling(args) -> dict:
    """generate() keyword arguments: the official defaults of the mode, overridden by the options."""
    if args.greedy:
        return dict(text_temperature=None, text_top_k=None, audio_temperature=None, audio_top_k=None)
    values = [given if given is not None else default for given, default in zip(
        (args.temperature, args.top_k, args.audio_temperature, args.audio_top_k), SAMPLING[args.mode])]
    values = [None if v is not None and v <= 0 else v for v in values]  # 0 means greedy / no top-k
    return dict(zip(("text_temperature", "text_top_k", "audio_temperature", "audio_top_k"), values))


def system_prompt(args) -> str:
    if args.system is not None:
        return args.system
    return {"chat": CHAT_SYSTEM, "asr": ASR_SYSTEM}.get(args.mode) or TTS_SYSTEM.format(VOICES[args.voice])


def read_audio(path: str) -> tuple[torch.Tensor, int]:
    """(mono wave [T] at 16 kHz, 16000) of an audio file; silence is refused rather than answered. Resampled
    here (Chat.add_audio then leaves it as is) so that a rate we cannot convert fails before the model loads,
    or in --chat before the turn is started."""
    wave, rate = conformer.load_audio(path)
    peak = float(wave.abs().max())
    if peak < SILENCE:
        raise ValueError(f"{path}: audio is silent (peak {peak:.1e})")
    try:
        return conformer.resample(wave, rate, conformer.SAMPLE_RATE), conformer.SAMPLE_RATE
    except ValueError as e:  # e.g. a rate sharing too small a factor with 16 kHz
        raise ValueError(f"{path}: {e}") from None


def numbered(path: str | None, turn: int | None) -> Path | None:
    """answer.wav -> answer_2.wav for turn 2 of --chat; unchanged for a single answer (turn None)."""
    if path is None:
        return None
    p = Path(path)
    return p if turn is None else p.with_name(f"{p.stem}_{turn}{p.suffix}")


# ---- streaming output ----

def control_ids(tokenizer) -> set[int]:
    """LFM2's added tokens are all control tokens (<|im_end|>, <|text_end|>, <|audio_start|>, <|reserved_N|>):
    they steer the generation, they are not part of an answer's text."""
    return {t["id"] for t in tokenizer.added.values()}


class TextPrinter:
    """Prints text tokens as they arrive. A character's UTF-8 bytes can span several tokens, so the text is
    decoded from the start each time and a trailing U+FFFD (a character not yet complete) is held back."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.control = control_ids(tokenizer)
        self.ids: list[int] = []
        self.shown = 0  # characters printed

    def add(self, token: int):
        if token not in self.control:  # they steer the generation; they are not part of the answer
            self.ids.append(token)
            self._show(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def close(self):
        self._show(self.tokenizer.decode(self.ids))
        if self.shown:
            self.out.write("\n")
            self.out.flush()

    def _show(self, text: str):
        if len(text) > self.shown:
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)


class AudioWriter:
    """Appends decoded audio to a 24 kHz float wav, flushed after every frame so the header is current and the
    file playable while the answer goes on."""

    def __init__(self, path: Path):
        # FLOAT keeps the decoder's samples exactly (PCM_16 would round them and clip peaks above 1)
        self.file = sf.SoundFile(str(path), "w", samplerate=SAMPLE_RATE, channels=1, subtype="FLOAT")
        self.samples = 0

    def write(self, wave: torch.Tensor):  # wave [n] at 24 kHz
        self.file.write(wave.float().cpu().numpy())
        self.file.flush()
        self.samples += wave.numel()

    def close(self):
        self.file.close()


# ---- one answer ----

class ContextFull(ValueError):
    """The prompt leaves no room for an answer."""


def answer(model: LFM2Audio, decoder: Mimi | Detokenizer | None, chat: Chat, args, wav_path: Path,
           codes_path: Path | None, load_s: float) -> list:
    """Generate the assistant's turn for `chat` (which ends with `<|im_start|>assistant\\n`): text to stdout,
    audio to `wav_path` (none without a decoder: ASR), timing to stderr. Returns the generated items, without a
    final <|im_end|>."""
    room = args.context - len(chat)
    if room < 1:
        raise ContextFull(f"the prompt has {len(chat)} positions, the context {args.context} (--context)")
    max_new = min(args.max_new_tokens, room)
    if max_new < args.max_new_tokens:
        print(f"note: answer limited to {max_new} tokens by the context of {args.context}", file=sys.stderr)
    prompt_ids, items, printer = list(chat.text), [], TextPrinter(model.tokenizer)
    audio = AudioWriter(wav_path) if decoder is not None else None
    t0 = time.perf_counter()
    first_text = first_audio = None
    try:
        for kind, value, wave in respond(model, chat, decoder, GENERATION[args.mode], args.decode_frames,
                                         max_new_tokens=max_new, **sampling(args)):
            if kind == "wave":
                audio.write(wave)
                first_audio = first_audio or time.perf_counter() - t0
                continue
            items.append((kind, value if kind == "text" else value.tolist()))
            if kind == "text":
                first_text = first_text or time.perf_counter() - t0
                printer.add(value)
    finally:
        if audio is not None:
            audio.close()
        printer.close()
    total = time.perf_counter() - t0
    if items and items[-1] == ("text", IM_END):  # sequential mode yields it; the turn's end is not content
        items.pop()
    if codes_path is not None:
        codes_path.write_text(json.dumps({"prompt_ids": prompt_ids, "items": [list(i) for i in items]}))
    report_time(load_s, first_text, first_audio, audio.samples / SAMPLE_RATE if audio else 0.0, total, wav_path,
                args.setup)
    return items


def report_time(load_s, first_text, first_audio, audio_s, total, wav_path, setup=""):
    """One stderr line per answer; RTF = generation time / seconds of audio generated (< 1: faster than
    real time). `setup`: the device, dtype and quantization picked."""
    def s(t):
        return "-" if t is None else f"{t:.2f} s"
    rtf = f"RTF {total / audio_s:.2f}" if audio_s else "no audio"
    setup = f" ({setup})" if setup else ""
    print(f"[time] load {load_s:.2f} s{setup} | first text {s(first_text)} | first audio {s(first_audio)} | "
          f"{audio_s:.2f} s of audio in {total:.2f} s ({rtf})" + (f" -> {wav_path}" if audio_s else ""),
          file=sys.stderr)


def add_user_turn(chat: Chat, audio: tuple[torch.Tensor, int] | None, text: str | None):
    """The user's turn (audio first, then text, as the official prompts), closed; the assistant's opened."""
    chat.new_turn("user")
    if audio is not None:
        chat.add_audio(*audio)
    if text:
        chat.add_text(text)
    chat.end_turn()
    chat.new_turn("assistant")


def new_chat(model: LFM2Audio, args) -> Chat:
    chat = Chat(model.tokenizer)  # mel features kept in bf16, as the official ChatState does by default
    chat.new_turn("system")
    chat.add_text(system_prompt(args))
    chat.end_turn()
    return chat


def check_outputs(args):
    """The output paths can be written, checked before the long load rather than at the first frame."""
    for out in (args.out, args.codes_out):
        if out is None:
            continue
        if Path(out).is_dir():
            raise ValueError(f"{out}: is a folder, give a file name")
        if not Path(out).resolve().parent.is_dir():
            raise FileNotFoundError(f"{out}: no such folder to write into")
    if Path(args.out).suffix.lower() != ".wav":  # the answer is written as a float wav, whatever the name says
        raise ValueError(f"--out {args.out}: the answer is written as a wav file, give a name ending in .wav")


def pick_vocoder(folder: Path, args) -> str | None:
    """"lfm2" or "mimi" (None for ASR, which writes no audio): --vocoder, else the detokenizer when the folder
    has one, as the official processor's decode does."""
    if args.mode == "asr":
        return None
    has_lfm2 = (folder / DETOKENIZER_DIR).is_dir()
    if args.vocoder == "lfm2" and not has_lfm2:
        raise FileNotFoundError(f"{folder / DETOKENIZER_DIR}: no LFM2 detokenizer in this checkpoint (LFM2.5-Audio "
                                "has one); use --vocoder mimi")
    return args.vocoder or ("lfm2" if has_lfm2 else "mimi")


def check_checkpoint(folder: Path, args):
    """Fail before the long load: every file the mode needs is there (ASR writes no audio, so needs no vocoder)
    and --context fits the model's positions (the caches for it are allocated up front)."""
    needed = {"config.json": "config file", "model.safetensors": "model weights", "tokenizer.json": "text tokenizer"}
    vocoder = pick_vocoder(folder, args)
    if vocoder == "mimi":
        needed[MIMI_FILE] = "Mimi checkpoint"
    elif vocoder == "lfm2":
        needed[f"{DETOKENIZER_DIR}/config.json"] = "detokenizer config"
        needed[f"{DETOKENIZER_DIR}/model.safetensors"] = "detokenizer weights"
    for name, what in needed.items():
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: {what} not found")
    config = folder / "config.json"
    try:
        limit = json.loads(config.read_text())["lfm"].get("max_position_embeddings", LFM2_MAX_POSITIONS)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{config}: not an LFM2-Audio config ({type(e).__name__}: {e})") from None
    if args.context > limit:
        raise ValueError(f"--context {args.context}: more positions than the model has ({limit}, "
                         f"max_position_embeddings in {config})")


def load(args) -> tuple[LFM2Audio, Mimi | Detokenizer | None, float]:
    """The model, and the audio decoder (None for ASR), and the seconds it took. The decoders run in float32
    whatever --dtype (they are small, and the official ones do)."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    t0 = time.perf_counter()
    folder = checkpoint_folder(args.model)  # downloads on first use
    check_checkpoint(folder, args)
    model = LFM2Audio.from_pretrained(folder, device=device, dtype=dtype, max_seq_len=args.context,
                                      compile=args.compile, quantize=args.quantize)
    if args.compile:
        warm_up(model, sampling(args))
    args.setup = f"{device} {str(dtype).removeprefix('torch.')}" + (f" {args.quantize}" if args.quantize else "")
    vocoder, decoder = pick_vocoder(folder, args), None
    if vocoder == "mimi":
        decoder = Mimi.from_file(folder / MIMI_FILE, device=device)
    elif vocoder == "lfm2":
        decoder = Detokenizer.from_folder(folder / DETOKENIZER_DIR, device=device)
    return model, decoder, time.perf_counter() - t0


def warm_up(model: LFM2Audio, sampling: dict):
    """Compile now, so that load time holds it and the answers' timings are the steady state: one backbone step
    and one step of each head with the answers' sampling settings (constants of the compiled graphs). It writes
    position 0 of the caches, which the first answer's prefill rewrites. Inductor's notes on the operators it
    leaves to eager kernels (the depthformer's complex RoPE, sampling) are silenced: they are not the user's
    concern."""
    torch._logging.set_logs(inductor=logging.ERROR)
    warnings.filterwarnings("ignore", "Torchinductor does not support code generation for complex")
    with torch.no_grad():
        model.begin_step()  # one step, as generate runs it: x stays readable for decode_one
        h = model.embed_tokens_weight.new_zeros(1, model.cfg.dim)
        _, x = model.text_step(h, sampling["text_temperature"], sampling["text_top_k"])
        model.audio_step(h, sampling["audio_temperature"], sampling["audio_top_k"])
        model.decode_one(x, torch.zeros(1, 1, dtype=torch.long, device=h.device))


def make_room(chat: Chat, args):
    """--drop-old-turns: forget the oldest exchanges until a whole answer fits (the next answer then prefills
    the shortened history again)."""
    dropped = exchanges = 0
    while args.context - len(chat) < args.max_new_tokens and (n := chat.drop_oldest_exchange()):
        dropped, exchanges = dropped + n, exchanges + 1
    if dropped:
        print(f"note: context full, forgot the oldest {exchanges} exchange(s), {dropped} positions",
              file=sys.stderr)


def run_chat(args, model, decoder, load_s, audio) -> int:
    """One turn per stdin line (a path to an audio file, or text); the history keeps the model's own text ids
    and audio frames, as the official multi-turn example does with ChatState.append. The model's caches keep
    the history between turns: each answer prefills only the new turn (see LFM2Audio.generate)."""
    chat = new_chat(model, args)
    if audio is not None or args.text:  # the first turn from the command line
        add_user_turn(chat, audio, args.text)
    elif not read_user_turn(chat):
        return 0
    turn = 0
    while True:
        turn += 1
        if args.drop_old_turns:
            make_room(chat, args)
        try:
            items = answer(model, decoder, chat, args, numbered(args.out, turn), numbered(args.codes_out, turn),
                           load_s)
        except ContextFull as e:
            print(f"context full: {e}; start a new chat (or raise --context, or use --drop-old-turns)",
                  file=sys.stderr)
            return 0
        chat.append(items)
        chat.end_turn()
        if not read_user_turn(chat):
            return 0


def names_audio(line: str) -> bool:
    """Whether a --chat line is an audio file's path (else it is a text message): it ends in an audio suffix
    (a missing file is then reported) or is an existing file."""
    if line.lower().endswith(AUDIO_SUFFIXES):
        return True
    try:
        return Path(line).is_file()
    except (OSError, ValueError):  # a message is often no valid path: over 255 bytes, or with a NUL
        return False


def read_user_turn(chat: Chat) -> bool:
    """Add the next stdin line as a user turn; False at EOF or an empty line. A bad audio file is reported and
    the next line read."""
    while True:
        if sys.stdin.isatty():
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline().strip()
        if not line:  # EOF or an empty line
            return False
        if not names_audio(line):
            add_user_turn(chat, None, line)
            return True
        try:
            audio = read_audio(line)
        except (FileNotFoundError, ValueError, OSError) as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            continue
        add_user_turn(chat, audio, None)
        return True


# ---- ASR of recordings of any length ----

def timestamp(seconds: float, sep: str = ".") -> str:
    """HH:MM:SS.mmm (srt wants a comma before the milliseconds)."""
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


class TranscriptWriter:
    """--text-out in the format its suffix names: .txt (a line per chunk), .srt or .vtt (a cue per chunk with
    its time span). Written chunk by chunk, so a long run leaves a usable file if it is stopped; chunks without
    text (silence) are left out."""

    def __init__(self, path: Path):
        self.path, self.fmt, self.cues = path, path.suffix.lower(), 0
        self.file = open(path, "x", encoding="utf-8")  # "x": check_text_outputs made sure it does not exist
        if self.fmt == ".vtt":
            self.file.write("WEBVTT\n\n")

    def write(self, start: float, end: float, text: str):
        if not text:
            return
        self.cues += 1
        if self.fmt == ".srt":
            self.file.write(f"{self.cues}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{text}\n\n")
        elif self.fmt == ".vtt":
            self.file.write(f"{timestamp(start)} --> {timestamp(end)}\n{text}\n\n")
        else:
            self.file.write(text + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def text_out_paths(args) -> list[Path | None]:
    """One --text-out file per --wav (numbered when there are several), checked before the long load: a known
    format, a folder to write into, and no existing file (a transcript is never overwritten)."""
    if not args.text_out:
        return [None] * len(args.wav)
    if Path(args.text_out).suffix.lower() not in TEXT_FORMATS:
        raise ValueError(f"--text-out {args.text_out}: give a name ending in {', '.join(TEXT_FORMATS)}")
    paths = [numbered(args.text_out, i + 1 if len(args.wav) > 1 else None) for i in range(len(args.wav))]
    for path in paths:
        if path.exists():
            raise ValueError(f"{path}: already exists, not overwritten (remove it or give another --text-out)")
        if not path.resolve().parent.is_dir():
            raise FileNotFoundError(f"{path}: no such folder to write into")
    return paths


@dataclass
class Chunk:
    file: int  # index into --wav
    start: float  # seconds into the recording
    end: float
    chat: Chat | None  # the ASR prompt of the chunk; None for a silent chunk, not transcribed


def asr_chunks(model: LFM2Audio, args, waves: list[torch.Tensor]) -> list[Chunk]:
    """Every recording (16 kHz) cut at its pauses into chunks of at most --chunk-seconds, each with the official
    ASR prompt on its own."""
    chunks = []
    for f, wave in enumerate(waves):
        for a, b in conformer.split_at_pauses(wave, conformer.SAMPLE_RATE, args.chunk_seconds):
            chat = None
            if float(wave[a:b].abs().max()) >= SILENCE:
                chat = new_chat(model, args)
                add_user_turn(chat, (wave[a:b], conformer.SAMPLE_RATE), args.text)
            chunks.append(Chunk(f, a / conformer.SAMPLE_RATE, b / conformer.SAMPLE_RATE, chat))
    return chunks


def run_asr(args, model: LFM2Audio, load_s: float, waves: list[torch.Tensor], text_paths: list) -> int:
    """Transcribe each --wav chunk by chunk, --batch chunks decoded at once: a line per chunk
    `[start --> end] text` on stdout (in order, under a `==> file <==` header when there are several files), a
    progress line per chunk on stderr, --text-out and --codes-out (numbered per chunk when there are several)
    written as chunks finish."""
    t0 = time.perf_counter()
    chunks = asr_chunks(model, args, waves)
    todo = [k for k, c in enumerate(chunks) if c.chat is not None]  # silent chunks are not transcribed
    longest = max((len(chunks[k].chat) for k in todo), default=0)
    max_new = min(args.max_new_tokens, args.context - longest)
    if max_new < 1:
        raise ContextFull(f"a chunk's prompt has {longest} positions, the context {args.context} (--context)")
    if max_new < args.max_new_tokens:
        print(f"note: transcripts limited to {max_new} tokens per chunk by the context of {args.context}",
              file=sys.stderr)
    # caches for this run alone: every row holds a chunk's prompt and transcript, no more (a decode step reads
    # its whole static cache)
    model.setup_caches(longest + max_new, max(1, min(args.batch, len(todo))))
    control = control_ids(model.tokenizer)
    writers = [TranscriptWriter(p) if p else None for p in text_paths]
    texts, shown, audio_s, total_s = {}, 0, 0.0, sum(c.end - c.start for c in chunks)
    first_text = None
    try:
        for i, items in model.generate_batch([chunks[k].chat for k in todo], GENERATION[args.mode], max_new,
                                             args.batch, **sampling(args)):
            k = todo[i]
            c = chunks[k]
            if items[-1] == ("text", IM_END):  # the turn's end is not content
                items.pop()
            else:  # only the bound ends a sequential answer otherwise
                print(f"note: {args.wav[c.file]} [{timestamp(c.start)} --> {timestamp(c.end)}]: the transcript "
                      f"reached --max-new-tokens {max_new} and is cut there", file=sys.stderr)
            if args.codes_out:
                codes = numbered(args.codes_out, k + 1 if len(chunks) > 1 else None)
                codes.write_text(json.dumps({"prompt_ids": c.chat.text, "items": [
                    [kind, v if kind == "text" else v.tolist()] for kind, v in items]}))
            ids = [v for kind, v in items if kind == "text" and v not in control]
            texts[k] = model.tokenizer.decode(ids).strip()
            audio_s += c.end - c.start
            print(f"[asr] {len(texts)}/{len(todo)} chunks | {audio_s:.1f} of {total_s:.1f} s of audio | "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
            while shown < len(chunks) and (chunks[shown].chat is None or shown in texts):  # in order
                shown = show_chunk(chunks, shown, texts.get(shown, ""), len(waves) > 1, args.wav, writers)
                first_text = first_text or time.perf_counter() - t0
    finally:
        for w in writers:
            if w is not None:
                w.close()
    took = time.perf_counter() - t0
    print(f"[time] load {load_s:.2f} s ({args.setup}) | first text {first_text or took:.2f} s | {len(chunks)} chunk"
          f"{'s' * (len(chunks) > 1)}, {total_s:.1f} s of audio in {took:.2f} s "
          f"({total_s / took:.1f} s of audio per second)", file=sys.stderr)
    return 0


def show_chunk(chunks: list[Chunk], k: int, text: str, several: bool, names: list[str], writers: list) -> int:
    """Print chunk k (and the file's header first, for several files), add it to --text-out; the next k."""
    c = chunks[k]
    if several and (k == 0 or chunks[k - 1].file != c.file):
        print(f"==> {names[c.file]} <==")
    print(f"[{timestamp(c.start)} --> {timestamp(c.end)}] {text}".rstrip(), flush=True)
    if writers[c.file] is not None:
        writers[c.file].write(c.start, c.end, text)
    return k + 1


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?', not a crash
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        check_outputs(args)  # bad input or output fails before the long load
        if args.mode == "asr" and not args.chat:
            text_paths = text_out_paths(args)
            waves = [read_audio(path)[0] for path in args.wav]
            model, _, load_s = load(args)
            return run_asr(args, model, load_s, waves, text_paths)
        audio = read_audio(args.wav[0]) if args.wav else None
        model, decoder, load_s = load(args)
        if args.chat:
            return run_chat(args, model, decoder, load_s, audio)
        chat = new_chat(model, args)
        add_user_turn(chat, audio, args.text)
        answer(model, decoder, chat, args, Path(args.out), numbered(args.codes_out, None), load_s)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 0 if args.chat else 130
    except ContextFull as e:
        print(f"error: prompt too long: {e}", file=sys.stderr)
    except torch.OutOfMemoryError:
        print(f"error: out of memory on {args.device} (try --dtype bfloat16, a smaller --context, or "
              "--device cpu)", file=sys.stderr)
    # expected failures: missing or bad files (audio, checkpoint folder, tensors), an output file that cannot be
    # written, download failures and cache misses (checkpoint_folder raises FileNotFoundError;
    # huggingface_hub's own errors are OSErrors)
    except (FileNotFoundError, ValueError, OSError, sf.SoundFileError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
    return 1


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())  # some messages (huggingface_hub's) span lines


if __name__ == "__main__":
    sys.exit(main())
