"""Parity of lfm2audio.py (LFM2 backbone, depthformer, chat prompt, both generation modes) with the official
liquid-audio package and transformers' Lfm2Model: float32 on CPU, the same random checkpoint, the same prompts."""

import copy
import fcntl
import gc
import shutil
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import conformer
import lfm2audio
from conftest import (
    ASSETS, FULL_CONFIG, PROMPTS, build_prompt, cached_checkpoint, load_official, official, official_append,
    official_generate, official_prompt,
)

LFM2AUDIO_RTOL = 1e-4  # hidden states / logits: max abs diff <= 1e-4 * max abs of the reference
LFM2AUDIO_N_TINY = 100  # backbone steps per tiny generation


def _lfm2audio_close(got: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = LFM2AUDIO_RTOL) -> float:
    diff = float((got.float() - ref.float()).abs().max())
    scale = float(ref.float().abs().max())
    assert diff <= rtol * scale, f"{what}: max abs diff {diff:.3g} > {rtol} * {scale:.3g}"
    return diff / scale


def _lfm2audio_prompt(model, task: str) -> lfm2audio.Chat:
    """Our chat state for a conftest PROMPTS task, built from the same turns as conftest.official_prompt."""
    return build_prompt(lfm2audio.Chat(model.tokenizer), task, conformer.load_audio)


def _lfm2audio_assert_same_prompt(chat: lfm2audio.Chat, ochat) -> None:
    """Same text ids, modality flags, audio-out frames, mel lengths and mel features (exactly)."""
    assert chat.text == ochat.text[0].tolist(), "text ids differ"
    assert chat.modality == ochat.modality_flag[0].tolist(), "modality flags differ"
    frames = torch.stack(chat.frames, 1) if chat.frames else torch.zeros(8, 0, dtype=torch.long)
    assert torch.equal(frames, ochat.audio_out.cpu()), "audio-out frames differ"
    assert [m.shape[1] for m in chat.mels] == ochat.audio_in_lens.tolist(), "mel lengths differ"
    if chat.mels:  # bf16-rounded in both (the ChatState default); the mel front end itself is test_conformer's
        mel = torch.cat(chat.mels, 1)
        assert mel.dtype == ochat.audio_in.dtype and torch.equal(mel, ochat.audio_in.cpu()), "mel features differ"


_lfm2audio_official_items = official_generate  # test_perf.py imports this name; to go once it imports conftest's


def _lfm2audio_items(stream) -> list:
    return [(k, v if k == "text" else v.tolist()) for k, v in stream]


def _lfm2audio_check_stream(items: list, n_min: int = 60, both: bool = True) -> None:
    assert len(items) >= n_min, f"only {len(items)} items generated"
    kinds = {k for k, _ in items}
    assert kinds == {"text", "audio"} or not both, f"generation never switched modality ({kinds})"


@pytest.fixture(scope="module")
def lfm2audio_pair(tiny_ckpt):
    """(ours, official model, official processor) on the tiny checkpoint, float32."""
    off, proc = load_official(tiny_ckpt)
    ours = lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.float32, max_seq_len=1024)
    return ours, off, proc


def _lfm2audio_inputs(ours, n: int, seed: int = 0) -> torch.Tensor:
    """Input embeddings [1, n, D] mixing text tokens and audio-out frames, as a real history does."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ours.cfg.vocab_size, (n,), generator=g)
    codes = torch.randint(0, 2048, (8, n), generator=g)
    is_audio = torch.rand(n, generator=g) < 0.5
    with torch.no_grad():
        x = torch.where(is_audio[:, None], ours.embed_audio_out(codes), ours.lfm.embed_tokens(ids))
    return x[None]


def test_lfm2audio_backbone_prefill(lfm2audio_pair):
    """Prefill hidden states and text logits vs transformers' Lfm2Model (eager) and the official model (sdpa)."""
    from transformers import Lfm2Model

    ours, off, _ = lfm2audio_pair
    hf = Lfm2Model(copy.deepcopy(off.lfm.config)).eval()
    hf.set_attn_implementation("eager")
    hf.load_state_dict(off.lfm.state_dict())
    x = _lfm2audio_inputs(ours, 120)
    with torch.no_grad():
        ours.lfm.reset()
        h = ours.lfm(x, torch.arange(x.shape[1]))
        for name, ref in (("transformers", hf(inputs_embeds=x).last_hidden_state),
                          ("official", off.lfm(inputs_embeds=x).last_hidden_state)):
            _lfm2audio_close(h, ref, f"hidden states vs {name}")
            _lfm2audio_close(ours.text_logits(h), F.linear(ref, off.lfm.embed_tokens.weight), f"logits vs {name}")


def test_lfm2audio_backbone_cached_decode(lfm2audio_pair):
    """Prefill, then 32 decode steps one position at a time through the static caches == the full sequence."""
    ours, off, _ = lfm2audio_pair
    x = _lfm2audio_inputs(ours, 72, seed=1)
    n = x.shape[1] - 32
    with torch.no_grad():
        ref = off.lfm(inputs_embeds=x).last_hidden_state[0]
        ours.lfm.reset()
        full = ours.lfm(x, torch.arange(x.shape[1]))[0]
        steps = [ours.prefill(x[:, :n])]
        for i in range(n, x.shape[1]):
            steps.append(ours.decode_one(x[:, i:i + 1], torch.tensor([i])))
    got = torch.stack(steps)  # positions n-1 .. end
    _lfm2audio_close(got, full[n - 1:], "cached decode vs our full recompute")
    _lfm2audio_close(got, ref[n - 1:], "cached decode vs official full sequence")
    assert ours.text_logits(got).argmax(-1).tolist() == F.linear(ref[n - 1:], off.lfm.embed_tokens.weight).argmax(
        -1).tolist()


def test_lfm2audio_depthformer_frames(lfm2audio_pair):
    """Greedy audio frames (8 codebooks through the depthformer) and their input embedding == official."""
    ours, off, _ = lfm2audio_pair
    h = _lfm2audio_inputs(ours, 24, seed=2)[0] * 3
    with torch.no_grad():
        for i in range(h.shape[0]):
            got, ref = ours.sample_audio_frame(h[i]), off._sample_audio_frame(h[i])
            assert got.tolist() == ref.tolist(), f"frame {i}: {got.tolist()} != {ref.tolist()}"
            emb = off.audio_embedding(ref + off.codebook_offsets).sum(0)
            _lfm2audio_close(ours.embed_audio_out(got[:, None])[0], emb, "audio-out embedding")


@pytest.mark.parametrize("mode", ["interleaved", "sequential"])
@pytest.mark.parametrize("task", sorted(PROMPTS))
def test_lfm2audio_greedy_generation(lfm2audio_pair, task, mode):
    """Whole pipeline per task (chat on question.wav, text_chat, asr on asr.wav, tts), in both modes: the
    same prompt, the same prompt embedding, and greedy generation item for item equal to the official
    generate_interleaved / generate_sequential. At least 60 items unless <|im_end|> ended the turn."""
    ours, off, proc = lfm2audio_pair
    ochat, chat = official_prompt(proc, task), _lfm2audio_prompt(ours, task)
    _lfm2audio_assert_same_prompt(chat, ochat)
    with torch.no_grad():
        _lfm2audio_close(ours.embed_prompt(chat), off._prefill(**ochat), "prompt embedding")
    ref = official_generate(off, ochat, mode, LFM2AUDIO_N_TINY)
    got = _lfm2audio_items(ours.generate(chat, mode, LFM2AUDIO_N_TINY))
    assert got == ref
    if len(ref) < LFM2AUDIO_N_TINY:  # stopped: sequential yields the <|im_end|>, interleaved does not
        assert mode == "interleaved" or ref[-1] == ("text", lfm2audio.IM_END)
    else:
        assert len(ref) >= 60


def test_lfm2audio_generation_coverage(lfm2audio_pair):
    """The greedy runs compared above exercise every switch: <|audio_start|>, <|text_end|>, end of audio
    (sequential and interleaved), the 6/12 interleave, and stopping at <|im_end|> (guards the fixture)."""
    ours = lfm2audio_pair[0]
    seen = set()
    for task in PROMPTS:
        for mode in ("interleaved", "sequential"):
            items = _lfm2audio_items(ours.generate(_lfm2audio_prompt(ours, task), mode, LFM2AUDIO_N_TINY))
            kinds = "".join("t" if k == "text" else "a" for k, _ in items)
            for name, hit in (("audio_start", ("text", lfm2audio.AUDIO_START) in items),
                              ("text_end", ("text", lfm2audio.TEXT_END) in items),
                              ("end_of_audio", ("audio", [2048] * 8) in items),
                              ("interleave_6_12", "tttttt" + "a" * 12 + "t" in kinds),
                              ("stop", len(items) < LFM2AUDIO_N_TINY)):
                if hit:
                    seen.add((mode, name))
    need = {("sequential", "audio_start"), ("sequential", "end_of_audio"), ("interleaved", "text_end"),
            ("interleaved", "end_of_audio"), ("interleaved", "interleave_6_12")}
    assert need <= seen, f"not exercised: {sorted(need - seen)}"
    assert {("interleaved", "stop"), ("sequential", "stop")} & seen, "no run stopped at <|im_end|>"


def test_lfm2audio_second_turn(lfm2audio_pair):
    """Speech-to-speech chat, then a second user turn (text + another recording) after appending the first
    turn's output (text ids and audio frames, end-of-audio included): prompts, embeddings, generations equal."""
    ours, off, proc = lfm2audio_pair
    ochat, chat = official_prompt(proc, "chat"), _lfm2audio_prompt(ours, "chat")
    first = official_generate(off, ochat, "interleaved", LFM2AUDIO_N_TINY)
    got = list(ours.generate(chat, "interleaved", LFM2AUDIO_N_TINY))
    assert _lfm2audio_items(got) == first
    official_append(ochat, first)
    chat.append(got)
    wave, rate = conformer.load_audio(ASSETS / "asr.wav")  # a second, longer clip: padded encoder batch
    for c in (ochat, chat):
        c.end_turn()
        c.new_turn("user")
        c.add_text("And this?")
        c.add_audio(wave[None] if c is ochat else wave, rate)
        c.end_turn()
        c.new_turn("assistant")
    _lfm2audio_assert_same_prompt(chat, ochat)
    assert chat.modality.count(lfm2audio.AUDIO_OUT) == sum(k == "audio" for k, _ in first) > 0
    with torch.no_grad():
        _lfm2audio_close(ours.embed_prompt(chat), off._prefill(**ochat), "second-turn prompt embedding")
    ref = official_generate(off, ochat, "interleaved", LFM2AUDIO_N_TINY)
    assert _lfm2audio_items(ours.generate(chat, "interleaved", LFM2AUDIO_N_TINY)) == ref
    _lfm2audio_check_stream(first)
    _lfm2audio_check_stream(ref, both=False)


def test_lfm2audio_seeded_sampling(lfm2audio_pair):
    """Temperature + top-k sampling with the same seed draws the same items as the official code."""
    ours, off, proc = lfm2audio_pair
    params = dict(text_temperature=0.8, text_top_k=20, audio_temperature=0.9, audio_top_k=8)
    ochat, chat = official_prompt(proc, "chat"), _lfm2audio_prompt(ours, "chat")
    torch.manual_seed(1234)
    ref = official_generate(off, ochat, "interleaved", 60, **params)
    torch.manual_seed(1234)
    got = _lfm2audio_items(ours.generate(chat, "interleaved", 60, **params))
    assert got == ref
    torch.manual_seed(1235)
    assert _lfm2audio_items(ours.generate(chat, "interleaved", 60, **params)) != ref, "seed had no effect"


def test_lfm2audio_sample_rules():
    """Greedy for temperature None/0 or top_k 1; top-k never draws outside the k best."""
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0, 2.5])
    for t, k in ((None, None), (0.0, 5), (-1.0, None), (1.0, 1)):
        assert lfm2audio.sample(logits, t, k).tolist() == [1]
    torch.manual_seed(0)
    drawn = {int(lfm2audio.sample(logits, 1.0, 2)) for _ in range(200)}
    assert drawn == {1, 4}


def test_lfm2audio_load_bf16(tiny_ckpt, lfm2audio_pair):
    """bf16 load: weights in bf16, RoPE cos/sin from bf16-rounded inverse frequencies exactly as the official
    bf16 model computes them, hidden states close to the official bf16 model (tolerance 3e-2 relative)."""
    official()
    from liquid_audio import LFM2AudioModel

    ours = lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, max_seq_len=256)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    off = LFM2AudioModel.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, device="cpu").eval()
    x = _lfm2audio_inputs(ours, 200, seed=3)
    with torch.no_grad():
        cos, sin = off.lfm.rotary_emb(x, torch.arange(256)[None])
        assert torch.equal(ours.lfm.rope_cos, cos[0]) and torch.equal(ours.lfm.rope_sin, sin[0])
        ours.lfm.reset()
        _lfm2audio_close(ours.lfm(x, torch.arange(200)), off.lfm(inputs_embeds=x).last_hidden_state,
                         "bf16 hidden states", 3e-2)
    fp32 = lfm2audio_pair[0]
    assert torch.equal(ours.lfm.embed_tokens.weight.float(), fp32.lfm.embed_tokens.weight)  # bf16 file: exact
    chat = _lfm2audio_prompt(ours, "tts")
    assert len(list(ours.generate(chat, "sequential", 8))) > 0


def _lfm2audio_copy_ckpt(src, dst, edit=None):
    """A copy of a checkpoint folder with `edit(state_dict)` applied to model.safetensors."""
    shutil.copytree(src, dst)
    if edit is not None:
        sd = load_file(str(dst / "model.safetensors"))
        edit(sd)
        save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_lfm2audio_load_errors(tiny_ckpt, tmp_path):
    """Missing, mis-shaped and unexpected tensors are named in one ValueError; missing files in a
    FileNotFoundError; a tied weight stored once loads; a too-long prompt is refused."""
    key, bad = "lfm.layers.1.self_attn.k_proj.weight", "depthformer.layers.0.feed_forward.w2.weight"
    folder = _lfm2audio_copy_ckpt(tiny_ckpt, tmp_path / "missing", lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=f"missing tensors: {key}"):
        lfm2audio.LFM2Audio.from_pretrained(folder)

    def reshape(sd):
        sd[bad] = sd[bad][:, :-1].contiguous()
        sd["lfm.extra.weight"] = torch.zeros(2)
    folder = _lfm2audio_copy_ckpt(tiny_ckpt, tmp_path / "shape", reshape)
    with pytest.raises(ValueError, match=f"unexpected tensors: lfm.extra.weight; wrong shapes: {bad}"):
        lfm2audio.LFM2Audio.from_pretrained(folder)

    tied = "depth_embeddings.3.to_logits.weight"
    folder = _lfm2audio_copy_ckpt(tiny_ckpt, tmp_path / "tied", lambda sd: sd.pop(tied))
    model = lfm2audio.LFM2Audio.from_pretrained(folder, max_seq_len=64)
    assert torch.equal(model.depth_embeddings[3].to_logits.weight, model.depth_embeddings[3].embedding.weight)
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        list(model.generate(_lfm2audio_prompt(model, "tts"), "sequential", 60))

    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        lfm2audio.LFM2Audio.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        lfm2audio.LFM2Audio.from_pretrained(tmp_path / "no-such-folder")


@pytest.mark.full_size
def test_lfm2audio_full_size_chat():
    """Full-size config (the real shapes): speech-to-speech chat on question.wav, greedy, item for item equal
    to the official model. Runs under the big-memory lock; one model in memory at a time (< 20 GB)."""
    with open("/tmp/lfm2audio-bigmem.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ckpt = cached_checkpoint(FULL_CONFIG, 0)
        off, proc = load_official(ckpt)
        ochat = official_prompt(proc, "chat")
        t0 = time.perf_counter()
        ref = official_generate(off, ochat, "interleaved", 64)
        t_off = time.perf_counter() - t0
        official_modality = ochat.modality_flag[0].tolist()
        del off, ochat
        gc.collect()
        ours = lfm2audio.LFM2Audio.from_pretrained(ckpt, max_seq_len=256)
        chat = _lfm2audio_prompt(ours, "chat")
        assert chat.modality == official_modality
        t0 = time.perf_counter()
        got = _lfm2audio_items(ours.generate(chat, "interleaved", 64))
        t_ours = time.perf_counter() - t0
        del ours
        gc.collect()
    print(f"full-size greedy, 64 steps: official {t_off:.1f} s, ours {t_ours:.1f} s")
    assert got == ref
    _lfm2audio_check_stream(ref)
