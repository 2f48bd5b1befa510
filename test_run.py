"""run.py, the command line: greedy answers of every mode equal the official pipeline item for item (the same
prompt, built as the official README builds it), the streamed wav equals the official Mimi decode of the same
codes, and every bad input ends in one `error:` line and a non-zero exit.

run.py runs as a subprocess on the tiny checkpoint (real file layout, real-size Mimi). The subprocesses get
OMP_NUM_THREADS=1: on a CPU shared with other jobs, two OpenMP threads spin-wait on each other and a Mimi
frame takes seconds instead of ~60 ms; the thread count does not change what is computed.
"""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

import run
from conftest import (
    ASSETS, END_OF_AUDIO, IM_END, MIMI_FILE, PROMPTS, TEXT_END, load_official, official_append, official_generate,
    official_prompt,
)
from mimi import Mimi
from tokenizer import Tokenizer

RUN_PY = Path(__file__).resolve().parent / "run.py"
RUN_MAX_NEW = 40  # backbone steps per answer: enough for text, audio, end of audio and text again
RUN_WAV_ATOL = 1e-4  # streamed wav vs the official whole-sequence Mimi decode: max abs diff


def _run_cli(args, cwd: Path, stdin: str | None = None, **env) -> subprocess.CompletedProcess:
    environment = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | env
    return subprocess.run([sys.executable, str(RUN_PY), *map(str, args)], cwd=cwd, input=stdin or "",
                          capture_output=True, text=True, timeout=900, env=environment)


def _run_ok(args, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    r = _run_cli(args, cwd, stdin)
    assert r.returncode == 0, f"run.py failed ({r.returncode}):\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r


def _run_error(args, cwd: Path, expect: str, stdin: str | None = None, **env) -> str:
    """Run, expecting failure: non-zero exit, exactly one stderr line `error: ...` containing `expect`."""
    r = _run_cli(args, cwd, stdin, **env)
    assert r.returncode != 0, f"expected a failure, got exit 0:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got:\n{r.stderr}"
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def run_official(tiny_ckpt):
    """(official model, official processor) on the tiny checkpoint, float32 on CPU."""
    return load_official(tiny_ckpt)


def _run_check_answer(codes_json: Path, wav: Path | None, ochat, processor, model, mode: str) -> tuple[list, str]:
    """codes JSON == official prompt ids and items; wav == official Mimi decode (wav None: ASR, no audio
    decoded). Returns the items and the answer's text as run.py should print it."""
    got = json.loads(codes_json.read_text())
    assert got["prompt_ids"] == ochat.text[0].tolist(), "prompt ids differ from the official ChatState's"
    want = official_generate(model, ochat, mode, RUN_MAX_NEW, drop_im_end=True)  # run.py writes no final <|im_end|>
    assert [tuple(item) for item in got["items"]] == want, \
        "generated items differ from the official generation (greedy: must be equal)"
    text = processor.text.decode([v for k, v in want if k == "text"], skip_special_tokens=True)
    assert text.strip(), "the answer should have text to compare"
    if wav is None:
        return want, text + "\n"
    frames = [v for k, v in want if k == "audio" and END_OF_AUDIO not in v]
    assert frames, "the answer should have audio to compare"

    with torch.no_grad():
        ref = processor.mimi.decode(torch.tensor(frames).T[None])[0, 0].numpy()  # [1920 * frames]
    data, rate = sf.read(str(wav), dtype="float32")
    assert rate == 24000
    assert data.shape == ref.shape, f"wav has {data.shape[0]} samples, official decode {ref.shape[0]}"
    diff = float(np.abs(data - ref).max())
    assert diff <= RUN_WAV_ATOL, f"wav vs official Mimi decode: max abs diff {diff:.2e} > {RUN_WAV_ATOL}"
    return want, text + "\n"


@pytest.mark.parametrize("task, cli", [
    ("chat", ["--wav", ASSETS / "question.wav"]),
    ("asr", ["--mode", "asr", "--wav", ASSETS / "asr.wav"]),
    ("tts", ["--mode", "tts", "--voice", "uk-male", "--text", PROMPTS["tts"][2]]),
])
def test_run_matches_official(task, cli, tiny_ckpt, run_official, tmp_path):
    r = _run_ok(["--model", tiny_ckpt, *cli, "--greedy", "--max-new-tokens", RUN_MAX_NEW, "--device", "cpu",
                 "--codes-out", "codes.json", "--out", "answer.wav"], tmp_path)
    assert "[time] load" in r.stderr and "first text" in r.stderr, r.stderr
    model, processor = run_official
    ochat = official_prompt(processor, task)  # same system prompt and user turn as the CLI's
    wav = None if task == "asr" else tmp_path / "answer.wav"  # ASR loads no Mimi and writes no audio
    assert (tmp_path / "answer.wav").exists() == (wav is not None)
    _, text = _run_check_answer(tmp_path / "codes.json", wav, ochat, processor, model, PROMPTS[task][3])
    assert r.stdout == text, f"stdout {r.stdout!r} != the answer's text {text!r}"


def test_run_two_turn_chat(tiny_ckpt, run_official, tmp_path):
    question = "What is the capital of France?"
    r = _run_ok(["--model", tiny_ckpt, "--chat", "--greedy", "--max-new-tokens", RUN_MAX_NEW, "--device", "cpu",
                 "--codes-out", "codes.json"], tmp_path, stdin=f"{ASSETS / 'question.wav'}\n{question}\n")  # then EOF
    assert r.stderr.count("[time] load") == 2, r.stderr
    model, processor = run_official
    ochat = official_prompt(processor, "chat")
    first, text1 = _run_check_answer(tmp_path / "codes_1.json", tmp_path / "answer_1.wav", ochat, processor, model,
                                     "interleaved")
    official_append(ochat, first)  # history: the model's own text ids and audio frames
    ochat.end_turn()
    ochat.new_turn("user")
    ochat.add_text(question)
    ochat.end_turn()
    ochat.new_turn("assistant")
    _, text2 = _run_check_answer(tmp_path / "codes_2.json", tmp_path / "answer_2.wav", ochat, processor, model,
                                 "interleaved")
    assert r.stdout == text1 + text2, f"stdout {r.stdout!r} != the answers' text {text1 + text2!r}"


def test_run_chat_bad_line_then_empty_line(tiny_ckpt, tmp_path):
    """A missing wav in --chat is reported and the chat goes on; an empty line ends it cleanly."""
    r = _run_cli(["--model", tiny_ckpt, "--chat", "--device", "cpu"], tmp_path, stdin="nope.wav\n\nignored\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == ["error: nope.wav: no such audio file"], r.stderr
    assert r.stdout == "" and not list(tmp_path.glob("*.wav"))


def test_run_chat_long_text_line(tiny_ckpt, tmp_path):
    """A typed message longer than a file name may be (255 bytes) is a text turn, not a crash of is_file()."""
    message = "Tell me more about that, " * 12  # 300 characters
    r = _run_ok(["--model", tiny_ckpt, "--chat", "--greedy", "--max-new-tokens", 8, "--device", "cpu",
                 "--codes-out", "codes.json"], tmp_path, stdin=f"Hello there.\n{message}\n")
    assert r.stderr.count("[time] load") == 2 and "error" not in r.stderr, r.stderr
    ids = Tokenizer.from_file(tiny_ckpt / "tokenizer.json").encode(message.strip())
    prompt = json.loads((tmp_path / "codes_2.json").read_text())["prompt_ids"]
    assert any(prompt[i:i + len(ids)] == ids for i in range(len(prompt))), "the message is not in turn 2's prompt"


def test_run_chat_context_full(tiny_ckpt, tmp_path):
    """When the history outgrows --context the chat says so and ends (exit 0), rather than crashing."""
    r = _run_cli(["--model", tiny_ckpt, "--chat", "--greedy", "--device", "cpu", "--context", 130,
                  "--max-new-tokens", 30], tmp_path, stdin=f"{ASSETS / 'question.wav'}\nAnd then?\nMore.\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "context full" in r.stderr, r.stderr
    assert (tmp_path / "answer_1.wav").is_file()


def test_run_chat_ctrl_c(tiny_ckpt, tmp_path):
    """Ctrl-C while the chat waits for the next turn: a short message and exit 0, no traceback."""
    p = subprocess.Popen([sys.executable, str(RUN_PY), "--model", str(tiny_ckpt), "--chat", "--greedy",
                          "--max-new-tokens", "20", "--device", "cpu"], cwd=tmp_path, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=os.environ | {"OMP_NUM_THREADS": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored
    try:
        p.stdin.write(f"{ASSETS / 'question.wav'}\n")
        p.stdin.flush()
        first = p.stdout.readline()  # the first answer is printed: the chat is past its start-up
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert first.strip(), "no answer before Ctrl-C"
    assert p.returncode == 0 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted", err
    assert sf.info(str(tmp_path / "answer_1.wav")).frames > 0


def test_run_text_printer_multibyte(tiny_ckpt):
    """Characters whose UTF-8 bytes span tokens are printed whole, never as U+FFFD pieces."""
    tok = Tokenizer.from_file(tiny_ckpt / "tokenizer.json")
    text = "Café 東京都 👩‍👩‍👧 naïve ✓"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs a character split across tokens"
    writes = []

    class Out(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    printer = run.TextPrinter(tok, Out())
    for i in [TEXT_END, *ids, IM_END]:  # control tokens are not printed
        printer.add(i)
    printer.close()
    assert "".join(writes) == text + "\n"
    assert not any("\ufffd" in w for w in writes), writes


def test_run_audio_writer_streams(tiny_ckpt, tmp_path):
    """Each frame is on disk (header included) once written; the file equals the whole-sequence decode."""
    decoder = Mimi.from_file(tiny_ckpt / MIMI_FILE)
    codes = torch.randint(0, 2048, (5, 8), generator=torch.Generator().manual_seed(0))
    writer = run.AudioWriter(tmp_path / "a.wav", decoder)
    assert sf.info(str(tmp_path / "a.wav")).frames == 0
    for n, frame in enumerate(codes, 1):
        writer.write(frame)
        assert sf.info(str(tmp_path / "a.wav")).frames == 1920 * n, "the file lags behind the decoded frames"
    writer.close()
    data, _ = sf.read(str(tmp_path / "a.wav"), dtype="float32")
    ref = decoder.decode(codes.T[None])[0, 0].numpy()
    assert np.abs(data - ref).max() <= RUN_WAV_ATOL  # streaming == whole sequence (tolerance RUN_WAV_ATOL)


# ---- error paths: one line, non-zero exit, no traceback ----

def test_run_error_bad_audio(tmp_path):
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really a wav file" * 10)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)
    sf.write(str(tmp_path / "silent.wav"), np.zeros(16000, dtype=np.float32), 16000)
    _run_error(["--wav", "missing.wav"], tmp_path, "missing.wav: no such audio file")
    _run_error(["--wav", "garbage.wav"], tmp_path, "garbage.wav: cannot read audio")
    _run_error(["--wav", "empty.wav"], tmp_path, "empty.wav")
    _run_error(["--wav", "silent.wav"], tmp_path, "silent.wav: audio is silent")
    _run_error(["--wav", "."], tmp_path, ".: cannot read audio")  # a folder


def test_run_error_bad_options(tmp_path):
    _run_error(["--mode", "translate", "--text", "hi"], tmp_path, "invalid choice: 'translate'")
    _run_error(["--mode", "tts", "--text", "hi", "--voice", "au-male"], tmp_path, "invalid choice: 'au-male'")
    _run_error(["--mode", "tts"], tmp_path, "--mode tts needs --text")
    _run_error(["--mode", "asr"], tmp_path, "--mode asr needs --wav")
    _run_error([], tmp_path, "--wav and/or --text")
    _run_error(["--text", "hi", "--device", "tpu9"], tmp_path, "--device tpu9")
    _run_error(["--text", "hi", "--dtype", "float16"], tmp_path, "invalid choice: 'float16'")  # no fp16 reference
    _run_error(["--text", "hi", "--context", 0], tmp_path, "--context >= 2")


def _run_partial_checkpoint(src: Path, dst: Path, skip: str) -> Path:
    """A copy of checkpoint `src` (symlinks) without the file `skip`."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != skip:
            (dst / f.name).symlink_to(f)
    return dst


def test_run_error_checkpoint(tiny_ckpt, tmp_path):
    for name, expect in [(MIMI_FILE, "Mimi checkpoint not found"), ("config.json", "config.json"),
                         ("tokenizer.json", "tokenizer.json"), ("model.safetensors", "model.safetensors")]:
        folder = _run_partial_checkpoint(tiny_ckpt, tmp_path / name.replace(".", "_"), name)
        _run_error(["--model", folder, "--text", "hi"], tmp_path, expect)
    folder = _run_partial_checkpoint(tiny_ckpt, tmp_path / "missing_tensor", "model.safetensors")
    state = load_file(str(tiny_ckpt / "model.safetensors"))
    del state["depth_linear.weight"]
    save_file(state, str(folder / "model.safetensors"))
    _run_error(["--model", folder, "--text", "hi"], tmp_path, "depth_linear.weight")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    _run_error(["--model", folder, "--text", "hi"], tmp_path, "unreadable safetensors file")
    _run_error(["--model", tmp_path / "no_such_folder", "--text", "hi"], tmp_path, "no_such_folder")


def test_run_error_unwritable_output(tmp_path):
    """Checked before the model loads (no --model here: the default repo is not even looked up)."""
    _run_error(["--text", "hi", "--out", "no/such/dir/a.wav"], tmp_path, "no/such/dir/a.wav: no such folder")
    _run_error(["--text", "hi", "--codes-out", "nowhere/c.json"], tmp_path, "nowhere/c.json: no such folder")
    for out in ["answer.mp3", "answer", "answer.flac"]:
        _run_error(["--text", "hi", "--out", out], tmp_path, f"--out {out}: the answer is written as a wav file")
    (tmp_path / "dir.wav").mkdir()
    _run_error(["--text", "hi", "--out", "dir.wav"], tmp_path, "dir.wav: is a folder")
    _run_error(["--text", "hi", "--codes-out", "."], tmp_path, ".: is a folder")


def test_run_error_offline_cache_miss(tmp_path):
    _run_error(["--model", "nobody/no-such-model", "--text", "hi"], tmp_path, "nobody/no-such-model",
               HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))


def test_run_error_prompt_too_long(tiny_ckpt, tmp_path):
    _run_error(["--model", tiny_ckpt, "--wav", ASSETS / "question.wav", "--context", 50, "--device", "cpu"],
               tmp_path, "prompt too long")


def test_run_error_context_too_large(tiny_ckpt, tmp_path):
    """A --context past the model's positions is refused before caches for it are allocated."""
    limit = json.loads((tiny_ckpt / "config.json").read_text())["lfm"]["max_position_embeddings"]
    _run_error(["--model", tiny_ckpt, "--text", "hi", "--device", "cpu", "--context", limit + 1], tmp_path,
               f"--context {limit + 1}: more positions than the model has ({limit}")
    _run_error(["--model", tiny_ckpt, "--text", "hi", "--device", "cpu", "--context", 10**15], tmp_path,
               "more positions than the model has")


def test_run_asr_without_mimi(tiny_ckpt, tmp_path):
    """ASR needs no Mimi file; the other modes report it missing before reading the model weights."""
    folder = _run_partial_checkpoint(tiny_ckpt, tmp_path / "no_mimi", MIMI_FILE)
    r = _run_ok(["--model", folder, "--mode", "asr", "--wav", ASSETS / "asr.wav", "--greedy", "--max-new-tokens", 8,
                 "--device", "cpu"], tmp_path)
    assert r.stdout.strip() and "[time] load" in r.stderr, r.stderr
    assert not (tmp_path / "answer.wav").exists()
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(b"not safetensors")  # would fail the load, were it read first
    _run_error(["--model", folder, "--text", "hi", "--device", "cpu"], tmp_path, "Mimi checkpoint not found")


def test_run_odd_audio(tiny_ckpt, tmp_path):
    """Odd rates and many channels are heard or refused in one line; a rate pair whose resampling filter bank
    would be huge (44101 Hz -> 16 kHz) is refused before the model loads."""
    rng = np.random.default_rng(0)
    sf.write(str(tmp_path / "r7.wav"), rng.uniform(-0.5, 0.5, 70).astype(np.float32), 7)
    sf.write(str(tmp_path / "r384k.wav"), rng.uniform(-0.5, 0.5, 384000).astype(np.float32), 384000)
    sf.write(str(tmp_path / "ch8.wav"), rng.uniform(-0.5, 0.5, (16000, 8)).astype(np.float32), 16000)
    for name in ["r7.wav", "r384k.wav", "ch8.wav"]:
        r = _run_ok(["--model", tiny_ckpt, "--mode", "asr", "--wav", name, "--greedy", "--max-new-tokens", 4,
                     "--device", "cpu"], tmp_path)
        assert r.stdout.strip(), f"{name}: no transcript\n{r.stderr}"
    sf.write(str(tmp_path / "r44101.wav"), rng.uniform(-0.5, 0.5, 44101).astype(np.float32), 44101)
    _run_error(["--model", tmp_path / "no_such_folder", "--wav", "r44101.wav"], tmp_path,
               "r44101.wav: cannot resample 44101 Hz -> 16000 Hz")
    r = _run_cli(["--model", tiny_ckpt, "--chat", "--greedy", "--max-new-tokens", 4, "--device", "cpu"], tmp_path,
                 stdin="r44101.wav\nHello.\n")  # in --chat: reported, and the chat goes on
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[0].startswith("error: r44101.wav: cannot resample"), r.stderr
    assert r.stderr.count("[time] load") == 1, r.stderr
