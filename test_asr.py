"""Long recordings: chunked ASR (issue 16). To be folded into test_parity.py (section run.py).

Each chunk's transcript must equal the official ASR of that chunk alone: the official ChatState with the ASR
system prompt and the chunk's 16 kHz wave, generate_sequential, greedy, tiny checkpoint, float32 CPU. The tiny
model's "transcripts" are noise; equality item for item is what counts.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import conformer
import lfm2audio
import run
from conftest import official
from fixtures import ASSETS, PROMPTS, build_prompt, load_wav, official_generate, official_prompt
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
    """Short audio is one span; without pauses the cuts still respect the bounds; a limit below 10 ms cuts every
    10 ms."""
    assert conformer.split_at_pauses(torch.ones(16000 * 30), 16000, 30.0) == [(0, 16000 * 30)]
    assert conformer.split_at_pauses(torch.ones(1), 16000, 30.0) == [(0, 1)]
    tone = torch.sin(torch.arange(16000 * 65) * 0.05)
    spans = conformer.split_at_pauses(tone, 16000, 30.0)
    assert spans[-1][1] == tone.numel() and all(15 * 16000 <= e - s <= 30 * 16000 for s, e in spans[:-1])
    assert conformer.split_at_pauses(torch.ones(1000), 16000, 0.005) == [(i, min(i + 160, 1000))
                                                                        for i in range(0, 1000, 160)]


# ---- batched generation: each sequence equals its generation alone ----

BATCH_N = 100  # backbone steps per answer: every task switches modality within it, some end before it


@pytest.fixture(scope="module")
def batch_pair(tiny_ckpt, official_tiny):
    """(ours, official model, official processor) on the tiny checkpoint, float32."""
    ours = lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.float32, max_seq_len=1024)
    return (ours, *official_tiny)


def _items(stream) -> list:
    return [(k, v if k == "text" else v.tolist()) for k, v in stream]


@pytest.mark.parametrize("mode", ["interleaved", "sequential"])
def test_asr_batched_generation_equals_one_by_one(batch_pair, mode):
    """Prompts of different lengths (the four tasks, 45 to 254 positions; twice, so 8 chats) decoded 3 at a time
    (rows refilled as answers end) and 8 at once: every answer equals the official generation of its prompt
    alone and ours one by one, item for item; answers end at different steps, each on its own."""
    ours, off, proc = batch_pair
    tasks = sorted(PROMPTS) * 2
    chats = [build_prompt(lfm2audio.Chat(ours.tokenizer), t, conformer.load_audio) for t in tasks]
    refs = {t: official_generate(off, official_prompt(proc, t), mode, BATCH_N) for t in PROMPTS}
    for batch_size in (3, 8):
        got = dict(ours.generate_batch(chats, mode, BATCH_N, batch_size))
        assert sorted(got) == list(range(len(chats)))
        for i, task in enumerate(tasks):
            assert _items(got[i]) == refs[task], f"batch of {batch_size}: chat {i} ({task}) differs from official"
    assert ours.lfm.batch == 8  # the caches grew to the batch; one by one uses row 0
    for task in PROMPTS:
        chat = build_prompt(lfm2audio.Chat(ours.tokenizer), task, conformer.load_audio)
        assert _items(ours.generate(chat, mode, BATCH_N)) == refs[task], f"{task} alone"
    lengths = {len(r) for r in refs.values()}
    assert len(lengths) > 1 and min(lengths) < BATCH_N, f"answers should end at different steps: {lengths}"
    assert {k for r in refs.values() for k, _ in r} == {"text", "audio"}


# ---- run.py: every chunk equals the official ASR of that chunk alone ----

@pytest.mark.parametrize("batch", [1, 4])
def test_asr_chunks_match_official(batch, tiny_ckpt, official_tiny, tmp_path):
    """Two files (44.1 kHz and 16 kHz) cut into chunks of at most 6 s, decoded one at a time and 4 at once (5
    chunks: a row is refilled): stdout has a line per chunk with its span under a header per file, each chunk's
    prompt and items (--codes-out) equal the official ASR of the chunk alone, and the .srt files hold the same
    spans and text."""
    r = _run_ok(["--model", tiny_ckpt, "--mode", "asr", "--wav", ASSETS / "asr.wav", "--wav", ASSETS / "question.wav",
                 "--chunk-seconds", 6, "--greedy", "--max-new-tokens", ASR_MAX_NEW, "--device", "cpu",
                 "--batch", batch, "--codes-out", "codes.json", "--text-out", "out.srt"], tmp_path)
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


def test_asr_ten_minute_recording(tiny_ckpt, official_tiny, tmp_path):
    """A 10-minute recording built from the repository's recordings (both, alternating, with pauses of 0.3-1.5 s
    and one silence of 50 s), far past the context as one prompt: transcribed end to end in 8-chunk batches
    without a context error, every chunk accounted for (a line per chunk, the spans tiling the recording, none
    over 30 s; the silent one printed empty and not decoded), and two chunks spot-checked against the official
    ASR of the chunk alone."""
    rng = np.random.default_rng(0)
    pieces, n = [], 0
    for k in range(100):
        if n >= 600 * 16000:
            break
        wave = _official_wave16k(ASSETS / ("asr.wav" if k % 2 == 0 else "question.wav"))
        gap = torch.zeros(50 * 16000 if k == 12 else int(rng.uniform(0.3, 1.5) * 16000))
        pieces += [wave, gap]
        n += wave.numel() + gap.numel()
    wave = torch.cat(pieces)
    sf.write(str(tmp_path / "long.wav"), wave.numpy(), 16000, subtype="FLOAT")
    positions = 1 + wave.numel() // 160 // 8  # as one prompt: its audio positions alone
    assert wave.numel() >= 600 * 16000 and positions > run.CONTEXT
    r = _run_ok(["--model", tiny_ckpt, "--mode", "asr", "--wav", "long.wav", "--greedy", "--max-new-tokens", 12,
                 "--device", "cpu", "--batch", 8, "--codes-out", "codes.json", "--text-out", "long.vtt"], tmp_path)
    spans = conformer.split_at_pauses(wave, 16000, 30.0)
    got = _spans(r.stdout)
    assert [(a, b) for a, b, _ in got] == [(run.timestamp(a / 16000), run.timestamp(b / 16000)) for a, b in spans]
    assert spans[-1][1] == wave.numel() and all(b - a <= 30 * 16000 for a, b in spans)
    silent = [k for k, (a, b) in enumerate(spans) if not wave[a:b].any()]
    assert silent and all(got[k][2] == "" for k in silent)
    decoded = sorted(int(p.stem.split("_")[1]) for p in tmp_path.glob("codes_*.json"))
    assert decoded == [k + 1 for k in range(len(spans)) if k not in silent]
    n = len(spans) - len(silent)
    assert "context" not in r.stderr and r.stderr.count("[asr] ") == n and f"{n}/{n} chunks" in r.stderr
    assert f"{len(spans)} chunks, {wave.numel() / 16000:.1f} s of audio" in r.stderr
    vtt = (tmp_path / "long.vtt").read_text()
    assert vtt.startswith("WEBVTT\n\n") and vtt.count(" --> ") == sum(1 for *_, text in got if text)
    model, processor = official_tiny
    for k in (0, len(spans) - 1):
        a, b = spans[k]
        codes = json.loads((tmp_path / f"codes_{k + 1}.json").read_text())
        assert [tuple(i) for i in codes["items"]] == _official_asr(model, processor, wave[a:b], 12)[1], f"chunk {k}"
