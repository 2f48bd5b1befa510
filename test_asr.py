"""Long recordings: chunked ASR (issue 16). To be folded into test_parity.py (section run.py).

Each chunk's transcript must equal the official ASR of that chunk alone: the official ChatState with the ASR
system prompt and the chunk's 16 kHz wave, generate_sequential, greedy, tiny checkpoint, float32 CPU. The tiny
model's "transcripts" are noise; equality item for item is what counts.
"""

import json
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import conformer
import run
from conftest import official
from fixtures import ASSETS, PROMPTS, load_wav, official_generate
from test_parity import _run_error, _run_ok

ASR_MAX_NEW = 40  # per chunk: some tiny-model chunks end on <|im_end|> before it, some reach it
SPAN = re.compile(r"^\[(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})\] ?(.*)$")


def _official_wave16k(path: Path) -> torch.Tensor:
    """The recording at 16 kHz [T] as the official processor resamples it (torchaudio)."""
    official()
    import torchaudio

    wave, rate = load_wav(path)
    return torchaudio.functional.resample(wave.mean(0, keepdim=True), rate, 16000)[0]


def _official_asr(model, processor, wave16k: torch.Tensor, max_new: int):
    """The official ASR of one chunk alone: (prompt ids, items without the final <|im_end|>)."""
    from liquid_audio import ChatState

    chat = ChatState(processor)
    chat.new_turn("system")
    chat.add_text(PROMPTS["asr"][0])
    chat.end_turn()
    chat.new_turn("user")
    chat.add_audio(wave16k[None], 16000)  # the official processor takes a wave tensor and its rate
    chat.end_turn()
    chat.new_turn("assistant")
    return chat.text[0].tolist(), official_generate(model, chat, "sequential", max_new, drop_im_end=True)


def _official_text(processor, items) -> str:
    return processor.text.decode([v for k, v in items if k == "text"], skip_special_tokens=True).strip()


def _spans(stdout: str) -> list[tuple[str, str, str]]:
    """(start, end, text) of each chunk line of run.py's stdout; file headers skipped."""
    lines = [line for line in stdout.splitlines() if not line.startswith("==> ")]
    matches = [SPAN.match(line) for line in lines]
    assert all(matches), f"not a chunk line: {lines[[m is None for m in matches].index(True)]!r}"
    return [m.groups() for m in matches]


# ---- splitting ----

def test_asr_split_at_pauses_cuts_in_pauses():
    """Spans tile the recording, none longer than the limit nor (but the last) shorter than half of it, and
    every cut falls in one of the pauses placed in loud noise."""
    rate, rng = 16000, np.random.default_rng(0)
    wave = rng.uniform(-0.5, 0.5, 95 * rate).astype(np.float32)
    pauses = [(t, t + 0.3 + 0.1 * (t % 3)) for t in range(4, 95, 4)]  # one in every 5 s window
    for a, b in pauses:
        wave[int(a * rate):int(b * rate)] *= 1e-3
    spans = conformer.split_at_pauses(torch.from_numpy(wave), rate, 10.0)
    assert spans[0][0] == 0 and spans[-1][1] == wave.size
    assert all(e == s2 for (_, e), (s2, _) in zip(spans, spans[1:])), "spans must tile the recording"
    lengths = [(e - s) / rate for s, e in spans]
    assert max(lengths) <= 10.0 and min(lengths[:-1]) >= 5.0, lengths
    for _, cut in spans[:-1]:
        assert any(a * rate <= cut <= b * rate for a, b in pauses), f"cut at {cut / rate:.2f} s is not in a pause"


def test_asr_split_at_pauses_edges():
    """Short audio is one span; without pauses the cuts still respect the bounds; a limit below 10 ms cuts every 10 ms."""
    assert conformer.split_at_pauses(torch.ones(16000 * 30), 16000, 30.0) == [(0, 16000 * 30)]
    assert conformer.split_at_pauses(torch.ones(1), 16000, 30.0) == [(0, 1)]
    tone = torch.sin(torch.arange(16000 * 65) * 0.05)
    spans = conformer.split_at_pauses(tone, 16000, 30.0)
    assert spans[-1][1] == tone.numel() and all(15 * 16000 <= e - s <= 30 * 16000 for s, e in spans[:-1])
    assert conformer.split_at_pauses(torch.ones(1000), 16000, 0.005) == [(i, min(i + 160, 1000))
                                                                        for i in range(0, 1000, 160)]


# ---- run.py: every chunk equals the official ASR of that chunk alone ----

def test_asr_chunks_match_official(tiny_ckpt, official_tiny, tmp_path):
    """Two files (44.1 kHz and 16 kHz) cut into chunks of at most 6 s: stdout has a line per chunk with its span
    under a header per file, each chunk's prompt and items (--codes-out) equal the official ASR of the chunk
    alone, and the .srt files hold the same spans and text."""
    r = _run_ok(["--model", tiny_ckpt, "--mode", "asr", "--wav", ASSETS / "asr.wav", "--wav", ASSETS / "question.wav",
                 "--chunk-seconds", 6, "--greedy", "--max-new-tokens", ASR_MAX_NEW, "--device", "cpu",
                 "--codes-out", "codes.json", "--text-out", "out.srt"], tmp_path)
    model, processor = official_tiny
    got, k, ended, cut = _spans(r.stdout), 0, 0, 0
    assert r.stdout.count("==> ") == 2
    for f, name in enumerate(["asr.wav", "question.wav"]):
        wave = _official_wave16k(ASSETS / name)
        spans = conformer.split_at_pauses(wave, 16000, 6.0)
        cues = []
        for a, b in spans:
            k += 1
            prompt_ids, items = _official_asr(model, processor, wave[a:b], ASR_MAX_NEW)
            codes = json.loads((tmp_path / f"codes_{k}.json").read_text())
            assert codes["prompt_ids"] == prompt_ids, f"chunk {k}: prompt differs from the official ChatState's"
            assert [tuple(i) for i in codes["items"]] == items, f"chunk {k}: items differ from the official ASR"
            if len(items) == ASR_MAX_NEW:  # no <|im_end|>: cut by the bound, and said so
                assert f"{name} [{run.timestamp(a / 16000)} --> {run.timestamp(b / 16000)}]: the transcript " \
                       f"reached --max-new-tokens {ASR_MAX_NEW}" in r.stderr, r.stderr
                cut += 1
            else:
                ended += 1
            span = (run.timestamp(a / 16000), run.timestamp(b / 16000), _official_text(processor, items))
            assert got[k - 1] == span, f"chunk {k}: stdout line {got[k - 1]} != {span}"
            if span[2]:
                cues.append(f"{len(cues) + 1}\n{span[0].replace('.', ',')} --> {span[1].replace('.', ',')}\n"
                            f"{span[2]}\n\n")
        assert (tmp_path / f"out_{f + 1}.srt").read_text() == "".join(cues)
    assert k == len(got) >= 5 and ended and cut, "every chunk compared; some end on <|im_end|>, some are cut"
    assert r.stderr.count("[asr] ") == k and f"{k} chunks" in r.stderr


def test_asr_transcript_formats(tmp_path):
    """txt: a line per chunk; srt and vtt: a cue per chunk with its span; chunks without text left out."""
    cues = [(0.0, 29.5, "Hello there."), (29.5, 45.0, ""), (45.0, 3725.25, "Bye.")]
    want = {
        ".txt": "Hello there.\nBye.\n",
        ".srt": "1\n00:00:00,000 --> 00:00:29,500\nHello there.\n\n2\n00:00:45,000 --> 01:02:05,250\nBye.\n\n",
        ".vtt": "WEBVTT\n\n00:00:00.000 --> 00:00:29.500\nHello there.\n\n00:00:45.000 --> 01:02:05.250\nBye.\n\n",
    }
    for suffix, text in want.items():
        writer = run.TranscriptWriter(tmp_path / f"t{suffix}")
        for cue in cues:
            writer.write(*cue)
        writer.close()
        assert (tmp_path / f"t{suffix}").read_text() == text


def test_asr_errors(tmp_path):
    """Bad ASR options and outputs are one error line, before the model loads; nothing is overwritten."""
    wav, nowhere = ASSETS / "asr.wav", tmp_path / "no_such_folder"
    _run_error(["--model", nowhere, "--mode", "asr", "--wav", wav, "--text-out", "t.doc"], tmp_path,
               "give a name ending in .txt, .srt, .vtt")
    (tmp_path / "t.srt").write_text("keep me")
    _run_error(["--model", nowhere, "--mode", "asr", "--wav", wav, "--text-out", "t.srt"], tmp_path,
               "t.srt: already exists, not overwritten")
    assert (tmp_path / "t.srt").read_text() == "keep me"
    (tmp_path / "t_2.txt").write_text("keep me")
    _run_error(["--model", nowhere, "--mode", "asr", "--wav", wav, "--wav", wav, "--text-out", "t.txt"], tmp_path,
               "t_2.txt: already exists")
    _run_error(["--model", nowhere, "--mode", "asr", "--wav", wav, "--wav", "nope.wav"], tmp_path,
               "nope.wav: no such audio file")
    _run_error(["--model", nowhere, "--wav", wav, "--wav", wav], tmp_path, "several --wav are for --mode asr")
    _run_error(["--model", nowhere, "--wav", wav, "--text-out", "t.txt"], tmp_path, "--text-out")
    for bad in (0, 31):
        _run_error(["--model", nowhere, "--mode", "asr", "--wav", wav, "--chunk-seconds", bad], tmp_path,
                   "--chunk-seconds must be between")
