"""run.py's own behaviour: bad input and output (one error line, nothing overwritten), the formats it writes,
the chat loop's edges, streaming text and audio, and the options that pick hardware and quantization. The
comparisons of its answers with the official package are in test_parity.py."""

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

import bench
import bench_decode
import checkpoint
import run
import tasks
import transcribe
from conftest import RUN_PY, run_cli, run_error, run_ok
from fixtures import ASSETS, DETOKENIZER_DIR, IM_END, MIMI_FILE, TEXT_END
from mimi import Mimi
from tokenizer import Tokenizer


def test_asr_transcript_formats(tmp_path):
    """txt: a line per chunk; srt and vtt: a cue per chunk with its span; chunks without text left out."""
    cues = [(0.0, 29.5, "Hello there."), (29.5, 45.0, ""), (45.0, 3725.25, "Bye.")]
    want = {
        ".txt": "Hello there.\nBye.\n",
        ".srt": "1\n00:00:00,000 --> 00:00:29,500\nHello there.\n\n2\n00:00:45,000 --> 01:02:05,250\nBye.\n\n",
        ".vtt": "WEBVTT\n\n00:00:00.000 --> 00:00:29.500\nHello there.\n\n00:00:45.000 --> 01:02:05.250\nBye.\n\n",
    }
    for suffix, text in want.items():
        writer = transcribe.TranscriptWriter(tmp_path / f"t{suffix}")
        for cue in cues:
            writer.write(*cue)
        writer.close()
        assert (tmp_path / f"t{suffix}").read_text() == text


def test_asr_errors(tmp_path):
    """Bad ASR options and outputs are one error line, before the model loads; nothing is overwritten."""
    wav, nowhere = ASSETS / "asr.wav", tmp_path / "no_such_folder"
    run_error(["--model", nowhere, "--mode", "asr", "--wav", wav, "--text-out", "t.doc"], tmp_path,
               "give a name ending in .txt, .srt, .vtt")
    (tmp_path / "t.srt").write_text("keep me")
    run_error(["--model", nowhere, "--mode", "asr", "--wav", wav, "--text-out", "t.srt"], tmp_path,
               "t.srt: already exists, not overwritten")
    assert (tmp_path / "t.srt").read_text() == "keep me"
    (tmp_path / "t_2.txt").write_text("keep me")
    run_error(["--model", nowhere, "--mode", "asr", "--wav", wav, "--wav", wav, "--text-out", "t.txt"], tmp_path,
               "t_2.txt: already exists")
    run_error(["--model", nowhere, "--mode", "asr", "--wav", wav, "--wav", "nope.wav"], tmp_path,
               "nope.wav: no such audio file")
    run_error(["--model", nowhere, "--wav", wav, "--wav", wav], tmp_path, "several --wav are for --mode asr")
    run_error(["--model", nowhere, "--wav", wav, "--text-out", "t.txt"], tmp_path, "--text-out")
    for bad in (0, 31):
        run_error(["--model", nowhere, "--mode", "asr", "--wav", wav, "--chunk-seconds", bad], tmp_path,
                   "--chunk-seconds must be between")


def test_bench_decode_reports_each_run_and_survives_a_failure(tiny_ckpt, official_tiny, monkeypatch, capsys):
    """bench.py decode, which `.ci/gpu run` runs on a GPU, on the tiny checkpoint in fp32: each implementation's
    figures are printed as a JSON line when it finishes, ours gives the official package's items; an
    implementation that raises is reported, the others still run, and the exit status says so."""
    args = ["decode", "--model", str(tiny_ckpt), "--steps", "40", "--context", "512"]
    res = bench.main(args)
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"run"')]
    assert [r["run"] for r in runs] == ["official", "ours"]
    assert res["same_items"] and res["failed_runs"] == 0
    assert all(r["ttfa_s"] > 0 and r["chat"]["n_audio"] > 0 for r in runs), "no audio in the chat run"
    real_init = bench_decode._Ours.__init__

    def init(self, *a, quantize=None, **kw):
        if quantize:
            raise RuntimeError("planted failure")
        real_init(self, *a, quantize=quantize, **kw)
    monkeypatch.setattr(bench_decode._Ours, "__init__", init)
    with pytest.raises(SystemExit, match="1 run"):
        bench.main(args + ["--no-official", "--quantize", "int8"])
    out = capsys.readouterr()
    assert "planted failure" in out.err and [json.loads(line)["run"] for line in out.out.splitlines()
                                            if line.startswith('{"run"')] == ["ours"]


def test_dtype_auto_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, torch.float32)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert tasks.pick_dtype("auto", cpu) == expected
    assert tasks.pick_dtype("float32", cpu) == torch.float32


def test_run_tts_int8(tiny_ckpt, tmp_path):
    """run.py --quantize int8 writes the answer; the timing line names the dtype auto picked and int8."""
    r = run_cli(["--model", tiny_ckpt, "--mode", "tts", "--text", "Hello there", "--quantize", "int8", "--greedy",
                  "--max-new-tokens", "40", "--out", tmp_path / "a.wav", "--codes-out", tmp_path / "a.json"],
                 tmp_path, dtype=None)  # no --dtype: the timing line names the dtype auto picked
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    dtype = "bfloat16" if tasks.cpu_has_bf16() else "float32"
    assert f"(cpu {dtype} int8)" in r.stderr, r.stderr
    assert (tmp_path / "a.json").is_file() and (tmp_path / "a.wav").is_file()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_run_compiled_quantized_equals_eager(tiny_ckpt, tmp_path, scheme):
    """run.py --compile --quantize int8 / int4 (compiled at load by a warm-up step, on the CPU): the same TTS
    codes as eager, greedy; the warm-up's writes to the caches do not leak into the answer."""
    codes = {}
    for extra in ([], ["--compile"]):
        out = tmp_path / f"codes{len(extra)}.json"
        r = run_cli(["--model", tiny_ckpt, "--mode", "tts", "--text", "Hello there", "--quantize", scheme,
                      "--greedy", "--max-new-tokens", "40", "--out", tmp_path / f"a{len(extra)}.wav",
                      "--codes-out", out, *extra], tmp_path, dtype="bfloat16")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        codes[bool(extra)] = json.loads(out.read_text())
    assert codes[True] == codes[False] and codes[False]


def test_run_int8_bad_input(tiny_ckpt, tmp_path):
    """A truncated weights file, and an unknown scheme: one error line, non-zero exit."""
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:len(data) - 1000])
    for args, expect in [(["--model", broken, "--quantize", "int8"], "unreadable safetensors file"),
                         (["--model", tiny_ckpt, "--quantize", "int3"], "invalid choice: 'int3'")]:
        r = run_cli([*args, "--text", "hi"], tmp_path, dtype=None)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], \
            r.stderr


def test_run_vocoder_lfm2_needs_the_folder(tiny_ckpt, tmp_path):
    run_error(["--model", tiny_ckpt, "--text", "Hi", "--vocoder", "lfm2", "--device", "cpu"], tmp_path,
               "no LFM2 detokenizer in this checkpoint")
    run_error(["--model", tiny_ckpt, "--text", "Hi", "--vocoder", "wavenet"], tmp_path, "--vocoder")


def test_run_lfm25_missing_detokenizer_weights(lfm25_ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(lfm25_ckpt, folder, copy_function=os.link)  # links: no 400 MB copy
    (folder / DETOKENIZER_DIR / "model.safetensors").unlink()
    run_error(["--model", folder, "--text", "Hi", "--device", "cpu"], tmp_path, "detokenizer weights not found")


def test_download_includes_the_detokenizer(monkeypatch, lfm25_ckpt):
    """A repo id downloads `audio_detokenizer/` with the other files (LFM2.5-Audio; LFM2-Audio has none)."""
    asked = {}

    def fake_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(lfm25_ckpt)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert checkpoint.checkpoint_folder("LiquidAI/LFM2.5-Audio-1.5B") == lfm25_ckpt
    assert asked["repo_id"] == "LiquidAI/LFM2.5-Audio-1.5B"
    assert f"{DETOKENIZER_DIR}/*" in asked["patterns"] and "model.safetensors" in asked["patterns"]


def test_run_chat_bad_line_then_empty_line(tiny_ckpt, tmp_path):
    """A missing wav in --chat is reported and the chat goes on; an empty line ends it cleanly."""
    r = run_cli(["--model", tiny_ckpt, "--chat", "--device", "cpu"], tmp_path, stdin="nope.wav\n\nignored\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == ["error: nope.wav: no such audio file"], r.stderr
    assert r.stdout == "" and not list(tmp_path.glob("*.wav"))


def test_run_chat_long_text_line(tiny_ckpt, tmp_path):
    """A typed message longer than a file name may be (255 bytes) is a text turn, not a crash of is_file()."""
    message = "Tell me more about that, " * 12  # 300 characters
    r = run_ok(["--model", tiny_ckpt, "--chat", "--greedy", "--max-new-tokens", 8, "--device", "cpu",
                 "--codes-out", "codes.json"], tmp_path, stdin=f"Hello there.\n{message}\n")
    assert r.stderr.count("[time] load") == 2 and "error" not in r.stderr, r.stderr
    ids = Tokenizer.from_file(tiny_ckpt / "tokenizer.json").encode(message.strip())
    prompt = json.loads((tmp_path / "codes_2.json").read_text())["prompt_ids"]
    assert any(prompt[i:i + len(ids)] == ids for i in range(len(prompt))), "the message is not in turn 2's prompt"


def test_run_chat_context_full(tiny_ckpt, tmp_path):
    """When the history outgrows --context the chat says so and ends (exit 0), rather than crashing."""
    r = run_cli(["--model", tiny_ckpt, "--chat", "--greedy", "--device", "cpu", "--context", 130,
                  "--max-new-tokens", 30], tmp_path, stdin=f"{ASSETS / 'question.wav'}\nAnd then?\nMore.\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "context full" in r.stderr, r.stderr
    assert (tmp_path / "answer_1.wav").is_file()


def test_run_chat_ctrl_c(tiny_ckpt, tmp_path):
    """Ctrl-C while the chat waits for the next turn: a short message and exit 0, no traceback. stdin is a
    terminal, so the chat prompts `you> ` when it waits: the signal is sent once that prompt follows the answer."""
    main, terminal = pty.openpty()
    p = subprocess.Popen([sys.executable, str(RUN_PY), "--model", str(tiny_ckpt), "--chat", "--greedy",
                          "--max-new-tokens", "20", "--device", "cpu"], cwd=tmp_path, text=True,
                         stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=os.environ | {"OMP_NUM_THREADS": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored
    try:
        os.write(main, f"{ASSETS / 'question.wav'}\n".encode())
        seen = ""
        while not re.search(r"\[time\].*\n.*you> $", seen, re.S):  # answered, then waiting for the next turn
            char = p.stderr.read(1)
            assert char, f"run.py ended before waiting for a turn: {seen}"
            seen += char
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
        os.close(main)
        os.close(terminal)
    assert out.strip(), "no answer text before Ctrl-C"
    assert p.returncode == 0 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted", err
    assert sf.info(str(tmp_path / "answer_1.wav")).frames > 0


def test_text_stream_multibyte(tiny_ckpt):
    """Characters whose UTF-8 bytes span tokens are shown whole, never as U+FFFD pieces; control tokens are not
    shown."""
    tok = Tokenizer.from_file(tiny_ckpt / "tokenizer.json")
    text = "Café 東京都 👩‍👩‍👧 naïve ✓"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs a character split across tokens"
    stream = tasks.TextStream(tok)
    pieces = [stream.add(i) for i in [TEXT_END, *ids, IM_END]] + [stream.close()]
    assert "".join(pieces) == stream.text == text
    assert not any("\ufffd" in p for p in pieces), pieces
    assert sum(bool(p) for p in pieces) > 3, "shown as it came, not at the end"


def test_run_audio_writer_streams(tiny_ckpt, tmp_path):
    """Each frame is on disk (header included) once written; the file equals the whole-sequence decode."""
    decoder = Mimi.from_file(tiny_ckpt / MIMI_FILE)
    codes = torch.randint(0, 2048, (5, 8), generator=torch.Generator().manual_seed(0))
    stream = decoder.new_stream(1)
    writer = run.AudioWriter(tmp_path / "a.wav")
    assert sf.info(str(tmp_path / "a.wav")).frames == 0
    for n, frame in enumerate(codes, 1):
        writer.write(decoder.decode_step(frame.view(1, -1, 1), stream)[0, 0])
        assert sf.info(str(tmp_path / "a.wav")).frames == 1920 * n, "the file lags behind the decoded frames"
    writer.close()
    data, _ = sf.read(str(tmp_path / "a.wav"), dtype="float32")
    ref = decoder.decode(codes.T[None])[0, 0].numpy()
    # streaming == whole sequence within 1e-5, as the Mimi streaming test holds (measured 1.1e-6, peak 1.16)
    err = np.abs(data - ref).max()
    assert err <= 1e-5, f"streamed file vs whole-sequence decode: max abs diff {err:.2e} > 1e-5"


def test_run_error_bad_audio(tmp_path):
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really a wav file" * 10)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)
    sf.write(str(tmp_path / "silent.wav"), np.zeros(16000, dtype=np.float32), 16000)
    run_error(["--wav", "missing.wav"], tmp_path, "missing.wav: no such audio file")
    run_error(["--wav", "garbage.wav"], tmp_path, "garbage.wav: cannot read audio")
    run_error(["--wav", "empty.wav"], tmp_path, "empty.wav")
    run_error(["--wav", "silent.wav"], tmp_path, "silent.wav: audio is silent")
    run_error(["--wav", "."], tmp_path, ".: cannot read audio")  # a folder


def test_run_error_bad_options(tmp_path):
    run_error(["--mode", "translate", "--text", "hi"], tmp_path, "invalid choice: 'translate'")
    run_error(["--mode", "tts", "--text", "hi", "--voice", "au-male"], tmp_path, "invalid choice: 'au-male'")
    run_error(["--mode", "tts"], tmp_path, "--mode tts needs --text")
    run_error(["--mode", "asr"], tmp_path, "--mode asr needs --wav")
    run_error([], tmp_path, "--wav and/or --text")
    run_error(["--text", "hi", "--device", "tpu9"], tmp_path, "--device tpu9")
    run_error(["--text", "hi", "--dtype", "float16"], tmp_path, "invalid choice: 'float16'")  # no fp16 reference
    run_error(["--text", "hi", "--context", 0], tmp_path, "--context >= 2")
    run_error(["--text", "hi", "--decode-frames", 0], tmp_path, "--decode-frames must be >= 1")


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
        run_error(["--model", folder, "--text", "hi"], tmp_path, expect)
    folder = _run_partial_checkpoint(tiny_ckpt, tmp_path / "missing_tensor", "model.safetensors")
    state = load_file(str(tiny_ckpt / "model.safetensors"))
    del state["depth_linear.weight"]
    save_file(state, str(folder / "model.safetensors"))
    run_error(["--model", folder, "--text", "hi"], tmp_path, "depth_linear.weight")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    run_error(["--model", folder, "--text", "hi"], tmp_path, "unreadable safetensors file")
    run_error(["--model", tmp_path / "no_such_folder", "--text", "hi"], tmp_path, "no_such_folder")


def test_run_error_unwritable_output(tmp_path):
    """Checked before the model loads (no --model here: the default repo is not even looked up)."""
    run_error(["--text", "hi", "--out", "no/such/dir/a.wav"], tmp_path, "no/such/dir/a.wav: no such folder")
    run_error(["--text", "hi", "--codes-out", "nowhere/c.json"], tmp_path, "nowhere/c.json: no such folder")
    for out in ["answer.mp3", "answer", "answer.flac"]:
        run_error(["--text", "hi", "--out", out], tmp_path, f"--out {out}: the answer is written as a wav file")
    (tmp_path / "dir.wav").mkdir()
    run_error(["--text", "hi", "--out", "dir.wav"], tmp_path, "dir.wav: is a folder")
    run_error(["--text", "hi", "--codes-out", "."], tmp_path, ".: is a folder")


def test_run_error_offline_cache_miss(tmp_path):
    run_error(["--model", "nobody/no-such-model", "--text", "hi"], tmp_path, "nobody/no-such-model",
               HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))


def test_run_error_prompt_too_long(tiny_ckpt, tmp_path):
    run_error(["--model", tiny_ckpt, "--wav", ASSETS / "question.wav", "--context", 50, "--device", "cpu"],
               tmp_path, "prompt too long")


def test_run_error_context_too_large(tiny_ckpt, tmp_path):
    """A --context past the model's positions is refused before caches for it are allocated."""
    limit = json.loads((tiny_ckpt / "config.json").read_text())["lfm"]["max_position_embeddings"]
    run_error(["--model", tiny_ckpt, "--text", "hi", "--device", "cpu", "--context", limit + 1], tmp_path,
               f"--context {limit + 1}: more positions than the model has ({limit}")
    run_error(["--model", tiny_ckpt, "--text", "hi", "--device", "cpu", "--context", 10**15], tmp_path,
               "more positions than the model has")


def test_run_asr_without_mimi(tiny_ckpt, tmp_path):
    """ASR needs no Mimi file; the other modes report it missing before reading the model weights."""
    folder = _run_partial_checkpoint(tiny_ckpt, tmp_path / "no_mimi", MIMI_FILE)
    r = run_ok(["--model", folder, "--mode", "asr", "--wav", ASSETS / "asr.wav", "--greedy", "--max-new-tokens", 8,
                 "--device", "cpu"], tmp_path)
    assert r.stdout.strip() and "[time] load" in r.stderr, r.stderr
    assert not (tmp_path / "answer.wav").exists()
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(b"not safetensors")  # would fail the load, were it read first
    run_error(["--model", folder, "--text", "hi", "--device", "cpu"], tmp_path, "Mimi checkpoint not found")


def test_run_odd_audio(tiny_ckpt, tmp_path):
    """Odd rates and many channels are heard or refused in one line; a rate pair whose resampling filter bank
    would be huge (44101 Hz -> 16 kHz) is refused before the model loads."""
    rng = np.random.default_rng(0)
    sf.write(str(tmp_path / "r7.wav"), rng.uniform(-0.5, 0.5, 70).astype(np.float32), 7)
    sf.write(str(tmp_path / "r384k.wav"), rng.uniform(-0.5, 0.5, 384000).astype(np.float32), 384000)
    sf.write(str(tmp_path / "ch8.wav"), rng.uniform(-0.5, 0.5, (16000, 8)).astype(np.float32), 16000)
    for name in ["r7.wav", "r384k.wav", "ch8.wav"]:
        r = run_ok(["--model", tiny_ckpt, "--mode", "asr", "--wav", name, "--greedy", "--max-new-tokens", 4,
                     "--device", "cpu"], tmp_path)
        assert r.stdout.strip(), f"{name}: no transcript\n{r.stderr}"
    sf.write(str(tmp_path / "r44101.wav"), rng.uniform(-0.5, 0.5, 44101).astype(np.float32), 44101)
    run_error(["--model", tmp_path / "no_such_folder", "--wav", "r44101.wav"], tmp_path,
               "r44101.wav: cannot resample 44101 Hz -> 16000 Hz")
    r = run_cli(["--model", tiny_ckpt, "--chat", "--greedy", "--max-new-tokens", 4, "--device", "cpu"], tmp_path,
                 stdin="r44101.wav\nHello.\n")  # in --chat: reported, and the chat goes on
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[0].startswith("error: r44101.wav: cannot resample"), r.stderr
    assert r.stderr.count("[time] load") == 1, r.stderr

