"""Conversations that keep the backbone caches across turns (issue 13): chunked prefill, cache reuse, staleness,
dropping old turns. Everything against the official multi-turn chat (`ChatState.append` + a full
`generate_interleaved` per turn, greedy) on the tiny test checkpoint, float32 on the CPU.

To be folded into test_parity.py.
"""

import io
import json
import sys

import pytest
import torch

import conformer
import lfm2audio
import run
from fixtures import ASSETS, build_prompt, official_append, official_generate, official_prompt

CHAT_N = 150  # backbone steps per turn: enough for turns that stop at <|im_end|> (turn 2) and at the limit
CHAT_RTOL = 1e-5  # chunked vs whole prefill hidden states: max abs diff <= CHAT_RTOL * max abs of the whole
# the user turns of a conversation: spoken and typed alternating
TURNS = [("audio", "question.wav"), ("text", "What is the capital of France?"), ("audio", "asr.wav"),
         ("text", "Tell me more about it.")]


@pytest.fixture(scope="module")
def chat_pair(tiny_ckpt, official_tiny):
    """(ours, official model, official processor) on the tiny checkpoint, float32."""
    off, proc = official_tiny
    ours = lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.float32, max_seq_len=2048)
    return ours, off, proc


def _record_prefills(model, monkeypatch) -> list:
    """A list that gets (start, number of positions) of each `model.prefill` call."""
    calls, prefill = [], model.prefill
    monkeypatch.setattr(model, "prefill", lambda x, start=0: calls.append((start, x.shape[1])) or prefill(x, start))
    return calls


def _items(stream) -> list:
    return [(k, v if k == "text" else v.tolist()) for k, v in stream]


def _add_user_turn(chat, turn, official: bool):
    """The next user turn (audio or text) on our Chat or the official ChatState; the assistant's opened."""
    kind, value = turn
    chat.new_turn("user")
    if kind == "audio":
        wave, rate = conformer.load_audio(ASSETS / value)
        chat.add_audio(wave[None] if official else wave, rate)
    else:
        chat.add_text(value)
    chat.end_turn()
    chat.new_turn("assistant")


def _next_turn(chat, items, turn, official: bool):
    """The finished answer into the history, as the official demo does; then the next user turn."""
    if official:
        official_append(chat, items)
    else:
        chat.append(items)
    chat.end_turn()
    _add_user_turn(chat, turn, official)


def _close(got, ref, what, rtol=CHAT_RTOL):
    diff, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert diff <= rtol * scale, f"{what}: max abs diff {diff:.3g} > {rtol} * {scale:.3g}"


def _inputs(model, n: int, seed: int = 0) -> torch.Tensor:
    """Input embeddings [1, n, D] mixing text tokens and audio-out frames."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (n,), generator=g)
    codes = torch.randint(0, 2048, (8, n), generator=g)
    with torch.no_grad():
        x = torch.where((torch.rand(n, generator=g) < 0.5)[:, None], model.embed_audio_out(codes),
                        model.lfm.embed_tokens(ids))
    return x[None]


def test_chat_chunked_prefill_equals_whole(chat_pair, monkeypatch):
    """Chunks at any start (lengths 1, 39, 1, 87, 172: the decode-step path included) give the hidden states
    of one whole prefill; so does prefill() in PREFILL_CHUNK pieces, and a prefill continuing from a start."""
    ours = chat_pair[0]
    x = _inputs(ours, 300)
    bounds = [0, 1, 40, 41, 128, 300]
    with torch.no_grad():
        ours.lfm.reset()
        whole = ours.lfm(x, torch.arange(300))[0]
        ours.lfm.reset()
        chunks = torch.cat([ours.lfm(x[:, a:b], torch.arange(a, b))[0] for a, b in zip(bounds, bounds[1:])])
        _close(chunks, whole, "chunks vs whole")
        monkeypatch.setattr(lfm2audio, "PREFILL_CHUNK", 64)
        _close(ours.prefill(x), whole[-1], "prefill in 64-position pieces vs whole")
        ours.prefill(x[:, :170])
        _close(ours.prefill(x[:, 170:], 170), whole[-1], "prefill from 170 after 0..169 vs whole")
    assert not torch.equal(whole[:-1], whole[1:]), "degenerate inputs"


def test_chat_four_turns_reuse_caches(chat_pair, monkeypatch):
    """A 4-turn chat, spoken and typed turns alternating: every turn after the first prefills only its new
    positions (the unfed end of the previous answer, <|im_end|>, the user turn, the assistant header) and
    generates the official multi-turn chat's items exactly."""
    ours, off, proc = chat_pair
    calls = _record_prefills(ours, monkeypatch)
    ochat = official_prompt(proc, "chat")
    chat = build_prompt(lfm2audio.Chat(ours.tokenizer), "chat", conformer.load_audio)
    ends = set()
    for t in range(len(TURNS)):
        if t:
            _next_turn(ochat, ref, TURNS[t], official=True)
            _next_turn(chat, got, TURNS[t], official=False)
            # held: the previous prompt and every item fed back (all but the last one generated)
            fed = len(got) - (len(got) == CHAT_N)  # an interleaved turn ending at <|im_end|> yields all it fed
            assert ours.cached_prefix(chat.positions()) == prompt_len + fed
        assert chat.text == ochat.text[0].tolist() and chat.modality == ochat.modality_flag[0].tolist()
        ref = official_generate(off, ochat, "interleaved", CHAT_N)
        got = _items(ours.generate(chat, "interleaved", CHAT_N))
        assert got == ref, f"turn {t + 1}: items differ from the official chat"
        start = 0 if t == 0 else prompt_len + fed
        assert calls[-1] == (start, len(chat) - start), f"turn {t + 1} prefilled {calls[-1]}"
        assert {k for k, _ in got} == {"text", "audio"}
        ends.add("limit" if len(got) == CHAT_N else "im_end")
        prompt_len = len(chat)
    assert len(calls) == len(TURNS)
    assert ends == {"limit", "im_end"}, f"turn endings covered: {ends}"
