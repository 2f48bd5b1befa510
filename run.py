"""LFM2-Audio from the command line: speech-to-speech chat, ASR and TTS.

    python run.py --wav assets/question.wav               # spoken answer: text on stdout, audio in answer.wav
    python run.py --text "What is the capital of France?"
    python run.py --mode asr --wav assets/asr.wav         # transcript on stdout
    python run.py --mode asr --wav a.wav --wav b.wav --text-out a.srt   # any length, cut into <= 30 s chunks
    python run.py --mode tts --text "Hello!" --voice uk-female --out hello.wav
    python run.py --chat                                  # multi-turn: type text or a wav path per turn

Text is printed as it is generated; audio is decoded as it is generated and appended to the wav file, so the file
is playable before the answer ends. Errors are one line on stderr (`error: ...`) and a non-zero exit.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import soundfile as sf
import torch

import options
import tasks
import transcribe
from batch import Batch, Sequence
from lfm2audio import IM_END
from mimi import SAMPLE_RATE
from sound import respond

DECODE_FRAMES = 4  # frames per decoder call after an answer's first (BENCHMARKS.md: Mimi in pieces)
BATCH = 8  # ASR chunks decoded together
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def parse_args(argv=None) -> argparse.Namespace:
    p = options.Parser(description="LFM2-Audio-1.5B: speech-to-speech chat, ASR and TTS.")
    p.add_argument("--mode", choices=list(tasks.TASKS), default="chat",
                   help="chat: interleaved text+audio answer (default); asr: transcript; tts: speech of --text")
    p.add_argument("--wav", action="append",
                   help="the user's audio (any rate; multi-channel is averaged to mono); --mode asr takes several")
    p.add_argument("--text", help="the user's text (with --wav: after the audio in the same turn)")
    p.add_argument("--voice", choices=list(tasks.VOICES), default="uk-male", help="TTS voice (default uk-male)")
    p.add_argument("--chat", action="store_true",
                   help="multi-turn: read one turn per line from stdin (a wav path or text); empty line ends")
    p.add_argument("--out", default="answer.wav",
                   help="24 kHz wav of the spoken answer (default answer.wav; --chat: answer_1.wav, ...)")
    p.add_argument("--text-out", help="ASR: also write the transcript as .txt, or .srt/.vtt subtitles with the "
                                      "chunks' time spans (several --wav: FILE_1.srt, ...); never overwrites")
    p.add_argument("--chunk-seconds", type=float, default=transcribe.CHUNK_SECONDS,
                   help=f"ASR: longest chunk a recording is cut into, at its quietest points "
                        f"(default {transcribe.CHUNK_SECONDS:g})")
    p.add_argument("--batch", type=int, default=BATCH,
                   help=f"ASR: chunks decoded at once (default {BATCH}); on a CPU a batch costs little more than one")
    p.add_argument("--codes-out", help="write the prompt ids and generated items as JSON (--chat: FILE_1.json, ...)")
    p.add_argument("--system", help="system prompt (default: the official one of the mode)")
    p.add_argument("--drop-old-turns", action="store_true",
                   help="--chat: when the context is full, forget the oldest exchanges (a question and its answer; "
                        "the system prompt stays) instead of ending the chat")
    p.add_argument("--temperature", type=float, help="text temperature (default: greedy, as the official examples)")
    p.add_argument("--top-k", type=int, help="text top-k")
    p.add_argument("--audio-temperature", type=float, help="audio temperature (default chat 1.0, tts 0.8)")
    p.add_argument("--audio-top-k", type=int, help="audio top-k (default chat 4, tts 64)")
    p.add_argument("--decode-frames", type=int, default=DECODE_FRAMES,
                   help=f"audio frames the decoder takes per call after an answer's first, decoded at once (default "
                        f"{DECODE_FRAMES}, 320 ms): on a CPU more frames per call cost less each, fewer reach the "
                        f"file sooner")
    options.model_options(p)
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.context < 2:
        p.error("--max-new-tokens must be >= 1 and --context >= 2")
    if args.decode_frames < 1 or args.batch < 1:
        p.error("--decode-frames must be >= 1 and --batch >= 1")
    if not 0.1 <= args.chunk_seconds <= transcribe.CHUNK_SECONDS:
        p.error(f"--chunk-seconds must be between 0.1 and {transcribe.CHUNK_SECONDS:g}")
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


def numbered(path: str | None, turn: int | None) -> Path | None:
    """answer.wav -> answer_2.wav for turn 2 of --chat; unchanged for a single answer (turn None)."""
    if path is None:
        return None
    p = Path(path)
    return p if turn is None else p.with_name(f"{p.stem}_{turn}{p.suffix}")


class AudioWriter:
    """Appends decoded audio to a 24 kHz float wav (FLOAT keeps the decoder's samples exactly), flushed after
    every write so the header is current and the file playable while the answer goes on."""

    def __init__(self, path: Path):
        self.file = sf.SoundFile(str(path), "w", samplerate=SAMPLE_RATE, channels=1, subtype="FLOAT")
        self.samples = 0

    def write(self, wave: torch.Tensor):  # wave [n] at 24 kHz
        self.file.write(wave.float().cpu().numpy())
        self.file.flush()
        self.samples += wave.numel()

    def close(self):
        self.file.close()


class ContextFull(ValueError):
    """The prompt leaves no room for an answer."""


def room(args, prompt_len: int, what: str = "answer") -> int:
    """--max-new-tokens, or what the context leaves after a prompt (said on stderr); ContextFull if nothing."""
    max_new = min(args.max_new_tokens, args.context - prompt_len)
    if max_new < 1:
        raise ContextFull(f"the prompt has {prompt_len} positions, the context {args.context} (--context)")
    if max_new < args.max_new_tokens:
        print(f"note: {what} limited to {max_new} tokens by the context of {args.context}", file=sys.stderr)
    return max_new


def write_codes(path: Path, prompt_ids: list, items: list):
    path.write_text(json.dumps({"prompt_ids": prompt_ids, "items": [
        [kind, value if kind == "text" or isinstance(value, list) else value.tolist()] for kind, value in items]}))


def answer(batch: Batch, decoder, chat, args, wav_path: Path, codes_path: Path | None, load_s: float) -> list:
    """The assistant's turn for `chat`: text to stdout, audio to `wav_path`, timing to stderr. Returns the
    generated items, without a final <|im_end|>."""
    seq = Sequence(chat, tasks.TASKS[args.mode].mode, room(args, len(chat)), options.sampling(args, args.mode))
    prompt_ids, items, text = list(chat.text), [], tasks.TextStream(chat.tokenizer)
    out = AudioWriter(wav_path) if decoder is not None else None
    t0, first_text, first_audio = time.perf_counter(), None, None
    try:
        for kind, value in respond(batch.generate(seq), decoder, args.decode_frames):
            if kind == "wave":
                out.write(value)
                first_audio = first_audio or time.perf_counter() - t0
                continue
            items.append((kind, value if kind == "text" else value.tolist()))
            if kind == "text":
                first_text = first_text or time.perf_counter() - t0
                print(text.add(value), end="", flush=True)
    finally:
        if out is not None:
            out.close()
        if rest := text.close() + ("\n" if text.shown else ""):
            print(rest, end="", flush=True)
    if items and items[-1] == ("text", IM_END):  # sequential mode yields it; the turn's end is not content
        items.pop()
    if codes_path is not None:
        write_codes(codes_path, prompt_ids, items)
    audio_s, total = (out.samples if out else 0) / SAMPLE_RATE, time.perf_counter() - t0
    s = lambda t: "-" if t is None else f"{t:.2f} s"  # noqa: E731
    print(f"[time] load {load_s:.2f} s ({batch.model.setup}) | first text {s(first_text)} | first audio "
          f"{s(first_audio)} | {audio_s:.2f} s of audio in {total:.2f} s ("
          + (f"RTF {total / audio_s:.2f}) -> {wav_path}" if audio_s else "no audio)"), file=sys.stderr)
    return items


def run_chat(args, model, decoder, load_s, wave) -> int:
    """One turn per stdin line (a path to an audio file, or text); the history keeps the model's own text ids and
    audio frames, as the official multi-turn example does with ChatState.append. The batch's cache row keeps the
    history between turns: each answer prefills only the new turn."""
    batch, chat = Batch(model, 1), tasks.new_chat(model.tokenizer, system(args))
    if wave is not None or args.text:  # the first turn from the command line
        tasks.add_user_turn(chat, wave, args.text)
    elif not read_user_turn(chat):
        return 0
    for turn in range(1, sys.maxsize):
        if args.drop_old_turns:
            make_room(chat, args)
        try:
            items = answer(batch, decoder, chat, args, numbered(args.out, turn), numbered(args.codes_out, turn),
                           load_s)
        except ContextFull as e:
            print(f"context full: {e}; start a new chat (or raise --context, or use --drop-old-turns)",
                  file=sys.stderr)
            return 0
        chat.append(items)
        chat.end_turn()
        if not read_user_turn(chat):
            return 0


def make_room(chat, args):
    """--drop-old-turns: forget the oldest exchanges until a whole answer fits (the next answer then prefills the
    shortened history whole)."""
    dropped = exchanges = 0
    while args.context - len(chat) < args.max_new_tokens and (n := tasks.drop_oldest_exchange(chat)):
        dropped, exchanges = dropped + n, exchanges + 1
    if dropped:
        print(f"note: context full, forgot the oldest {exchanges} exchange(s), {dropped} positions", file=sys.stderr)


def read_user_turn(chat) -> bool:
    """Add the next stdin line as a user turn (an audio file's path: it ends in an audio suffix or is a file;
    else text); False at EOF or an empty line. A bad audio file is reported and the next line read."""
    while True:
        if sys.stdin.isatty():
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline().strip()
        if not line:  # EOF or an empty line
            return False
        try:
            spoken = line.lower().endswith(AUDIO_SUFFIXES) or Path(line).is_file()
        except (OSError, ValueError):  # a message is often no valid path: over 255 bytes, or with a NUL
            spoken = False
        try:
            wave = tasks.read_audio(line) if spoken else None
            tasks.add_user_turn(chat, wave, None if spoken else line)
            return True
        except (FileNotFoundError, ValueError, OSError) as e:
            print(f"error: {tasks.one_line(e)}", file=sys.stderr)


def run_asr(args, model, load_s: float, waves: list[torch.Tensor], writers: list) -> int:
    """Each --wav chunk by chunk, --batch chunks at once: a line per chunk `[start --> end] text` on stdout (in
    order, under `==> file <==` when there are several files), a progress line per chunk on stderr, --text-out
    and --codes-out (numbered per chunk when there are several) written as chunks finish."""
    t0, first = time.perf_counter(), None
    chunks = transcribe.cut(model, waves, args.chunk_seconds, system(args), args.text)
    todo = [c for c in chunks if c.chat is not None]
    longest = max((len(c.chat) for c in todo), default=0)
    max_new = room(args, longest, "transcripts")
    # caches for this run alone: every row holds a chunk's prompt and transcript, no more (a decode step reads its
    # whole static cache)
    model.setup_caches(longest + max_new, max(1, min(args.batch, len(todo))))
    done = transcribe.transcribe_chunks(model, chunks, args.batch, max_new, options.sampling(args, "asr"))
    for k, c in enumerate(transcribe.in_order(chunks, asr_progress(args, chunks, done, max_new, t0))):
        if len(waves) > 1 and (k == 0 or chunks[k - 1].file != c.file):
            print(f"==> {args.wav[c.file]} <==")
        print(f"[{transcribe.timestamp(c.start)} --> {transcribe.timestamp(c.end)}] {c.text}".rstrip(), flush=True)
        if writers[c.file] is not None:
            writers[c.file].write(c.start, c.end, c.text)
        first = first or time.perf_counter() - t0
    took, total_s = time.perf_counter() - t0, sum(c.end - c.start for c in chunks)
    print(f"[time] load {load_s:.2f} s ({model.setup}) | first text {first or took:.2f} s | {len(chunks)} chunk"
          f"{'s' * (len(chunks) > 1)}, {total_s:.1f} s of audio in {took:.2f} s "
          f"({total_s / took:.1f} s of audio per second)", file=sys.stderr)
    return 0


def asr_progress(args, chunks: list, done, max_new: int, t0: float):
    """The chunks as they are done, each reported on stderr (and --codes-out written) on its way."""
    todo, audio_s, total_s = sum(c.chat is not None for c in chunks), 0.0, sum(c.end - c.start for c in chunks)
    for n, chunk in enumerate(done, 1):
        audio_s += chunk.end - chunk.start
        if chunk.cut:
            print(f"note: {args.wav[chunk.file]} [{transcribe.timestamp(chunk.start)} --> "
                  f"{transcribe.timestamp(chunk.end)}]: the transcript reached --max-new-tokens {max_new} and is cut "
                  "there", file=sys.stderr)
        if args.codes_out:
            write_codes(numbered(args.codes_out, chunks.index(chunk) + 1 if len(chunks) > 1 else None),
                        chunk.chat.text, chunk.items)
        print(f"[asr] {n}/{todo} chunks | {audio_s:.1f} of {total_s:.1f} s of audio | "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        yield chunk


def system(args) -> str:
    return args.system if args.system is not None else tasks.system_prompt(args.mode, args.voice)


def check_outputs(args) -> list[Path | None]:
    """The output paths can be written, checked before the long load; the --text-out file of each --wav
    (numbered when there are several): a known format, a folder to write into, and no existing file."""
    for out in (args.out, args.codes_out):
        if out is not None and Path(out).is_dir():
            raise ValueError(f"{out}: is a folder, give a file name")
        if out is not None and not Path(out).resolve().parent.is_dir():
            raise FileNotFoundError(f"{out}: no such folder to write into")
    if Path(args.out).suffix.lower() != ".wav":  # the answer is written as a float wav, whatever the name says
        raise ValueError(f"--out {args.out}: the answer is written as a wav file, give a name ending in .wav")
    if not args.text_out:
        return [None] * len(args.wav or [])
    if Path(args.text_out).suffix.lower() not in transcribe.FORMATS:
        raise ValueError(f"--text-out {args.text_out}: give a name ending in {', '.join(transcribe.FORMATS)}")
    paths = [numbered(args.text_out, i + 1 if len(args.wav) > 1 else None) for i in range(len(args.wav))]
    for path in paths:
        if path.exists():
            raise ValueError(f"{path}: already exists, not overwritten (remove it or give another --text-out)")
        if not path.resolve().parent.is_dir():
            raise FileNotFoundError(f"{path}: no such folder to write into")
    return paths


def load(args):
    """(model, decoder or None, seconds it took)."""
    t0 = time.perf_counter()
    model, decoder = tasks.load(args.model, args.device, args.dtype, args.quantize, args.compile, args.context,
                                args.vocoder, sound=args.mode != "asr", sampling=options.sampling(args, args.mode))
    return model, decoder, time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?', not a crash
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        text_paths = check_outputs(args)  # bad input or output fails before the long load
        waves = [tasks.read_audio(path) for path in args.wav or []]
        model, decoder, load_s = load(args)
        if args.mode == "asr" and not args.chat:
            writers = [transcribe.TranscriptWriter(p) if p else None for p in text_paths]
            try:
                return run_asr(args, model, load_s, waves, writers)
            finally:
                for w in filter(None, writers):
                    w.close()
        if args.chat:
            return run_chat(args, model, decoder, load_s, waves[0] if waves else None)
        chat = tasks.new_chat(model.tokenizer, system(args))
        tasks.add_user_turn(chat, waves[0] if waves else None, args.text)
        answer(Batch(model, 1), decoder, chat, args, Path(args.out), numbered(args.codes_out, None), load_s)
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
    # written, download failures and cache misses (huggingface_hub's own errors are OSErrors)
    except (FileNotFoundError, ValueError, OSError, sf.SoundFileError) as e:
        print(f"error: {tasks.one_line(e)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
