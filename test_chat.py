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
from fixtures import ASSETS, PROMPTS, build_prompt, official, official_append, official_generate, official_prompt

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
    monkeypatch.setattr(model, "prefill",
                        lambda x, start=0, row=0: calls.append((start, x.shape[1])) or prefill(x, start, row))
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


def test_chat_stale_caches_prefill_whole(chat_pair, tiny_ckpt, monkeypatch):
    """Anything that makes the cached positions stale is noticed and the whole chat prefilled, with the official
    items: another model's caches, an edited text id, edited audio, another chat run in between, a direct
    prefill. The same history rebuilt from scratch is no change: its positions are reused."""
    ours, off, proc = chat_pair
    other = lfm2audio.LFM2Audio.from_pretrained(tiny_ckpt, dtype=torch.float32, max_seq_len=2048)
    calls = {ours: _record_prefills(ours, monkeypatch), other: _record_prefills(other, monkeypatch)}
    ochat = official_prompt(proc, "chat")
    chat = build_prompt(lfm2audio.Chat(ours.tokenizer), "chat", conformer.load_audio)
    text_chat = build_prompt(lfm2audio.Chat(ours.tokenizer), "text_chat", conformer.load_audio)
    prompt_len = len(chat)
    first = _items(ours.generate(chat, "interleaved", 40))
    assert first[0][0] == "text"
    _next_turn(ochat, first, TURNS[1], official=True)
    _next_turn(chat, first, TURNS[1], official=False)

    def generate(model, what, whole: bool):
        ref = official_generate(off, ochat, "interleaved", 40)
        assert _items(model.generate(chat, "interleaved", 40)) == ref, what
        start = calls[model][-1][0]
        assert (start == 0) == whole and calls[model][-1][1] == len(chat) - start, f"{what}: {calls[model][-1]}"

    list(other.generate(text_chat, "interleaved", 10))  # the other model's caches hold another chat
    generate(other, "another model", whole=True)
    assert ours.cached_prefix(chat.positions()) > 0  # ours still holds turn 1
    i = chat.modality[:prompt_len].count(lfm2audio.TEXT)  # turn 1's answer's first text id
    edited = 777 if chat.text[i] != 777 else 778
    chat.text[i] = ochat.text[0, i] = edited
    assert ours.cached_prefix(chat.positions()) == 0
    generate(ours, "edited text id", whole=True)
    generate(ours, "the same prompt again", whole=True)  # the caches hold its answer too: the prompt's end differs

    # content, not identity: a history rebuilt from scratch continues the caches of an equal one
    def turn_two(items):
        c = build_prompt(lfm2audio.Chat(ours.tokenizer), "chat", conformer.load_audio)
        return _next_turn(c, items, TURNS[1], official=False) or c

    held = build_prompt(lfm2audio.Chat(ours.tokenizer), "chat", conformer.load_audio)
    items = _items(ours.generate(held, "interleaved", 5))
    rebuilt = turn_two(items)
    assert ours.cached_prefix(rebuilt.positions()) == len(held) + 4
    rebuilt.mels[0][5, 7] += 1  # edited audio
    assert ours.cached_prefix(rebuilt.positions()) == 0
    assert ours.cached_prefix(turn_two(items).positions()) == len(held) + 4
    list(ours.generate(text_chat, "interleaved", 5))  # another chat in between
    assert ours.cached_prefix(turn_two(items).positions()) == 0
    list(ours.generate(held, "interleaved", 5))
    assert ours.cached_prefix(turn_two(items).positions()) == len(held) + 4
    ours.prefill(_inputs(ours, 10))  # caches written outside generate
    assert ours.cached_prefix(turn_two(items).positions()) == 0


def _history(chat, exchanges, turn):
    """`chat` (ours, or the official ChatState: official=True) filled with the system turn, then whole exchanges
    (user turn, answer items), then the user `turn` and the assistant header."""
    official = not isinstance(chat, lfm2audio.Chat)
    chat.new_turn("system")
    chat.add_text(PROMPTS["chat"][0])
    chat.end_turn()
    for user, items in exchanges:
        _add_user_turn(chat, user, official)
        (official_append if official else type(chat).append)(chat, items)
        chat.end_turn()
    _add_user_turn(chat, turn, official)
    return chat


def test_chat_drop_oldest_exchange(chat_pair, monkeypatch):
    """Forgetting the oldest exchange leaves exactly the history that never had it (the system turn kept, audio
    clips and frames gone with their turns); the next answer prefills it whole and equals the official chat's."""
    ours, off, proc = chat_pair
    calls = _record_prefills(ours, monkeypatch)
    chat = build_prompt(lfm2audio.Chat(ours.tokenizer), "chat", conformer.load_audio)
    answers = []
    for t in (1, 2):
        answers.append(_items(ours.generate(chat, "interleaved", 40)))
        _next_turn(chat, answers[-1], TURNS[t], official=False)
    n = len(chat)
    want = _history(lfm2audio.Chat(ours.tokenizer), [(TURNS[1], answers[1])], TURNS[2])
    assert chat.drop_oldest_exchange() == n - len(want) > 0
    assert (chat.text, chat.modality, chat.turns) == (want.text, want.modality, want.turns)
    assert [f.tolist() for f in chat.frames] == [f.tolist() for f in want.frames]
    assert len(chat.mels) == len(want.mels) == 1 and torch.equal(chat.mels[0], want.mels[0])
    ochat = _history(official().ChatState(proc), [(TURNS[1], answers[1])], TURNS[2])
    assert _items(ours.generate(chat, "interleaved", 40)) == official_generate(off, ochat, "interleaved", 40)
    assert calls[-1] == (0, len(chat))
    assert chat.drop_oldest_exchange() > 0 and chat.drop_oldest_exchange() == 0  # the latest user turn stays
    assert [role for _, role in chat.turns] == ["system", "user", "assistant"]


def _run_chat(args: list, stdin_lines: list, monkeypatch) -> tuple[list, object]:
    """run.py --chat in this process (stdin: the lines); returns the prefill calls and the model."""
    # float32, as the official reference (--dtype auto is bf16 on CPUs with native bf16)
    args = run.parse_args(["--chat", "--greedy", "--device", "cpu", "--dtype", "float32", *map(str, args)])
    model, decoder, load_s = run.load(args)
    calls = _record_prefills(model, monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in stdin_lines)))
    assert run.run_chat(args, model, decoder, load_s, None) == 0
    return calls, model


def _user_lines(turns) -> list:
    return [ASSETS / v if k == "audio" else v for k, v in turns]


def test_chat_run_py_reuses_caches(tiny_ckpt, official_tiny, tmp_path, monkeypatch, capsys):
    """run.py --chat, 4 turns spoken and typed: each turn after the first prefills only what is new, and each
    answer (prompt ids, items) equals the official multi-turn chat's."""
    calls, _ = _run_chat(["--model", tiny_ckpt, "--max-new-tokens", 40, "--codes-out", tmp_path / "codes.json",
                          "--out", tmp_path / "answer.wav"], _user_lines(TURNS), monkeypatch)
    off, proc = official_tiny
    ochat = official_prompt(proc, "chat")
    for t in range(len(TURNS)):
        if t:
            _next_turn(ochat, ref, TURNS[t], official=True)
        got = json.loads((tmp_path / f"codes_{t + 1}.json").read_text())
        assert got["prompt_ids"] == ochat.text[0].tolist()
        ref = official_generate(off, ochat, "interleaved", 40)
        assert [tuple(i) for i in got["items"]] == ref, f"turn {t + 1}"
        assert calls[t][0] == (0 if t == 0 else len(ochat.modality_flag[0]) - calls[t][1])
    assert len(calls) == len(TURNS) and all(start > 0 for start, _ in calls[1:])
    assert capsys.readouterr().err.count("[time]") == len(TURNS)


def test_chat_run_py_drop_old_turns(tiny_ckpt, official_tiny, tmp_path, monkeypatch, capsys):
    """run.py --chat --drop-old-turns with a small context: instead of ending, the oldest exchanges are forgotten
    and the chat goes on; every answer equals the official chat's on the history kept (system turn first)."""
    turns = TURNS + [("audio", "question.wav"), ("text", "Thanks!")]
    context = 300
    calls, _ = _run_chat(["--model", tiny_ckpt, "--max-new-tokens", 40, "--context", context, "--drop-old-turns",
                          "--codes-out", tmp_path / "codes.json", "--out", tmp_path / "answer.wav"],
                         _user_lines(turns), monkeypatch)
    err = capsys.readouterr().err
    assert err.count("[time]") == len(turns) and "context full, forgot the oldest" in err, err
    off, proc = official_tiny
    answers, kept = [], []  # kept[t]: the first exchange still in turn t's history
    for t, turn in enumerate(turns):
        got = json.loads((tmp_path / f"codes_{t + 1}.json").read_text())
        first = kept[-1] if kept else 0
        while True:  # the history is the one without exchanges 0 .. first-1 for the smallest such first
            ochat = _history(official().ChatState(proc), list(zip(turns[first:t], answers[first:])), turn)
            if got["prompt_ids"] == ochat.text[0].tolist():
                break
            first += 1
            assert first <= t, f"turn {t + 1}: prompt is no official history with whole exchanges dropped"
        room = context - len(ochat.modality_flag[0])
        assert room >= 40 or first == t  # else nothing left to forget: the answer is cut short (asr.wav's turn)
        answers.append([tuple(i) for i in got["items"]])
        assert answers[-1] == official_generate(off, ochat, "interleaved", min(40, room)), f"turn {t + 1}"
        kept.append(first)
    assert kept[-1] > 0, f"exchanges kept from: {kept}"
    assert [start for start, _ in calls].count(0) == 1 + len(set(kept) - {0}), calls
