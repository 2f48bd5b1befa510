"""LFM2.5-Audio's LFM2 audio detokenizer (detokenizer.py) against the official `liquid_audio` one, on the random
LFM2.5-shaped fixture (`lfm25_ckpt`: the tiny checkpoint plus a real-size `audio_detokenizer/`), float32 on CPU.

The official module is built exactly as `LFM2AudioProcessor.audio_detokenizer` builds it, minus its `.cuda()`
(`fixtures.official_detokenizer`), and called through `LFM2AudioProcessor.decode`.
"""

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

import fixtures  # .ci/fixtures.py, on the path via conftest
from detokenizer import DELAY, FRAME_SIZE, Detokenizer
from test_parity import RUN_MAX_NEW, _run_error, _run_ok

DETOK = fixtures.DETOKENIZER_DIR
PARITY_TOL = 1e-4  # ours vs official: max abs diff, relative to the official output's peak
STREAM_TOL = 1e-5  # streaming vs whole-sequence: max abs diff, relative to the peak (float32 matmuls of other
#                    shapes round differently; measured 5e-6 over 300 frames)


@pytest.fixture(scope="module")
def ours(lfm25_ckpt) -> Detokenizer:
    return Detokenizer.from_folder(lfm25_ckpt / DETOK)


@pytest.fixture(scope="module")
def processor(lfm25_ckpt):
    return fixtures.official_processor_cpu(lfm25_ckpt)


def _codes(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2048, (batch, 8, frames), generator=torch.Generator().manual_seed(seed))


def _rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("frames", [1, 7, 300])
def test_matches_official_decode(ours, processor, frames):
    codes = _codes(1, frames, frames)
    ref = processor.decode(codes)  # [1, 1920 T]
    assert float(ref.abs().max()) > 0.1, "the fixture should decode to audible noise"
    got = ours.decode(codes)
    assert got.shape == (1, 1, FRAME_SIZE * frames)
    assert _rel_diff(got[:, 0], ref) <= PARITY_TOL


def test_batch_matches_official(ours, processor):
    codes = _codes(2, 20, 1)
    with torch.no_grad():
        ref = processor.audio_detokenizer(codes)  # [2, 1920 T]; the processor's decode takes one sequence
    assert _rel_diff(ours.decode(codes)[:, 0], ref) <= PARITY_TOL


def test_sliding_window_matters(lfm25_ckpt, processor):
    """The parity above would catch a wrong window: with attention over all past steps the output is far off."""
    wide = Detokenizer.from_folder(lfm25_ckpt / DETOK)
    wide.window = 10_000
    codes = _codes(1, 100, 2)
    assert _rel_diff(wide.decode(codes)[:, 0], processor.decode(codes)) > 100 * PARITY_TOL


@pytest.mark.parametrize("chunks", [[1] * 300, [3, 1, 7, 2, 125, 126, 36]], ids=["frame_by_frame", "chunks"])
def test_streaming_equals_whole(ours, chunks):
    codes = _codes(1, sum(chunks), 3)
    whole = ours.decode(codes)
    stream = ours.new_stream(1)
    parts, start = [], 0
    for n in chunks:
        parts.append(ours.decode_step(codes[..., start:start + n], stream))
        start += n
    parts.append(ours.flush(stream))
    lengths = [p.shape[-1] for p in parts]
    # the first call lacks the DELAY samples that need the next frame's spectrum; flush gives the last DELAY
    assert lengths == [FRAME_SIZE * chunks[0] - DELAY] + [FRAME_SIZE * n for n in chunks[1:]] + [DELAY]
    assert DELAY == 480 and DELAY < FRAME_SIZE
    assert _rel_diff(torch.cat(parts, -1), whole) <= STREAM_TOL


def test_stream_batch_and_empty(ours):
    codes = _codes(3, 5, 4)
    stream = ours.new_stream(3)
    assert ours.decode_step(codes[..., :0], stream).shape == (3, 1, 0)
    got = torch.cat([ours.decode_step(codes, stream), ours.flush(stream)], -1)
    assert _rel_diff(got, ours.decode(codes)) <= STREAM_TOL
    assert ours.flush(ours.new_stream(1)).shape == (1, 1, 0)  # nothing decoded, nothing held back
    with pytest.raises(ValueError, match="batch size 1 does not match the stream's 3"):
        ours.decode_step(codes[:1], ours.new_stream(3))


def test_bfloat16_close(lfm25_ckpt, ours):
    """bf16 weights (the spectrum and inverse STFT stay float32): close to float32, not equal."""
    codes = _codes(1, 20, 5)
    half = Detokenizer.from_folder(lfm25_ckpt / DETOK, dtype=torch.bfloat16)
    assert half.lfm.layers[0].feed_forward.w1.weight.dtype == torch.bfloat16
    assert half.istft.window.dtype == torch.float32
    ref = ours.decode(codes)
    got = half.decode(codes)
    assert got.dtype == torch.float32 and 0 < _rel_diff(got, ref) < 0.2


@pytest.mark.parametrize("codes, message", [
    (torch.full((1, 8, 3), 2048), "must be in 0..2047"),
    (torch.zeros(1, 7, 3, dtype=torch.long), "shape [batch, 8, frames]"),
    (torch.zeros(1, 8, 3), "integer"),
])
def test_bad_codes(ours, codes, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ours.decode(codes)


def test_bad_folders(lfm25_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="detokenizer config not found"):
        Detokenizer.from_folder(tmp_path)
    folder = tmp_path / "detok"
    shutil.copytree(lfm25_ckpt / DETOK, folder)
    state = load_file(folder / "model.safetensors")
    del state["lfm.layers.2.self_attn.q_proj.weight"]
    state["lin.weight"] = state["lin.weight"][:-1]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors: lfm.layers.2.self_attn.q_proj.weight; "
                                         r"wrong shapes: lin.weight \(1281, 512\) \(expected \(1282, 512\)\)"):
        Detokenizer.from_folder(folder)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 512}))
    with pytest.raises(ValueError, match="not an LFM2 detokenizer config"):
        Detokenizer.from_folder(folder)


# ---- run.py on the LFM2.5 fixture -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lfm25_official(lfm25_ckpt):
    """(official model, official processor with its detokenizer on the CPU), float32."""
    model, _ = fixtures.load_official(lfm25_ckpt)
    return model, fixtures.official_processor_cpu(lfm25_ckpt)


@pytest.mark.parametrize("task, cli, vocoder", [
    ("chat", ["--wav", str(fixtures.ASSETS / "question.wav")], None),
    ("tts", ["--mode", "tts", "--text", fixtures.PROMPTS["tts"][2]], None),
    ("tts", ["--mode", "tts", "--text", fixtures.PROMPTS["tts"][2]], "mimi"),
])
def test_run_lfm25(task, cli, vocoder, lfm25_ckpt, lfm25_official, tmp_path):
    """run.py on an LFM2.5 folder: the official generation item for item; the wav equals the official decode of
    the generated frames: the LFM2 detokenizer by default (as the official processor's decode), or Mimi."""
    extra = ["--vocoder", vocoder] if vocoder else []
    _run_ok(["--model", lfm25_ckpt, *cli, *extra, "--greedy", "--max-new-tokens", RUN_MAX_NEW, "--device", "cpu",
             "--codes-out", "codes.json", "--out", "answer.wav"], tmp_path)
    model, processor = lfm25_official
    ochat = fixtures.official_prompt(processor, task)
    got = json.loads((tmp_path / "codes.json").read_text())
    assert got["prompt_ids"] == ochat.text[0].tolist()
    want = fixtures.official_generate(model, ochat, fixtures.PROMPTS[task][3], RUN_MAX_NEW, drop_im_end=True)
    assert [tuple(item) for item in got["items"]] == want, "generated items differ from the official generation"
    frames = [v for k, v in want if k == "audio" and fixtures.END_OF_AUDIO not in v]
    assert frames, "the answer should have audio to compare"
    codes = torch.tensor(frames).T[None]  # [1, 8, T]
    with torch.no_grad():
        ref = (processor.mimi.decode(codes)[0] if vocoder == "mimi" else processor.decode(codes))[0].numpy()
    data, rate = sf.read(str(tmp_path / "answer.wav"), dtype="float32")
    assert rate == 24000 and data.shape == ref.shape == (FRAME_SIZE * len(frames),)
    assert float(np.abs(data - ref).max()) <= PARITY_TOL * float(np.abs(ref).max())


def test_run_vocoder_lfm2_needs_the_folder(tiny_ckpt, tmp_path):
    _run_error(["--model", tiny_ckpt, "--text", "Hi", "--vocoder", "lfm2", "--device", "cpu"], tmp_path,
               "no LFM2 detokenizer in this checkpoint")
    _run_error(["--model", tiny_ckpt, "--text", "Hi", "--vocoder", "wavenet"], tmp_path, "--vocoder")


def test_run_lfm25_missing_detokenizer_weights(lfm25_ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(lfm25_ckpt, folder, copy_function=os.link)  # links: no 400 MB copy
    (folder / DETOK / "model.safetensors").unlink()
    _run_error(["--model", folder, "--text", "Hi", "--device", "cpu"], tmp_path, "detokenizer weights not found")



def test_download_includes_the_detokenizer(monkeypatch, lfm25_ckpt):
    """A repo id downloads `audio_detokenizer/` with the other files (LFM2.5-Audio; LFM2-Audio has none)."""
    import huggingface_hub

    import lfm2audio

    asked = {}

    def fake_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(lfm25_ckpt)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert lfm2audio.checkpoint_folder("LiquidAI/LFM2.5-Audio-1.5B") == lfm25_ckpt
    assert asked["repo_id"] == "LiquidAI/LFM2.5-Audio-1.5B"
    assert f"{DETOK}/*" in asked["patterns"] and "model.safetensors" in asked["patterns"]
