"""int8 weight-only quantization and bf16: the int8 layer against its dequantized weights, the streaming load
against quantizing a loaded model, the command line, and (full size) the agreement of bf16 and int8 with
float32, teacher-forced over the same greedy decisions (bench.py accuracy prints the same figures).

The full-size tests load the model in float32, bf16 and int8 one after the other (peak about 6 GB): run them
under `flock /tmp/lfm2audio-bigmem.lock`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bench
import lfm2audio
import run
from conftest import official
from lfm2audio import Int8Linear, LFM2Audio

RUN_PY = Path(__file__).resolve().parent / "run.py"


def test_int8_per_channel_round_trip():
    """Each weight within half a step of its row's scale; the largest magnitude of a row maps to +-127; a
    zero row quantizes to zeros (no NaN scale)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 96, generator=g) * torch.logspace(-3, 1, 300)[:, None]  # rows of very different scale
    w[7] = 0
    q, scales = lfm2audio.int8_per_channel(w)
    assert q.dtype == torch.int8 and scales.shape == (300,) and torch.isfinite(scales).all()
    assert (q[7] == 0).all()
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()
    rows = torch.arange(300) != 7
    assert (q[rows].abs().amax(1) == 127).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_matches_dequantized(dtype):
    """Int8Linear (the CPU int8 kernel, bf16 inside) equals x @ dequantized(W).T + b within bf16 rounding, for
    3-D input and bias, and returns the input's dtype."""
    g = torch.Generator().manual_seed(1)
    dense = nn.Linear(256, 384, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(384, 256, generator=g) / 16)
    layer = lfm2audio._int8_from(dense.weight, dense.bias, torch.bfloat16)
    x = torch.randn(2, 3, 256, generator=g, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
    expected = x.float() @ (layer.weight.float() * layer.scales.float()[:, None]).T + dense.bias.float()
    assert y.dtype == dtype and y.shape == (2, 3, 384)
    assert ((y.float() - expected).norm() / expected.norm()) < 1e-2
    # and the quantization itself is close to the float layer (per-channel int8: well under 1%)
    with torch.no_grad():
        assert ((expected - dense(x).float()).norm() / dense(x).float().norm()) < 1e-2


def test_quantize_rejects_unknown_scheme(tiny_ckpt):
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        LFM2Audio.from_pretrained(tiny_ckpt, quantize="int4")


def test_int8_load_equals_quantizing_loaded_model(tiny_ckpt):
    """from_pretrained(quantize="int8") reads and quantizes the file tensor by tensor; it must give exactly
    the state of quantize() applied to the bf16 model loaded whole. Every linear of the backbone blocks, the
    depthformer and the heads is int8 (the text head an int8 copy of the tied embedding, the codebook heads
    int8 copies of theirs); embeddings, norms, the encoder and the adapter keep the model dtype."""
    streamed = LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, max_seq_len=64, quantize="int8")
    whole = lfm2audio.quantize(LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, max_seq_len=64),
                               torch.bfloat16)
    a, b = streamed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])]
    int8 = {n for n, m in streamed.named_modules() if isinstance(m, Int8Linear)}
    dense = {n for n, m in streamed.named_modules() if isinstance(m, nn.Linear)}
    assert all(n.startswith(("conformer.", "audio_adapter.", "audio_embedding.")) for n in dense), dense
    assert {"text_head", "depth_linear", "depth_embeddings.0.to_logits", "lfm.layers.0.feed_forward.w1",
            "depthformer.layers.0.operator.qkv_proj"} <= int8
    per_block = sum(5 if hasattr(layer, "conv") else 7 for layer in streamed.lfm.layers)  # in/out or q/k/v/o, SwiGLU
    assert len(int8) == per_block + 5 * len(streamed.depthformer.layers) + streamed.cfg.codebooks + 2
    assert streamed.embed_tokens_weight.dtype == torch.bfloat16
    assert streamed.depth_embeddings[0].embedding.weight.dtype == torch.bfloat16
    # the tied tables are still read by the lookups, unquantized and equal to the file's
    plain = LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, max_seq_len=64)
    assert torch.equal(streamed.depth_embeddings[3].embedding.weight, plain.depth_embeddings[3].embedding.weight)
    assert torch.equal(streamed.embed_tokens_weight, plain.embed_tokens_weight)


def test_int8_teacher_forced_tiny(tiny_ckpt):
    """The accuracy machinery on the tiny model: float32 replayed on its own greedy items makes the same
    choices; bf16 and int8 agree with it on most decisions (the tiny model's margins are small, so this bound
    is loose; the full-size test holds the real ones)."""
    res = bench.measure_accuracy(tiny_ckpt, 24, {"bfloat16": {"dtype": torch.bfloat16},
                                                 "int8": {"dtype": torch.bfloat16, "quantize": "int8"}})
    assert res["float32"]["own_choices"] and res["float32"]["agreement"] == 1.0
    assert res["float32"]["decisions"] >= 100
    assert res["bfloat16"]["agreement"] >= 0.95 and res["int8"]["agreement"] >= 0.95, res


def test_dtype_auto_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, torch.float32)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert run.pick_dtype("auto", cpu) == expected
    assert run.pick_dtype("float32", cpu) == torch.float32


def _run(args, cwd):
    return subprocess.run([sys.executable, str(RUN_PY), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def test_run_tts_int8(tiny_ckpt, tmp_path):
    """run.py --quantize int8 writes the answer; the timing line names the dtype auto picked and int8."""
    r = _run(["--model", tiny_ckpt, "--mode", "tts", "--text", "Hello there", "--quantize", "int8", "--greedy",
              "--max-new-tokens", "40", "--out", tmp_path / "a.wav", "--codes-out", tmp_path / "a.json"], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    dtype = "bfloat16" if run.cpu_has_bf16() else "float32"
    assert f"(cpu {dtype} int8)" in r.stderr, r.stderr
    assert (tmp_path / "a.json").is_file() and (tmp_path / "a.wav").is_file()


def test_run_int8_bad_input(tiny_ckpt, tmp_path):
    """A truncated weights file, and an unknown scheme: one error line, non-zero exit."""
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:len(data) - 1000])
    for args, expect in [(["--model", broken, "--quantize", "int8"], "unreadable safetensors file"),
                         (["--model", tiny_ckpt, "--quantize", "int4"], "invalid choice: 'int4'")]:
        r = _run([*args, "--text", "hi"], tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], \
            r.stderr


# ---- full size ----

# measured on the full-size checkpoint: bf16 0.977, int8 0.956 here (32 steps per task); 0.983 and 0.964 with
# bench.py accuracy (48 steps). The floors guard against regressions; the targets (bf16 0.995, int8
# 0.99) are not reached: bf16's flips come from its bf16 activations, int8's from the int8 weights themselves
# (int8 in a float32 model agrees no better)
AGREEMENT_FLOOR = {"bfloat16": 0.96, "int8": 0.94}
AGREEMENT_TARGET = {"bfloat16": 0.995, "int8": 0.99}  # the issue's; not reached (README)


@pytest.mark.full_size
def test_accuracy_full_size(full_ckpt):
    """bf16 and int8 against float32 on the full-size checkpoint, teacher-forced over the greedy float32
    decisions of a spoken chat and a TTS prompt (float32 itself is token-exact with the official package:
    test_parity.py), counted where float32's top-2 margin is clear. Fails below the floors; an expected
    failure (xfail) while below the targets."""
    official()
    res = bench.measure_accuracy(full_ckpt, 32, {"bfloat16": {"dtype": torch.bfloat16},
                                                 "int8": {"dtype": torch.bfloat16, "quantize": "int8"}})
    assert res["float32"]["own_choices"], res
    assert res["float32"]["counted"] >= 200, res
    for name, floor in AGREEMENT_FLOOR.items():
        assert res[name]["agreement"] >= floor, res


@pytest.mark.full_size
def test_run_int8_peak_rss_full_size(full_ckpt, tmp_path):
    """The whole run.py process (int8 model, Mimi, a short TTS answer) stays under 3 GB of RSS: the bf16 file
    is quantized tensor by tensor, never held whole."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", probe, sys.executable, str(RUN_PY), "--model", str(full_ckpt),
                        "--mode", "tts", "--text", "Hello there", "--quantize", "int8", "--max-new-tokens", "12",
                        "--out", str(tmp_path / "a.wav")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    peak_gb = int(r.stdout.split()[-1]) / 2**20
    assert peak_gb < 3.0, peak_gb
