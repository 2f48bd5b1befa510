"""The test checkpoints: real file layout, load in the official package, and exercise modality switching."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import (
    END_OF_AUDIO, FULL_CONFIG, MIMI_FILE, PROMPTS, TEXT_END, TINY_CONFIG, load_official, official, official_generate,
    official_prompt, stream_events,
)


def _fixture_tensors(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _fixture_skeleton_keys(config: dict) -> set:
    """The official model's state_dict keys (parameters and persistent buffers)."""
    from conftest import _official_skeleton

    return set(_official_skeleton(config).state_dict())


def test_fixture_file_set(tiny_ckpt):
    names = {p.name for p in tiny_ckpt.iterdir()}
    assert {"config.json", "model.safetensors", MIMI_FILE, "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja"} <= names, names
    assert json.loads((tiny_ckpt / "config.json").read_text()) == TINY_CONFIG


def test_fixture_model_file_keys_and_dtypes(tiny_ckpt):
    official()
    sd = _fixture_tensors(tiny_ckpt / "model.safetensors")
    assert set(sd) == _fixture_skeleton_keys(TINY_CONFIG), "keys must be exactly the official state_dict's"
    for k, v in sd.items():
        want = torch.int64 if k == "codebook_offsets" or k.endswith("num_batches_tracked") else torch.bfloat16
        assert v.dtype == want, (k, v.dtype)
    assert sd["codebook_offsets"].tolist() == [2049 * k for k in range(8)]
    # tie=True: the official to_logits IS the embedding; the file holds two equal copies
    for k in range(TINY_CONFIG["codebooks"]):
        assert torch.equal(sd[f"depth_embeddings.{k}.to_logits.weight"], sd[f"depth_embeddings.{k}.embedding.weight"])
    # tie_audio_embeddings=False: separate, different tensors
    assert not torch.equal(sd["audio_embedding.to_logits.weight"], sd["audio_embedding.embedding.weight"])
    # randomised everywhere: no all-zero or all-one float tensors
    for k, v in sd.items():
        if v.is_floating_point() and v.numel() > 8:
            assert v.float().std() > 0, k


def test_fixture_mimi_file(tiny_ckpt):
    sd = _fixture_tensors(tiny_ckpt / MIMI_FILE)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert "decoder_transformer.transformer.layers.0.self_attn.in_proj_weight" in sd
    assert "decoder_transformer.transformer.layers.0.self_attn.out_proj.weight" in sd
    assert not any("in_projs" in k or "out_projs" in k for k in sd)
    assert len(sd) == 318 and sum(v.numel() for v in sd.values()) > 90e6  # the whole codec, encoder too


def test_fixture_loads_in_official(tiny_ckpt):
    model, processor = load_official(tiny_ckpt)
    sd = _fixture_tensors(tiny_ckpt / "model.safetensors")
    own = model.state_dict()
    for k, v in sd.items():  # every tensor was loaded (none left at the constructor's random init)
        assert torch.equal(own[k], v.to(own[k].dtype)), k
    assert own["lfm.embed_tokens.weight"].dtype == torch.float32
    codes = torch.randint(0, 2048, (1, 8, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wave = processor.mimi.decode(codes)  # loads the Mimi file strictly (renaming attention keys)
    assert wave.shape == (1, 1, 6 * 1920)
    assert 0.01 < float(wave.pow(2).mean().sqrt()) < 1.0, "random codes should decode to audible audio"


def _fixture_assert_sequential(items):
    """text -> <|audio_start|> -> audio frames -> end-of-audio frame -> text."""
    ev = stream_events(items)
    assert isinstance(ev[0], tuple) and ev[0][0] == "text", ev
    i = ev.index("audio_start")
    assert ev[i + 1][0] == "audio" and "end_of_audio" in ev[i + 1:], ev
    j = ev.index("end_of_audio", i)
    assert len(ev) > j + 1, f"no text after the end-of-audio frame: {ev}"
    return ev


def _fixture_assert_varied(items):
    text = [v for k, v in items if k == "text"]
    frames = torch.tensor([v for k, v in items if k == "audio" and v != [END_OF_AUDIO] * 8])
    assert len(set(text)) >= 3, text
    assert all(len(set(frames[:, k].tolist())) >= 3 for k in range(8)), frames
    assert len({tuple(f) for f in frames.tolist()}) >= frames.shape[0] // 3, frames


def _fixture_assert_interleaved(items, config):
    """n_text text tokens (fewer if <|text_end|>), then audio frames; a text_end or end-of-audio switch."""
    ev = stream_events(items)
    first_frame = next(i for i, (k, _) in enumerate(items) if k == "audio")
    n_text = config["interleaved_n_text"]
    assert first_frame == n_text or 0 < first_frame < n_text and items[first_frame - 1] == ("text", TEXT_END), ev
    assert "end_of_audio" in ev or "text_end" in ev, ev
    assert any(k == "text" for k, _ in items[first_frame:]), f"never back to text: {ev}"
    return ev


def _fixture_greedy_margins(model, processor, task, max_new_tokens):
    """Official greedy stream for `task`, and the smallest (top1 - top2) / std of every logit vector."""
    margins = []

    def record(logits):
        top = logits.topk(2).values
        margins.append(float((top[0] - top[1]) / logits.std()))
        return logits

    text_sampler = model._sample_text_token
    model._sample_text_token = lambda logits, **kw: text_sampler(record(logits), **kw)
    for emb in model.depth_embeddings:
        emb.get_logits = lambda x, f=emb.get_logits: record(f(x))
    try:
        items = official_generate(model, official_prompt(processor, task), PROMPTS[task][3], max_new_tokens)
    finally:
        del model._sample_text_token
        for emb in model.depth_embeddings:
            del emb.get_logits
    return items, min(margins)


@pytest.fixture(scope="module")
def fixture_tiny_runs(tiny_ckpt):
    """Official greedy streams (and smallest logit margins) on the tiny fixture: tts and chat, 100 items."""
    model, processor = load_official(tiny_ckpt)
    return {task: _fixture_greedy_margins(model, processor, task, 100) for task in ("tts", "chat")}


def test_fixture_tiny_sequential_switches(fixture_tiny_runs):
    items, _ = fixture_tiny_runs["tts"]
    _fixture_assert_sequential(items)
    _fixture_assert_varied(items)


def test_fixture_tiny_interleaved_switches(fixture_tiny_runs):
    items, _ = fixture_tiny_runs["chat"]
    _fixture_assert_interleaved(items, TINY_CONFIG)
    _fixture_assert_varied(items)


def test_fixture_tiny_greedy_is_far_from_ties(fixture_tiny_runs):
    """Greedy choices must not hinge on float32 rounding: top-1 beats top-2 by > 1e-5 logit std."""
    for task, (_, margin) in fixture_tiny_runs.items():
        assert margin > 1e-5, (task, margin)


@pytest.mark.full_size
def test_fixture_full_size_switches(full_ckpt):
    """The full-size fixture (real config) switches modality in both modes with varied output."""
    official()
    sd_keys = set(safe_open(str(full_ckpt / "model.safetensors"), "pt").keys())
    assert sd_keys == _fixture_skeleton_keys(FULL_CONFIG) and len(sd_keys) == 931
    model, processor = load_official(full_ckpt)
    items, margin = _fixture_greedy_margins(model, processor, "tts", 60)
    _fixture_assert_sequential(items)
    _fixture_assert_varied(items)
    assert margin > 1e-5, margin
    items, margin = _fixture_greedy_margins(model, processor, "chat", 60)
    _fixture_assert_interleaved(items, FULL_CONFIG)
    _fixture_assert_varied(items)
    assert margin > 1e-5, margin
