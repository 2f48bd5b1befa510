"""The batch layer (batch.py) and long-form ASR's pieces (transcribe.py) on their own: splitting at pauses, rows kept
for several conversations, sequences that join and leave while others decode, cancellation, per-row settings.
Their answers against the official package are in test_parity.py."""


import numpy as np
import torch

import transcribe


def test_asr_split_at_pauses_cuts_in_pauses():
    """Spans tile the recording, none longer than the limit nor (but the last) shorter than half of it, and
    every cut falls in one of the pauses placed in loud noise."""
    rate, rng = 16000, np.random.default_rng(0)
    wave = rng.uniform(-0.5, 0.5, 95 * rate).astype(np.float32)
    pauses = [(t, t + 0.3 + 0.1 * (t % 3)) for t in range(4, 95, 4)]  # one in every 5 s window
    for a, b in pauses:
        wave[int(a * rate):int(b * rate)] *= 1e-3
    spans = transcribe.split_at_pauses(torch.from_numpy(wave), rate, 10.0)
    assert spans[0][0] == 0 and spans[-1][1] == wave.size
    assert all(e == s2 for (_, e), (s2, _) in zip(spans, spans[1:])), "spans must tile the recording"
    lengths = [(e - s) / rate for s, e in spans]
    assert max(lengths) <= 10.0 and min(lengths[:-1]) >= 5.0, lengths
    for _, cut in spans[:-1]:
        assert any(a * rate <= cut <= b * rate for a, b in pauses), f"cut at {cut / rate:.2f} s is not in a pause"


def test_asr_split_at_pauses_edges():
    """Short audio is one span; without pauses the cuts still respect the bounds; a limit below 10 ms cuts every
    10 ms."""
    assert transcribe.split_at_pauses(torch.ones(16000 * 30), 16000, 30.0) == [(0, 16000 * 30)]
    assert transcribe.split_at_pauses(torch.ones(1), 16000, 30.0) == [(0, 1)]
    tone = torch.sin(torch.arange(16000 * 65) * 0.05)
    spans = transcribe.split_at_pauses(tone, 16000, 30.0)
    assert spans[-1][1] == tone.numel() and all(15 * 16000 <= e - s <= 30 * 16000 for s, e in spans[:-1])
    assert transcribe.split_at_pauses(torch.ones(1000), 16000, 0.005) == [(i, min(i + 160, 1000))
                                                                        for i in range(0, 1000, 160)]



def test_step_runs_over_the_rows_in_use(tiny_ckpt):
    """A step runs over the rows from the first to the last in use: one sequence in row 2 of four steps one row (at
    row 2's caches), with a second in row 0 three rows; a compiled model's fixed shapes step all four. Greedy,
    each answer is its answer alone."""
    from batch import Batch, Sequence
    from lfm2audio import LFM2Audio
    from tasks import TASKS, add_user_turn, new_chat

    model = LFM2Audio.from_pretrained(tiny_ckpt, max_seq_len=256)

    def chat(text):
        c = new_chat(model.tokenizer, TASKS["chat"].system)
        add_user_turn(c, text=text)
        return c
    alone = {t: [(k, int(v) if k == "text" else v.tolist()) for k, v in model.generate(chat(t), "interleaved", 12)]
             for t in ("Hi", "Hello there")}
    steps, decode_one = [], model.decode_one
    model.decode_one = lambda x, pos, row=0: steps.append((len(x), row)) or decode_one(x, pos, row)
    for fixed in (False, True):
        batch, steps[:] = Batch(model, 4), []
        batch.fixed, batch.last_used = fixed, [1, 5, 0, 5]  # the least recently used rows: 2, then 0
        first, got = batch.add(Sequence(chat("Hi"), max_new_tokens=12)), {}
        while batch.busy:
            for seq, item, _ in batch.step():
                if item is not None:
                    got.setdefault(seq, []).append((item[0], int(item[1]) if item[0] == "text" else item[1].tolist()))
            if len(got) == 1 and len(got[first]) == 1:  # a step later, a second sequence joins
                second = batch.add(Sequence(chat("Hello there"), max_new_tokens=12))
        assert (first.row, second.row) == (2, 0)
        if fixed:
            assert set(steps) == {(4, 0)}, steps
        else:  # row 2 alone, rows 0-2 together, then whichever is left
            assert {(1, 2), (3, 0)} <= set(steps) <= {(1, 2), (3, 0), (1, 0)}, steps
        assert got[first] == alone["Hi"] and got[second] == alone["Hello there"]
