"""The server's endpoints, one method each: the OpenAI routes (chat completions, speech, transcriptions, models),
/health and the page's files. serve.py's Handler mixes them in and gives them the request (self.server, self.headers,
self.path) and its plumbing: _json and _send write a whole answer, _start_stream, _chunk, _event and _end_stream a
streamed one, _items submits a sequence to the engine and watches for a client gone.
"""

import base64
import time
from pathlib import Path

import api
import sound
import tasks
import transcribe
from api import bad, field
from batch import Sequence

WEB = Path(__file__).resolve().parent / "web"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".png": "image/png",
         ".svg": "image/svg+xml"}
# all that is served from disk: the page's files, listed once at start (no path a client names reaches the disk)
PAGES = {("/" if p.name == "index.html" else f"/{p.name}"): p for p in sorted(WEB.glob("*")) if p.suffix in TYPES}
ROUTES = {"/v1/chat/completions": ("POST", "chat"), "/v1/audio/speech": ("POST", "speech"),
          "/v1/audio/transcriptions": ("POST", "transcriptions"), "/v1/models": ("GET", "models"),
          "/health": ("GET", "health"), **{path: ("GET", "page") for path in PAGES}}


class Endpoints:
    """The work of each route in ROUTES, as `_name(body)`: serve.Handler finds it by the route's name."""

    def _page(self, _body):
        path = PAGES[self.path.split("?")[0]]
        self._send(path.read_bytes(), TYPES[path.suffix])

    def _health(self, _body):
        s = self.server
        self._json({"status": "ready", "model": s.model_name, "device": str(s.model.lfm.embed_tokens.weight.device),
                    "dtype": str(s.model.lfm.embed_tokens.weight.dtype).removeprefix("torch."),
                    "quantize": s.quantize, "vocoder": s.vocoder_name, "auth": bool(s.api_key),
                    **s.engine.status()})

    def _models(self, _body):
        self._json({"object": "list", "data": [{"id": self.server.model_name, "object": "model", "created": 0,
                                                "owned_by": "LiquidAI"}]})

    def _chat(self, raw: bytes):
        s, body = self.server, api.json_body(raw)
        modalities = field(body, "modalities", list, ["text"])
        if not modalities or not set(modalities) <= {"text", "audio"} or "text" not in modalities:
            raise bad("'modalities' must be [\"text\"] or [\"text\", \"audio\"]", "modalities")
        spoken = "audio" in modalities
        out = field(body, "audio", dict, {})
        fmt = out.get("format") or ("pcm16" if body.get("stream") else "wav")
        if fmt not in api.CHAT_AUDIO_FORMATS:
            raise bad(f"audio.format {fmt!r} is not supported: {', '.join(api.CHAT_AUDIO_FORMATS)}", "audio.format")
        stream = field(body, "stream", bool, False)
        if spoken and stream and fmt != "pcm16":
            raise bad("streamed audio is pcm16 (24 kHz, 16-bit)", "audio.format")
        if spoken:
            api.voice(field(out, "voice", str, "uk-male"))  # checked; the chat task has no voice of its own
        chat = api.chat_messages(s.model.tokenizer, body.get("messages"), s.answers, tasks.TASKS["chat"].system)
        max_new = api.max_tokens(body, len(chat), s.model.lfm.max_seq_len, s.max_new_tokens)
        seed = field(body, "seed", int)
        seq = Sequence(chat, "interleaved", max_new, api.sampling(body, s.sampling["chat"]), seed=seed)
        events = self._items(seq, s.vocoder if spoken else None)
        (self._chat_stream if stream else self._chat_whole)(body, chat, seq, events, spoken, fmt)

    def _chat_whole(self, body, chat, seq, events, spoken, fmt):
        s, items, text, waves = self.server, [], tasks.TextStream(self.server.model.tokenizer), []
        for kind, value in events:
            if kind == "wave":
                waves.append(value.cpu())
                continue
            items.append((kind, value if kind == "text" else value.tolist()))
            if kind == "text":
                text.add(value)
        message = {"role": "assistant", "content": None if spoken else text.text, "refusal": None}
        key, expires = s.answers.add(items, text.text)
        if spoken:
            message["audio"] = {"id": key, "expires_at": expires, "transcript": text.text,
                                "data": base64.b64encode(sound.encode(waves, fmt)).decode()}
        self._json({"id": api.completion_id(), "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model") or s.model_name,
                    "choices": [{"index": 0, "finish_reason": seq.finish, "message": message}],
                    "usage": api.usage(chat, seq.reused, items)})

    def _chat_stream(self, body, chat, seq, events, spoken, _fmt):
        s, cid, model = self.server, api.completion_id(), body.get("model") or self.server.model_name
        items, text = [], tasks.TextStream(s.model.tokenizer)
        key, expires = api.audio_id()
        self._start_stream("text/event-stream")
        self._event(api.chunk(cid, model, {"role": "assistant"}))
        audio_id = {"id": key, "expires_at": expires}
        for kind, value in events:
            if kind == "wave":
                self._event(api.chunk(cid, model, {"audio": {**audio_id, "data": base64.b64encode(
                    sound.pcm16(value.cpu())).decode()}}))
                audio_id = {"id": key}
                continue
            items.append((kind, value if kind == "text" else value.tolist()))
            piece = text.add(value) if kind == "text" else ""
            if piece:
                self._event(api.chunk(cid, model, {"audio": {"id": key, "transcript": piece}} if spoken
                                      else {"content": piece}))
        s.answers.add(items, text.text, key, expires)  # citable once it is whole
        self._event(api.chunk(cid, model, {}, seq.finish))
        if (field(body, "stream_options", dict, {}) or {}).get("include_usage"):
            self._event({**api.chunk(cid, model, {}), "choices": [], "usage": api.usage(chat, seq.reused, items)})
        self._event(b"[DONE]")
        self._end_stream()

    def _speech(self, raw: bytes):
        s, body = self.server, api.json_body(raw)
        text = field(body, "input", str, required=True)
        if not text.strip():
            raise bad("'input' is empty", "input")
        chosen = api.voice(field(body, "voice", str, required=True))
        fmt = field(body, "response_format", str, "wav", api.SPEECH_FORMATS + ("mp3", "opus", "aac"))
        if fmt not in api.SPEECH_FORMATS:
            raise bad(f"response_format {fmt!r} is not supported here: wav, pcm or flac", "response_format")
        sse = field(body, "stream_format", str, "audio", ("audio", "sse")) == "sse"
        chat = tasks.new_chat(s.model.tokenizer, tasks.system_prompt("tts", chosen))
        tasks.add_user_turn(chat, None, text)
        max_new = api.max_tokens({}, len(chat), s.model.lfm.max_seq_len, s.max_new_tokens)
        seq = Sequence(chat, "sequential", max_new, s.sampling["tts"])
        events = self._items(seq, s.vocoder)
        if fmt == "flac" and not sse:  # a flac header needs the length: sent whole
            waves = [v.cpu() for k, v in events if k == "wave"]
            return self._send(sound.encode(waves, "flac"), "audio/flac")
        self._start_stream("text/event-stream" if sse else {"wav": "audio/wav", "pcm": "audio/pcm",
                                                            "flac": "audio/flac"}[fmt])
        send = (lambda data: self._event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
                ) if sse else self._chunk
        if fmt == "wav":
            send(sound.wav_header())
        waves, steps = [], 0
        for kind, value in events:
            steps += kind != "wave"
            if kind == "wave":
                waves.append(value.cpu())
                send(sound.float32(value) if fmt == "wav" else sound.pcm16(value) if fmt == "pcm" else b"")
        if fmt == "flac":  # sse: one delta with the whole file
            send(sound.encode(waves, "flac"))
        if sse:
            self._event({"type": "speech.audio.done", "usage": {"input_tokens": len(chat), "output_tokens": steps,
                                                                "total_tokens": len(chat) + steps}})
        self._end_stream()

    def _transcriptions(self, raw: bytes):
        s = self.server
        fields = api.form(raw, self.headers.get("Content-Type", ""))
        upload = fields.get("file")
        if not isinstance(upload, tuple):
            raise bad("'file' is required: the audio file, as a multipart file field", "file")
        fmt = fields.get("response_format", "json")
        if fmt not in api.TRANSCRIPT_FORMATS:
            raise bad(f"response_format must be one of {', '.join(api.TRANSCRIPT_FORMATS)}", "response_format")
        stream = str(fields.get("stream", "false")).lower() == "true"
        wave = api.recording(upload[1], upload[0] or "file")
        chunks = transcribe.cut(s.model, [wave])
        todo = [c for c in chunks if c.chat is not None]
        longest = max((len(c.chat) for c in todo), default=0)
        max_new = api.max_tokens({}, longest, s.model.lfm.max_seq_len, s.max_new_tokens)
        seqs = {id(c): Sequence(c.chat, "sequential", max_new, s.sampling["asr"]) for c in todo}
        events = {key: self._items(seq) for key, seq in seqs.items()}
        if stream:
            self._start_stream("text/event-stream")
        texts = []
        try:
            for c in chunks:  # in order; all are decoding together meanwhile
                if c.chat is not None:
                    transcribe.finish(c, [(k, v if k == "text" else v.tolist()) for k, v in events[id(c)]],
                                      s.model.tokenizer)
                if c.text:
                    texts.append(c.text)
                    if stream:
                        self._event({"type": "transcript.text.delta", "delta": c.text if len(texts) == 1
                                     else " " + c.text})
        finally:  # a client gone half-way: the chunks still decoding free their rows
            for seq in seqs.values():
                seq.cancel()
        text = " ".join(texts)
        if stream:
            self._event({"type": "transcript.text.done", "text": text})
            return self._end_stream()
        if fmt in ("srt", "vtt"):
            return self._send(transcribe.subtitles("." + fmt, chunks).encode(), "text/plain; charset=utf-8")
        if fmt == "text":
            return self._send((text + "\n").encode(), "text/plain; charset=utf-8")
        if fmt == "verbose_json":
            return self._json(api.verbose_transcript(chunks, text, wave.numel() / 16000, fields.get("language")))
        self._json({"text": text})
