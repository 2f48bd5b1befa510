"""Batched decoding: several sequences in the rows of the model's static caches, one decode step for all.

    batch = Batch(model, rows=8)
    batch.add(Sequence(chat, "sequential"))        # any time, from any thread: it joins at the next step
    while batch.busy:
        for seq, item, over in batch.step():       # one step: (sequence, its new item or None, it is over)
            ...

Three things kept apart, as serving engines do: the model step over the rows (the model's `decode_one`,
`text_step`, `audio_step`), the scheduler (`Batch.step` admits waiting sequences into
free rows between steps and retires finished ones) and the per-sequence state (`Sequence`: its row, mode,
sampling settings, what it generated). Each answer is the one `model.generate` gives for its chat alone (greedy:
item for item; sampled: from other draws, unless every row that samples shares one setting).

A step runs over the rows from the first to the last that are in use (a row costs about as much as the weights
it takes to read on a CPU: one sequence alone runs at the speed of a batch of one); a compiled model
(compiled.py: `fixed_shapes`) steps every row, one graph for all steps.

The caches outlive a sequence: a row keeps its prompt and every item fed back (all but the last), and `held`
records them, one `positions` key per position. A sequence whose chat continues what a free row holds (the
answer appended, a new turn added) goes to that row and prefills only its new positions; otherwise it takes the
free row used least recently. A step may write a free row, so its conv states are kept aside when its sequence
ends and put back when one continues it; its KV writes land past what it holds.
"""

import hashlib
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

import conformer
from lfm2audio import AUDIO_IN, AUDIO_OUT, TEXT, Chat, LFM2Audio, Modality, Sampling


def positions(chat: Chat) -> list:
    """One key per position of the chat, equal exactly when two positions' inputs are: a text id, an audio-out
    frame's 8 codes, or (a fingerprint of the audio-in clip's features, the frame's index in it)."""
    def clip_keys(mel):
        digest = hashlib.sha1(mel.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest()
        return ((str(mel.dtype), digest, j) for j in range(conformer.emb_len(mel.shape[1])))
    keys = {TEXT: iter(chat.text), AUDIO_OUT: (tuple(f.tolist()) for f in chat.frames),
            AUDIO_IN: (key for mel in chat.mels for key in clip_keys(mel))}
    return [next(keys[flag]) for flag in chat.modality]


@dataclass(eq=False)
class Sequence:
    """One answer to produce: the chat (ending with the assistant's header), its mode and settings; the batch
    fills in the rest. `cancel()` may be called from any thread: the row is freed at the next step."""

    chat: Chat
    mode: str = "interleaved"
    max_new_tokens: int = 512
    sampling: Sampling = Sampling()
    seed: int | None = None  # seeds the generator as the sequence is admitted: its draws repeat when it runs alone
    row: int | None = None
    reused: int = 0  # prompt positions its row already held (not prefilled again)
    finish: str | None = None  # "stop" (the turn ended), "length" (max_new_tokens), "cancelled"
    cancelled: bool = False
    turn: Modality | None = None
    steps: int = 0

    def cancel(self):
        self.cancelled = True


class Batch:
    def __init__(self, model: LFM2Audio, rows: int = 1):
        if model.lfm.batch != rows:
            model.setup_caches(model.lfm.max_seq_len, rows)
        w = model.lfm.embed_tokens.weight
        self.model, self.rows = model, rows
        self.running: list[Sequence | None] = [None] * rows
        self.held: list[list] = [[] for _ in range(rows)]  # per row: the keys of the positions its caches hold
        self.saved: list[list | None] = [None] * rows  # per free row: its conv states when its sequence ended
        self.last_used = [0] * rows
        self.clock = itertools.count(1)
        self.waiting: deque[Sequence] = deque()
        self.prefills = model.prefills  # the model's count after our own writes: more means someone else wrote
        self.h = w.new_zeros(rows, w.shape[1])  # [B, D]: each row's last hidden state
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=w.device)  # [B, 1]: where its next input goes
        self.pending: tuple | None = None  # (inputs [B', 1, D], first row, {row: key}) for the next backbone step
        self.fixed = getattr(model, "fixed_shapes", False)  # compiled: every step over every row

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(self.running)

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence; ValueError (nothing queued) if it cannot fit the context or its mode is unknown."""
        self.model.check_room(len(seq.chat), seq.max_new_tokens)
        seq.turn = Modality(seq.mode, self.model.cfg.interleaved_n_text, self.model.cfg.interleaved_n_audio)
        self.waiting.append(seq)
        return seq

    def generate(self, seq: Sequence) -> Iterator[tuple[str, object]]:
        """Add `seq` and step until it is over, yielding its items (for a caller that is the batch's only user)."""
        self.add(seq)
        try:
            while seq.finish is None:
                for s, item, _ in self.step():
                    if s is seq and item is not None:
                        yield item
        finally:
            seq.cancel()  # a caller that stops early frees the row at the next step

    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, tuple | None, bool]]:
        """The backbone step over the items of the last step, then: admit waiting sequences into free rows (each
        prefilled alone, the others wait) and one step of the heads over the rows in use: the text head and/or the
        depthformer (a free row among them computes along, unused), one host sync. Returns (sequence, item or
        None, over) per running row: an item leaves as soon as it is drawn, and the backbone reads it at the
        start of the next step."""
        self._feed_pending()
        events = [(seq, None, True) for seq in self._retire_cancelled()]
        self._admit()
        live = [r for r in range(self.rows) if self.running[r] is not None]
        if not live:
            return events
        lo, hi = (0, self.rows) if self.fixed else (live[0], live[-1] + 1)  # the rows this step runs over
        h, text = self.h[lo:hi], {r: self.running[r] is None or self.running[r].turn.text for r in range(lo, hi)}
        tokens = frames = None
        if any(text[r] for r in live):
            tokens, x = self.model.text_step(h, *self._sampling("text", [r for r in live if text[r]], lo, hi))
            tokens = tokens[:, 0].tolist()  # the host sync of this step
        if not all(text[r] for r in live):
            frames, xa = self.model.audio_step(h, *self._sampling("audio", [r for r in live if not text[r]], lo, hi))
            codes = frames.tolist()  # the host sync of this step (codebook 0 decides what comes next)
            is_text = torch.tensor(list(text.values()), device=xa.device)[:, None, None]
            x = xa if tokens is None else torch.where(is_text, x, xa)
        fed = {}
        for r in live:
            seq, i = self.running[r], r - lo
            item, key = (("text", tokens[i]), tokens[i]) if text[r] else (("audio", frames[i]), tuple(codes[i]))
            emit, done = seq.turn.next(item[0], key if text[r] else key[0])
            seq.steps += 1
            if done or seq.steps == seq.max_new_tokens:
                self._retire(r, "stop" if done else "length")
            else:
                fed[r] = key
            events.append((seq, item if emit else None, seq.finish is not None))
        self.pending = (x, lo, fed) if fed else None
        return events

    def _feed_pending(self):
        """The backbone step over the rows of the last step (one input each, at its position), for its items."""
        if self.pending is None:
            return
        x, lo, fed = self.pending
        self.pending = None
        self.h[lo:lo + len(x)] = self.model.decode_one(x, self.pos[lo:lo + len(x)], lo)
        for r, key in fed.items():
            self.held[r].append(key)
            self.pos[r] += 1

    def _sampling(self, kind: str, rows: list[int], lo: int, hi: int):
        """(temperature, top_k) for the rows that need this head: their one setting when they share it (a
        constant of a compiled graph; a sequence alone draws as `generate` does), else tensors [hi - lo, 1] for
        rows lo .. hi-1 (0: greedy / no top-k)."""
        def setting(seq):  # greedy as (None, None)
            s = seq.sampling
            t, k = (s.text_temperature, s.text_top_k) if kind == "text" else (s.audio_temperature, s.audio_top_k)
            return (None, None) if t is None or t <= 0 or k == 1 else (t, k)
        settings = {setting(self.running[r]) for r in rows}
        if len(settings) == 1:
            return settings.pop()
        t, k = [0.0] * (hi - lo), [0] * (hi - lo)
        for r in rows:
            temperature, top_k = setting(self.running[r])
            t[r - lo], k[r - lo] = temperature or 0.0, top_k or 0
        return torch.tensor(t, device=self.h.device)[:, None], torch.tensor(k, device=self.h.device)[:, None]

    def _admit(self):
        if self.model.prefills != self.prefills:  # the caches were written outside this batch: nothing held holds
            self.held, self.saved = [[] for _ in range(self.rows)], [None] * self.rows
        while self.waiting and None in self.running:
            seq = self.waiting.popleft()
            if seq.cancelled:
                seq.finish = "cancelled"
                continue
            if seq.seed is not None:
                torch.manual_seed(seq.seed)
            keys = positions(seq.chat)
            free = [r for r in range(self.rows) if self.running[r] is None]
            held = [r for r in free if 0 < len(self.held[r]) < len(keys) and keys[:len(self.held[r])] == self.held[r]]
            r = max(held, key=lambda r: len(self.held[r])) if held else min(free, key=self.last_used.__getitem__)
            start = len(self.held[r]) if held else 0
            if start:
                self._conv_states(r, self.saved[r])
            self.h[r] = self.model.prefill(self.model.embed_prompt(seq.chat, start), start, r)
            self.prefills = self.model.prefills
            self.held[r], self.saved[r], self.pos[r] = keys, None, len(keys)
            seq.row, seq.reused, self.running[r] = r, start, seq

    def _retire(self, r: int, finish: str):
        """The sequence in row r is over: its row keeps what it holds, and its conv states are kept aside
        (the next decode step writes every row)."""
        self.running[r].finish = finish
        self.running[r] = None
        self.saved[r] = self._conv_states(r)
        self.last_used[r] = next(self.clock)
        if len(self.held[r]) >= self.model.lfm.max_seq_len:  # no room to continue: the next step writes past it
            self.held[r], self.pos[r] = [], 0

    def _retire_cancelled(self) -> list[Sequence]:
        gone = [seq for seq in self.running if seq is not None and seq.cancelled]
        for seq in gone:
            self._retire(seq.row, "cancelled")
        return gone

    def _conv_states(self, r: int, states: list | None = None) -> list:
        """Row r's conv states [kernel-1, D] per conv layer: a copy, or (given `states`) put back."""
        convs = [layer.conv for layer in self.model.lfm.layers if hasattr(layer, "conv")]
        if states is None:
            return [conv.state[r].clone() for conv in convs]
        for conv, s in zip(convs, states):
            conv.state[r].copy_(s)
        return states


def generate_batch(model: LFM2Audio, chats: list[Chat], mode: str = "interleaved", max_new_tokens: int = 512,
                   batch_size: int = 8, sampling: Sampling = Sampling()) -> Iterator[tuple[int, list]]:
    """Several chats decoded together, up to `batch_size` at once: yields (i, the items of chats[i]) as each
    answer ends, so in the order they end (`dict(generate_batch(model, chats))` collects them)."""
    batch = Batch(model, max(1, min(batch_size, len(chats))))
    seqs = {batch.add(Sequence(chat, mode, max_new_tokens, sampling)): i for i, chat in enumerate(chats)}
    answers = {i: [] for i in seqs.values()}
    while batch.busy:
        for seq, item, over in batch.step():
            i = seqs[seq]
            if item is not None:
                answers[i].append(item)
            if over:
                yield i, answers.pop(i)
