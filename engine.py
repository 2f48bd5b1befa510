"""The server's decoding thread: one Batch, fed by requests from any thread, stepped while there is work.

    engine = Engine(model, rows=4); engine.start()
    items = engine.submit(seq := Sequence(chat, "interleaved"), vocoder)   # ValueError if it cannot fit the context
    for item in items: ...          # its items as they are generated, and ("wave", samples) with a vocoder

Every request is a Sequence in a cache row; each step decodes all rows at once, a request that arrives joins at the
next step, one that ends (or is cancelled: a client that went away) frees its row. Sound is decoded here too, right
after the step that completes it (sound.Sound): all the model's work runs on this one thread, so that two threads
never split the CPU's cores between them (each torch call would use them all). If a step fails, the sequences in
the batch are ended with the error and a fresh batch goes on.
"""

import queue
import threading
import traceback

from batch import Batch, Sequence
from sound import Sound

END = object()  # the last event of a sequence's queue


class Engine:
    def __init__(self, model, rows: int = 1):
        self.model, self.rows = model, rows
        self.batch = Batch(model, rows)
        self.queues: dict[Sequence, queue.Queue] = {}
        self.sounds: dict[Sequence, Sound] = {}
        self.wake, self.stopping = threading.Event(), False
        self.lock = threading.Lock()  # a submit does not add to a batch that a failed step is replacing
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def stop(self):
        """End every sequence (cancelled) after the step under way, and the thread with it."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=60)

    def submit(self, seq: Sequence, vocoder=None, decode_frames: int = 1):
        """Queue `seq` (ValueError if it cannot fit the context); returns an iterator over its items as they come,
        each followed by the sound it completes when given a vocoder (sound.respond's stream), which raises what
        a failed step raised."""
        sound = Sound(vocoder, decode_frames) if vocoder is not None else None
        with self.lock:
            self.batch.add(seq)
            self.queues[seq] = q = queue.Queue()
            if sound is not None:
                self.sounds[seq] = sound
        self.wake.set()
        return self._items(q)

    @staticmethod
    def _items(q: queue.Queue):
        while (event := q.get()) is not END:
            if isinstance(event, BaseException):
                raise RuntimeError(f"decoding failed: {event}") from event
            yield event

    def status(self) -> dict:
        return {"rows": self.rows, "rows_busy": sum(s is not None for s in self.batch.running),
                "waiting": len(self.batch.waiting)}

    def _loop(self):
        while not self.stopping:
            self.wake.wait()
            self.wake.clear()
            while self.batch.busy and not self.stopping:
                try:
                    events = self.batch.step()
                except Exception as e:  # noqa: BLE001  (the server must outlive a failed step)
                    traceback.print_exc()
                    self._fail(e)
                    continue
                try:
                    for seq, item, over in events:
                        self._deliver(seq, item, over)
                except Exception as e:  # noqa: BLE001  (a failed decode of sound)
                    traceback.print_exc()
                    self._fail(e)
        self._end_all(RuntimeError("the server is stopping"))

    def _deliver(self, seq: Sequence, item, over: bool):
        q, sound = self.queues[seq], self.sounds.get(seq)
        if item is not None:
            q.put(item)
            for wave in sound.push(*item) if sound else ():
                q.put(("wave", wave))
        if over:
            for wave in sound.close() if sound and seq.finish != "cancelled" else ():
                q.put(("wave", wave))
            self.sounds.pop(seq, None)
            self.queues.pop(seq).put(END)

    def _fail(self, error: Exception):
        with self.lock:
            self._end_all(error)
            self.batch = Batch(self.model, self.rows)

    def _end_all(self, error: Exception):
        for seq in [*self.queues]:
            seq.finish = seq.finish or "error"
            self.sounds.pop(seq, None)
            self.queues[seq].put(error)
            self.queues.pop(seq).put(END)
