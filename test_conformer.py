"""Audio in (conformer.py) against the official liquid-audio code: resampler, mel front end, encoder, adapter.

The official encoder and ours are built once per module at the real encoder config with the same random
weights (every parameter and BatchNorm buffer randomised).
"""

import copy
import math

import numpy as np
import pytest
import soundfile as sf
import torch

import conformer
from conftest import ASSETS, FULL_CONFIG, load_wav, official

_CONFORMER_CFG = FULL_CONFIG  # the real config.json
# the recordings are mono: `(wave,), sr = load_wav(path)` takes the one channel of [1, T] (and checks it is one)
_CONFORMER_LFM_DIM = _CONFORMER_CFG["lfm"]["hidden_size"]


def _conformer_randomise(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter and buffer with non-trivial random values (fan-in scaled, so 17 layers stay finite)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():  # these tensors share storage with the module's
            if not t.is_floating_point():
                t.fill_(7)  # BatchNorm num_batches_tracked
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0, generator=g)
            elif t.dim() >= 2:
                t.normal_(0.0, t[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight"):  # LayerNorm / BatchNorm scales
                t.normal_(1.0, 0.2, generator=g)
            else:  # biases, running means
                t.normal_(0.0, 0.2, generator=g)


@pytest.fixture(scope="module")
def _conformer_models():
    """(official encoder, official adapter, our encoder, our adapter), same random weights, eval mode."""
    official()
    from liquid_audio.model.conformer.encoder import ConformerEncoder
    from liquid_audio.model.mlp import MLP

    ref = ConformerEncoder(**_CONFORMER_CFG["encoder"]).eval()
    ref_adapter = MLP(ref._feat_out, _CONFORMER_LFM_DIM, [_CONFORMER_LFM_DIM]).eval()  # as LFM2AudioModel
    _conformer_randomise(ref, 1)
    _conformer_randomise(ref_adapter, 2)
    ours = conformer.ConformerEncoder(conformer.EncoderConfig.from_dict(_CONFORMER_CFG["encoder"])).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    adapter = conformer.AudioAdapter(ref._feat_out, _CONFORMER_LFM_DIM).eval()
    adapter.load_state_dict(ref_adapter.state_dict(), strict=True)
    return ref, ref_adapter, ours, adapter


@pytest.fixture(scope="module")
def _conformer_preprocessor():
    official()
    from liquid_audio.model.conformer.processor import AudioToMelSpectrogramPreprocessor

    return AudioToMelSpectrogramPreprocessor(**_CONFORMER_CFG["preprocessor"]).eval()


def _conformer_official_mel(proc, wave: torch.Tensor, sr: int) -> torch.Tensor:
    """The official ChatState.add_audio front end: resample to 16 kHz, full length, mel [128, T]."""
    import torchaudio.functional

    wave = torchaudio.functional.resample(wave[None], sr, 16000)
    mel, _ = proc(wave, torch.tensor([wave.shape[1]]))
    return mel[0]


def _conformer_official_encode(ref, ref_adapter, mels: list[torch.Tensor]):
    """The official LFM2AudioModel._prefill audio path: pad, encode, drop padding, adapt."""
    lengths = torch.tensor([m.shape[1] for m in mels])
    padded = torch.nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True).mT
    with torch.no_grad():
        enc, enc_len = ref(padded, lengths)  # [B, D, T']
        keep = torch.arange(enc.shape[-1])[None] < enc_len[:, None]
        emb = ref_adapter(enc.mT[keep])
    return enc.mT, enc_len, emb


def _conformer_encode(ours, adapter, mels: list[torch.Tensor]):
    batch, lengths = conformer.pad_mels(mels)
    with torch.no_grad():
        h, h_len = ours(batch, lengths)
        keep = torch.arange(h.shape[1])[None] < h_len[:, None]
        emb = adapter(h[keep])
    return h, h_len, emb


# ---- resampler ----

@pytest.mark.parametrize("orig_sr,new_sr", [(44100, 16000), (48000, 16000), (8000, 16000), (22050, 16000),
                                            (16000, 24000)])
def test_conformer_resample_matches_torchaudio(orig_sr, new_sr):
    official()
    import torchaudio.functional

    g = torch.Generator().manual_seed(orig_sr)
    wave = torch.randn(2, 3, orig_sr // 2 + 17, generator=g)  # batch dims and a length that is not a multiple
    ref = torchaudio.functional.resample(wave, orig_sr, new_sr)
    ours = conformer.resample(wave, orig_sr, new_sr)
    assert ours.shape == ref.shape
    # tolerance: none, the same float32 operations in the same order (measured bit-identical)
    assert torch.equal(ours, ref), f"resample {orig_sr}->{new_sr}: max abs diff {(ours - ref).abs().max()}"


@pytest.mark.parametrize("orig_sr", [44100, 22050, 11025])
def test_conformer_resample_lengths_match_torchaudio(orig_sr):
    # torchaudio rounds new * T / orig to float32 before the ceil, so some lengths come out one sample
    # shorter than the exact ceil. Scan lengths where that can happen (new * T mod orig is 1..3, outputs
    # above 2**16 samples) and random ones; lengths and values must equal torchaudio's exactly.
    official()
    import torchaudio.functional

    g = torch.Generator().manual_seed(orig_sr)
    wave = torch.randn(420_000, generator=g)
    if orig_sr == 44100:
        assert torchaudio.functional.resample(wave[:200_101], 44100, 16000).shape[-1] == 72599
        assert conformer.resample(wave[:200_101], 44100, 16000).shape[-1] == 72599
    gcd = math.gcd(orig_sr, 16000)
    orig, new = orig_sr // gcd, 16000 // gcd
    risky = [n for n in range(100_000, 420_000) if 0 < new * n % orig <= 3]
    lengths = [risky[int(i)] for i in torch.randint(len(risky), (30,), generator=g)]
    lengths += torch.randint(1, 420_000, (70,), generator=g).tolist()
    shorter = 0
    for n in lengths:
        ref = torchaudio.functional.resample(wave[:n], orig_sr, 16000)
        ours = conformer.resample(wave[:n], orig_sr, 16000)
        assert ours.shape == ref.shape, f"{n} samples at {orig_sr} Hz: length {ours.shape[-1]} != {ref.shape[-1]}"
        assert torch.equal(ours, ref), f"{n} samples at {orig_sr} Hz: max abs diff {(ours - ref).abs().max()}"
        shorter += ref.shape[-1] < -(-new * n // orig)
    assert shorter > 0, "the scan should include lengths where torchaudio's float32 rounding drops a sample"


def test_conformer_resample_rejects_huge_kernel():
    # 44101 Hz shares no factor with 16000: the filter bank would be [16000, 1, 44135] (~2.8 GB)
    with pytest.raises(ValueError, match=r"44101 Hz -> 16000 Hz.*convert"):
        conformer.resample(torch.zeros(1000), 44101, 16000)
    with pytest.raises(ValueError, match=r"7999 Hz -> 16000 Hz"):
        conformer.audio_features(torch.zeros(1000), 7999)
    assert conformer.resample(torch.zeros(1000), 44000, 16000).shape == (364,)  # a common factor: fine


# ---- mel front end ----

def test_conformer_mel_filters_match_official(_conformer_preprocessor):
    ref = _conformer_preprocessor.featurizer.fb[0]  # librosa.filters.mel, slaney
    ours = conformer.mel_filters()
    # tolerance: none, the weights are rounded as librosa rounds them
    assert ours.dtype == ref.dtype
    assert torch.equal(ours, ref), f"mel filterbank: max abs diff {(ours - ref).abs().max()}"


def _conformer_write_stereo(tmp_path):
    """A 22.05 kHz 16-bit stereo file whose channels differ -> (path, expected mono wave, sr)."""
    (speech,), sr = load_wav(ASSETS / "question.wav")
    speech = conformer.resample(speech[: 2 * sr], sr, 22050).numpy()
    left, right = speech, 0.5 * np.roll(speech, 300) + 0.05 * np.sin(np.arange(speech.size) * 0.05)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], 1).clip(-1, 1), 22050, subtype="PCM_16")
    data, _ = sf.read(str(path), dtype="float32")  # [T, 2], quantised
    return path, torch.from_numpy(data.mean(1, dtype=np.float32)), 22050


def _conformer_assert_same_mel(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    # float32: max abs diff <= 1e-4 (measured 0: the same operations in the same order); after the
    # official ChatState's bf16 rounding: exactly equal, so the encoder sees the very same input
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"mel {what}: max abs diff {diff} > 1e-4"
    n = (ours.bfloat16() != ref.bfloat16()).sum().item()
    assert n == 0, f"mel {what}: {n} of {ref.numel()} entries differ after bf16 rounding"


@pytest.mark.parametrize("case", ["question", "asr_44k", "stereo", "clip_0.2s", "long_30s"])
def test_conformer_mel_matches_official(case, _conformer_preprocessor, tmp_path):
    if case == "question":
        wave, sr = conformer.load_audio(ASSETS / "question.wav")
        (ref_wave,), _ = load_wav(ASSETS / "question.wav")
    elif case == "asr_44k":
        wave, sr = conformer.load_audio(ASSETS / "asr.wav")
        (ref_wave,), _ = load_wav(ASSETS / "asr.wav")
    elif case == "stereo":
        path, ref_wave, _ = _conformer_write_stereo(tmp_path)
        wave, sr = conformer.load_audio(path)
    elif case == "clip_0.2s":
        (ref_wave,), sr = load_wav(ASSETS / "question.wav")
        ref_wave = ref_wave[16000: 16000 + 3200]
        wave = ref_wave
    else:  # 30 s at 44.1 kHz: asr.wav repeated
        (ref_wave,), sr = load_wav(ASSETS / "asr.wav")
        ref_wave = ref_wave.repeat(2)[: 30 * sr]
        wave = ref_wave
    assert torch.equal(wave, ref_wave), "load_audio must give soundfile's float samples (channel mean)"
    ref = _conformer_official_mel(_conformer_preprocessor, ref_wave, sr)
    ours = conformer.audio_features(wave, sr)
    assert ours.shape == ref.shape == (conformer.N_MELS, 1 + conformer.resample(wave, sr, 16000).numel() // 160)
    _conformer_assert_same_mel(ours, ref, case)
    assert ref.abs().max() > 1, "the mel should not be trivial"


# ---- encoder + adapter ----

def test_conformer_state_dict_matches_official(_conformer_models):
    ref, ref_adapter, ours, adapter = _conformer_models
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert any(k.endswith("running_var") for k in our_sd) and any(k.endswith("num_batches_tracked") for k in our_sd)
    assert {k: v.shape for k, v in adapter.state_dict().items()} == \
        {k: v.shape for k, v in ref_adapter.state_dict().items()}


def _conformer_check(ref_out, our_out, what):
    (r_h, r_len, r_emb), (h, h_len, emb) = ref_out, our_out
    assert torch.equal(h_len, r_len.to(torch.long)), f"{what}: output lengths {h_len} != {r_len}"
    assert h.shape == r_h.shape and emb.shape == r_emb.shape
    for name, a, b in [("encoder", h, r_h), ("adapter", emb, r_emb)]:
        scale = b.abs().max().item()
        diff = (a - b).abs().max().item()
        assert diff <= 1e-4 * scale, f"{what} {name}: max abs diff {diff} > 1e-4 * max|ref| ({scale})"


def test_conformer_encoder_matches_official_batch(_conformer_models, _conformer_preprocessor):
    ref, ref_adapter, ours, adapter = _conformer_models
    (question,), sr_q = load_wav(ASSETS / "question.wav")
    (asr,), sr_a = load_wav(ASSETS / "asr.wav")
    mels = [conformer.audio_features(question, sr_q), conformer.audio_features(asr[: int(2.3 * sr_a)], sr_a)]
    assert mels[0].shape[1] != mels[1].shape[1]
    out = _conformer_encode(ours, adapter, mels)
    _conformer_check(_conformer_official_encode(ref, ref_adapter, mels), out, "batch of 2")
    assert out[1].tolist() == [conformer.emb_len(m.shape[1]) for m in mels]
    # the shorter clip's output must not depend on the padding of the batch
    alone = _conformer_encode(ours, adapter, mels[1:])
    n = int(alone[1][0])
    diff = (out[0][1, :n] - alone[0][0]).abs().max().item()
    assert diff <= 1e-4 * alone[0].abs().max().item(), f"padded vs alone: max abs diff {diff}"


def test_conformer_encoder_matches_official_single(_conformer_models, _conformer_preprocessor):
    ref, ref_adapter, ours, adapter = _conformer_models
    (wave,), sr = load_wav(ASSETS / "question.wav")
    mel = _conformer_official_mel(_conformer_preprocessor, wave, sr)
    _conformer_check(_conformer_official_encode(ref, ref_adapter, [mel]),
                     _conformer_encode(ours, adapter, [mel]), "single clip")


def test_conformer_encoder_matches_official_bf16(_conformer_models):
    # The official model runs in bf16 (LFM2AudioModel.from_pretrained's default dtype): both encoders and
    # adapters cast to bf16, on the same bf16 mels (batch of 2). Tolerance: none, measured bit-identical.
    ref, ref_adapter, ours, adapter = (copy.deepcopy(m).to(torch.bfloat16) for m in _conformer_models)
    (question,), sr_q = load_wav(ASSETS / "question.wav")
    (asr,), sr_a = load_wav(ASSETS / "asr.wav")
    mels = [conformer.audio_features(question, sr_q).bfloat16(),
            conformer.audio_features(asr[: int(2.3 * sr_a)], sr_a).bfloat16()]
    (r_h, r_len, r_emb), (h, h_len, emb) = (_conformer_official_encode(ref, ref_adapter, mels),
                                            _conformer_encode(ours, adapter, mels))
    assert h.dtype == r_h.dtype == emb.dtype == r_emb.dtype == torch.bfloat16
    assert torch.equal(h_len, r_len.to(torch.long))
    for name, a, b in [("encoder", h, r_h), ("adapter", emb, r_emb)]:
        assert a.shape == b.shape and torch.isfinite(b).all() and b.abs().max() > 0.1
        assert torch.equal(a, b), f"bf16 {name}: max abs diff {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("n_samples", [1, 100, 319, 320, 1000, 1281])
def test_conformer_short_audio_matches_official(n_samples, _conformer_models, _conformer_preprocessor):
    # Documented behaviour: any clip of >= 1 sample is accepted, like the official code; fewer than 320
    # samples give an all-zero mel (nothing to normalise over) and at least one embedding.
    ref, ref_adapter, ours, adapter = _conformer_models
    wave = torch.randn(n_samples, generator=torch.Generator().manual_seed(n_samples))
    mel = conformer.log_mel(wave)
    ref_mel = _conformer_official_mel(_conformer_preprocessor, wave, 16000)
    assert mel.shape == ref_mel.shape == (128, 1 + n_samples // 160)
    _conformer_assert_same_mel(mel, ref_mel, f"of {n_samples} samples")
    if n_samples < 320:
        assert not mel.any()
    out = _conformer_encode(ours, adapter, [mel])
    _conformer_check(_conformer_official_encode(ref, ref_adapter, [ref_mel]), out, f"{n_samples} samples")
    assert out[1].item() == conformer.emb_len(mel.shape[1]) >= 1


def test_conformer_emb_len_matches_official():
    official()
    from liquid_audio.utils import mel2emb_len

    n = torch.arange(1, 100)
    assert torch.equal(conformer.emb_len(n), mel2emb_len(n))
    assert [conformer.emb_len(int(i)) for i in n] == [mel2emb_len(int(i)) for i in n]


# ---- loading and bad input ----

def test_conformer_load_audio_formats(tmp_path):
    g = torch.Generator().manual_seed(0)
    signal = (0.5 * torch.randn(4000, 3, generator=g)).clamp(-1, 1).numpy()
    for subtype in ["PCM_16", "PCM_24", "PCM_32", "FLOAT"]:
        path = tmp_path / f"three_channels_{subtype}.wav"
        sf.write(str(path), signal, 8000, subtype=subtype)
        wave, sr = conformer.load_audio(path)
        assert sr == 8000 and wave.dtype == torch.float32 and wave.shape == (4000,)
        diff = (wave - torch.from_numpy(signal.mean(1))).abs().max().item()
        assert diff <= 2**-15, f"{subtype}: the channel mean, scaled to [-1, 1), differs by {diff}"


def test_conformer_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        conformer.load_audio(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(ValueError, match="text.wav"):
        conformer.load_audio(tmp_path / "text.wav")
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match="empty.wav.*no samples"):
        conformer.load_audio(tmp_path / "empty.wav")
    for bad in [np.nan, np.inf]:
        x = np.zeros(1600, np.float32)
        x[5] = bad
        sf.write(str(tmp_path / "nonfinite.wav"), x, 16000, subtype="FLOAT")
        with pytest.raises(ValueError, match="nonfinite.wav.*NaN or infinite"):
            conformer.load_audio(tmp_path / "nonfinite.wav")
        with pytest.raises(ValueError, match="NaN or infinite"):
            conformer.audio_features(torch.from_numpy(x), 16000)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        conformer.log_mel(torch.zeros(0))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        conformer.log_mel(torch.zeros(2, 1600))
    with pytest.raises(ValueError, match="sample rates"):
        conformer.resample(torch.zeros(100), 0, 16000)
    with pytest.raises(ValueError, match="sample rates"):
        conformer.resample(torch.zeros(100), 44100.5, 16000)
    with pytest.raises(ValueError, match="float"):
        conformer.resample(torch.zeros(100, dtype=torch.int16), 8000, 16000)
    ours = conformer.ConformerEncoder(conformer.EncoderConfig(n_layers=1, d_model=64, n_heads=2,
                                                              subsampling_conv_channels=8))
    with pytest.raises(ValueError, match=r"mel must be \[B, 128"):
        ours(torch.zeros(1, 80, 50), torch.tensor([50]))
    with pytest.raises(ValueError, match="subsampling"):
        conformer.EncoderConfig.from_dict({**_CONFORMER_CFG["encoder"], "subsampling": "striding"})
    d_model = _CONFORMER_CFG["encoder"]["d_model"]
    assert conformer.EncoderConfig.from_dict({**_CONFORMER_CFG["encoder"], "feat_out": d_model}).d_model == d_model
    with pytest.raises(ValueError, match="feat_out=1024"):
        conformer.EncoderConfig.from_dict({**_CONFORMER_CFG["encoder"], "feat_out": 1024})
