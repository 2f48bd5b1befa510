"""The OpenAI audio API's shapes for serve.py: requests read into chats and settings, answers written back.

Pure functions and small classes, no sockets: every malformed request becomes an APIError (status, one-sentence
message, the offending parameter), which serve.py sends as OpenAI's error body.
"""

import base64
import binascii
import json
import re
import threading
import time
import uuid
from collections import OrderedDict

import torch

import tasks
from lfm2audio import AUDIO_IN, AUDIO_OUT, IM_END, Chat, Sampling

# OpenAI's voices onto ours (their timbres have no equivalent here; the map keeps their genders)
OPENAI_VOICES = {"alloy": "us-female", "ash": "us-male", "ballad": "uk-male", "coral": "us-female",
                 "echo": "us-male", "fable": "uk-male", "onyx": "us-male", "nova": "us-female", "sage": "uk-female",
                 "shimmer": "uk-female", "verse": "uk-male", "marin": "us-female", "cedar": "us-male"}
SPEECH_FORMATS = ("wav", "pcm", "flac")  # /v1/audio/speech response_format
CHAT_AUDIO_FORMATS = ("wav", "pcm16", "flac")  # /v1/chat/completions audio.format
TRANSCRIPT_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
ANSWERS_KEPT, ANSWER_SECONDS = 256, 3600  # earlier answers citable by audio id: how many, for how long


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# ---- reading requests ----

def json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


def field(body: dict, name: str, kind, default=None, choices=None, required=False):
    """body[name] checked: of type `kind` (a type or tuple), one of `choices`; `default` when absent or null."""
    value = body.get(name)
    if value is None:
        if required:
            raise bad(f"'{name}' is required", name)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:  # True is an int too
        raise bad(f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}", name)
    if choices is not None and value not in choices:
        raise bad(f"'{name}' must be one of {', '.join(map(str, choices))}, got {value!r}", name)
    return value


def form(body: bytes, content_type: str) -> dict:
    """multipart/form-data -> {name: str, or (filename, bytes) for a file}."""
    match = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not content_type.startswith("multipart/form-data") or not match:
        raise bad("the body must be multipart/form-data with a boundary")
    fields = {}
    for part in body.split(b"--" + match.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, sep, data = part.partition(b"\r\n\r\n")
        disposition = re.search(rb'name="([^"]*)"(?:; filename="([^"]*)")?', head)
        if not sep or not disposition:
            raise bad("a part of the multipart body has no name")
        data = data[:-2] if data.endswith(b"\r\n") else data
        name = disposition.group(1).decode(errors="replace")
        filename = disposition.group(2)
        fields[name] = (filename.decode(errors="replace"), data) if filename is not None else data.decode(
            errors="replace")
    return fields


def voice(name) -> str:
    """One of our voices, by our name or OpenAI's."""
    if not isinstance(name, str) or (name not in tasks.VOICES and name.lower() not in OPENAI_VOICES):
        raise bad(f"unknown voice {name!r}: ours are {', '.join(tasks.VOICES)}; OpenAI's names map onto them "
                  f"({', '.join(OPENAI_VOICES)})", "voice")
    return name if name in tasks.VOICES else OPENAI_VOICES[name.lower()]


def recording(data: bytes, name: str) -> torch.Tensor:
    """An uploaded audio file -> mono wave at 16 kHz (400 if it is unreadable, empty or silent)."""
    try:
        return tasks.read_audio(data, name)
    except (ValueError, FileNotFoundError) as e:
        raise bad(tasks.one_line(e), name) from None


def audio_part(part: dict, param: str) -> torch.Tensor:
    audio = part.get("input_audio")
    if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
        raise bad("an input_audio part needs input_audio.data (base64 of an audio file)", param)
    if audio.get("format") not in (None, "wav", "mp3", "flac", "ogg"):
        raise bad(f"input_audio.format {audio.get('format')!r} is not supported (wav, mp3, flac, ogg)", param)
    try:
        data = base64.b64decode(audio["data"], validate=True)
    except (binascii.Error, ValueError):
        raise bad("input_audio.data is not base64", f"{param}.input_audio.data") from None
    return recording(data, f"{param}.input_audio.data")


def sampling(body: dict, default: Sampling) -> Sampling:
    """The task's settings, or the request's `temperature` for text and audio (0: greedy; the audio top-k kept)."""
    t = field(body, "temperature", (int, float))
    if t is None:
        return default
    if not 0 <= t <= 2:
        raise bad(f"'temperature' must be between 0 and 2, got {t}", "temperature")
    return Sampling() if t == 0 else Sampling(t, None, t, default.audio_top_k)


def audio_id() -> tuple[str, int]:
    """A new answer's audio id and when it expires (unix seconds)."""
    return f"audio_{uuid.uuid4().hex}", int(time.time()) + ANSWER_SECONDS


class Answers:
    """The server's recent answers, citable by their audio id: the items the model generated (so the model's own
    speech goes back into the history) and their text; the oldest dropped past ANSWERS_KEPT."""

    def __init__(self):
        self.kept: OrderedDict[str, tuple[float, list, str]] = OrderedDict()
        self.lock = threading.Lock()

    def add(self, items: list, text: str, key: str | None = None, expires: int | None = None) -> tuple[str, int]:
        if key is None:
            key, expires = audio_id()
        with self.lock:
            self.kept[key] = (expires, items, text)
            while len(self.kept) > ANSWERS_KEPT:
                self.kept.popitem(last=False)
        return key, expires

    def get(self, key: str) -> list | None:
        with self.lock:
            expires, items, _ = self.kept.get(key, (0, None, None))
        return items if expires > time.time() else None

    def by_text(self, text: str) -> list | None:
        """A text-only client sends back only an answer's text: the items of the latest answer with that text."""
        with self.lock:
            return next((items for expires, items, t in reversed(self.kept.values())
                         if t == text and expires > time.time()), None)


def text_of(content, param: str) -> str:
    """A message's content: a string, or text parts (their texts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise bad("this content must be a string or a list of text parts", param)


def chat_messages(tokenizer, messages, answers: Answers, system: str) -> Chat:
    """OpenAI messages -> a Chat ending with the assistant's header, in the official layout: the system prompt
    (the chat task's unless one is given), user turns (text and input_audio parts, in order), earlier answers
    (by audio id: the model's own items; or their text)."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    first = messages[0] if isinstance(messages[0], dict) else {}
    given = first.get("role") in ("system", "developer")  # a first system message replaces the task's prompt
    if given:
        system = text_of(first.get("content"), "messages[0].content")
    chat = tasks.new_chat(tokenizer, system)
    for i, m in enumerate(messages[given:], start=given):
        param = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad("each message needs a role: system, user or assistant", param)
        role = "system" if m["role"] == "developer" else m["role"]
        chat.new_turn(role)
        if role == "assistant":
            _assistant(chat, m, answers, param)
        elif isinstance(m.get("content"), list) and role == "user":
            for j, part in enumerate(m["content"]):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    chat.add_text(part["text"])
                elif kind == "input_audio":
                    chat.add_audio(audio_part(part, f"{param}.content[{j}]"), 16000)
                else:
                    raise bad("a user content part must be text or input_audio", f"{param}.content[{j}]")
        else:
            chat.add_text(text_of(m.get("content"), f"{param}.content"))
        chat.end_turn()
    chat.new_turn("assistant")
    return chat


def _assistant(chat: Chat, m: dict, answers: Answers, param: str):
    cited = m.get("audio")
    if cited is not None:
        if not isinstance(cited, dict) or not isinstance(cited.get("id"), str):
            raise bad("an assistant message's audio must be {\"id\": ...}", f"{param}.audio")
        items = answers.get(cited["id"])
        if items is None:
            raise bad(f"no recent answer has audio id {cited['id']!r} (kept {ANSWER_SECONDS // 60} minutes)",
                      f"{param}.audio.id")
        chat.append(items)
        return
    text = text_of(m.get("content") or "", f"{param}.content")
    items = answers.by_text(text) if text else None
    chat.append(items) if items is not None else chat.add_text(text)


def max_tokens(body: dict, prompt_len: int, context: int, default: int) -> int:
    """The answer's bound: the request's max_completion_tokens / max_tokens (400 if it does not fit the context),
    else the server's, cut to the room the context leaves."""
    asked = field(body, "max_completion_tokens", int) or field(body, "max_tokens", int)
    room = context - prompt_len
    if asked is not None and asked < 1:
        raise bad("max_tokens must be at least 1", "max_tokens")
    if room < 1 or asked is not None and asked > room:
        raise bad(f"the prompt has {prompt_len} positions; with {asked or 1} new tokens that is more than the "
                  f"context of {context} (serve.py --context)", "messages", "context_length_exceeded")
    return asked or min(default, room)


# ---- writing answers ----

def usage(chat: Chat, reused: int, items: list) -> dict:
    text = sum(kind == "text" for kind, _ in items)
    return {"prompt_tokens": len(chat), "completion_tokens": len(items), "total_tokens": len(chat) + len(items),
            "prompt_tokens_details": {"cached_tokens": reused,
                                      "audio_tokens": sum(f in (AUDIO_IN, AUDIO_OUT) for f in chat.modality)},
            "completion_tokens_details": {"text_tokens": text, "audio_tokens": len(items) - text}}


def verbose_transcript(chunks: list, text: str, duration: float, language: str | None) -> dict:
    """verbose_json: a segment per chunk (its span, text and token ids; no log-probabilities are computed)."""
    segments = [{"id": n, "seek": round(c.start * 100), "start": round(c.start, 3), "end": round(c.end, 3),
                 "text": c.text, "tokens": [v for k, v in c.items if k == "text" and v != IM_END], "temperature": 0.0,
                 "avg_logprob": None, "compression_ratio": None, "no_speech_prob": None}
                for n, c in enumerate(c for c in chunks if c.text)]
    return {"task": "transcribe", "language": language or None, "duration": round(duration, 3), "text": text,
            "segments": segments}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chunk(cid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
