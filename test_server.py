"""serve.py, through the official `openai` client and raw HTTP: every answer equals run.py's for the same input
(greedy, the tiny checkpoint: text and items exactly, audio within 1e-4), conversations continue in a cache row,
concurrent requests are batched and each equals its answer alone, and every bad input gets a 4xx with OpenAI's
error body while the server goes on serving."""

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf
import torch

import audio
import tasks
from conftest import ROOT, run_ok
from fixtures import ASSETS
from tokenizer import Tokenizer


KEY = "test-key"
MAX_NEW = 40  # backbone steps per answer, the server's --max-new-tokens and run.py's
WAV_TOL = 1e-4  # the server's audio vs run.py's wav: max abs difference (pcm16 rounds to 1/32767)


def start_server(ckpt: Path, *extra) -> tuple[subprocess.Popen, int]:
    """serve.py on a free port (greedy, float32, tiny checkpoint); (process, port) once it says it is ready."""
    p = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(ckpt), "--port", "0", "--greedy",
                          "--dtype", "float32", "--device", "cpu", "--max-new-tokens", str(MAX_NEW), *extra],
                         stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                         # a suite started in the background inherits an ignored SIGINT: the Ctrl-C test needs it
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = p.stderr.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    assert match, f"serve.py did not start: {line}{p.stderr.read() if p.poll() is not None else ''}"
    return p, int(match.group(1))


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    p, port = start_server(tiny_ckpt, "--batch", "4", "--api-key", KEY, "--max-body-mb", "3", "--timeout", "3")
    threading.Thread(target=p.stderr.read, daemon=True).start()  # keep its stderr drained
    yield port
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=60) == 0, "serve.py did not stop cleanly on Ctrl-C"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0, timeout=300)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or raw bytes) of one raw HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request(method, path, body, {"Authorization": f"Bearer {KEY}", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data


def answer_text(codes: dict, ckpt: Path) -> str:
    """The text of an answer that run.py wrote with --codes-out (what it printed, without the final newline)."""
    text = tasks.TextStream(Tokenizer.from_file(ckpt / "tokenizer.json"))
    for kind, value in codes["items"]:
        if kind == "text":
            text.add(value)
    return text.text


def run_py(tmp_path: Path, ckpt: Path, *args) -> dict:
    """run.py's answer: its text, items (--codes-out) and wav samples."""
    r = run_ok(["--model", ckpt, "--greedy", "--max-new-tokens", MAX_NEW, "--device", "cpu", *args,
                "--codes-out", tmp_path / "codes.json", "--out", tmp_path / "answer.wav"], tmp_path)
    codes = json.loads((tmp_path / "codes.json").read_text())
    wav = sf.read(str(tmp_path / "answer.wav"), dtype="float32")[0] if (tmp_path / "answer.wav").exists() else None
    text = answer_text(codes, ckpt)
    assert r.stdout == text + "\n" * bool(text), "run.py printed another text than its codes hold"
    return {"text": text, "codes": codes, "wave": wav}


def b64_file(name: str) -> str:
    return base64.b64encode((ASSETS / name).read_bytes()).decode()


def user_audio(name: str) -> dict:
    return {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64_file(name),
                                                                              "format": "wav"}}]}


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767


def close_to(got: np.ndarray, want: np.ndarray, tol: float = WAV_TOL, clip: bool = True):
    """Samples within `tol` of run.py's (`clip`: of run.py's clipped to [-1, 1], as 16/24-bit formats hold them)."""
    assert got.shape == want.shape, f"{got.shape} samples, run.py wrote {want.shape}"
    err = float(np.abs(got - (np.clip(want, -1, 1) if clip else want)).max()) if want.size else 0.0
    assert err <= tol, f"audio differs from run.py's by {err:.2e} > {tol}"


# ---- every route's answer equals run.py's ----

def stream_chat(client, **kw) -> tuple[str, np.ndarray, str, list]:
    """A streamed chat completion: (transcript or content, pcm samples, finish reason, the chunks)."""
    text, audio, finish, chunks = "", b"", None, []
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        chunks.append(chunk)
        if not chunk.choices:
            continue
        delta, finish = chunk.choices[0].delta, chunk.choices[0].finish_reason or finish
        text += delta.content or ""
        if delta.audio:
            text += getattr(delta.audio, "transcript", None) or ""
            audio += base64.b64decode(getattr(delta.audio, "data", None) or "")
    return text, pcm(audio), finish, chunks


@pytest.mark.quick
def test_chat_spoken_equals_run_py(client, tiny_ckpt, tmp_path):
    """A spoken question: the text answer (modalities text), the spoken answer as a wav (float) and streamed as
    pcm16, all equal run.py's answer to the same recording; usage counts the prompt and the answer's items."""
    want = run_py(tmp_path, tiny_ckpt, "--wav", ASSETS / "question.wav")
    r = client.chat.completions.create(model="lfm2", messages=[user_audio("question.wav")])
    assert r.choices[0].message.content == want["text"] and r.choices[0].message.audio is None
    assert r.usage.completion_tokens == len(want["codes"]["items"]) and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want["codes"]["prompt_ids"]) + r.usage.prompt_tokens_details.audio_tokens
    r = client.chat.completions.create(model="lfm2", messages=[user_audio("question.wav")],
                                       modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    audio = r.choices[0].message.audio
    assert r.choices[0].message.content is None and audio.transcript == want["text"] and audio.id.startswith("audio_")
    close_to(sf.read(io.BytesIO(base64.b64decode(audio.data)), dtype="float32")[0], want["wave"], 1e-6, clip=False)
    text, samples, finish, chunks = stream_chat(client, model="lfm2", messages=[user_audio("question.wav")],
                                                modalities=["text", "audio"], audio={"voice": "uk-male",
                                                                                     "format": "pcm16"})
    assert text == want["text"] and finish == "length"
    close_to(samples, want["wave"])
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == MAX_NEW


def test_chat_typed_equals_run_py(client, tiny_ckpt, tmp_path):
    """A typed message, its answer's text streamed as content deltas: run.py's for `--text`."""
    want = run_py(tmp_path, tiny_ckpt, "--text", "What is the capital of France?")
    text, samples, _, _ = stream_chat(client, model="lfm2", messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}])
    assert text == want["text"] and samples.size == 0


def test_second_turn_cites_the_first_answer(client, server, tiny_ckpt, tmp_path):
    """Turn 2 cites turn 1's answer by its audio id: the model's own speech stays in the history, the answer
    equals `run.py --chat`'s second answer, and the server reports the cached positions it did not prefill."""
    r = run_ok(["--model", tiny_ckpt, "--chat", "--greedy", "--max-new-tokens", MAX_NEW, "--device", "cpu",
                "--codes-out", tmp_path / "codes.json", "--out", tmp_path / "answer.wav"], tmp_path,
               stdin=f"{ASSETS / 'question.wav'}\nTell me more.\n")
    first, second = (json.loads((tmp_path / f"codes_{t}.json").read_text()) for t in (1, 2))
    want = [answer_text(codes, tiny_ckpt) for codes in (first, second)]
    assert r.stdout == "".join(t + "\n" * bool(t) for t in want)
    spoken = {"modalities": ["text", "audio"], "audio": {"voice": "uk-male", "format": "wav"}}
    r1 = client.chat.completions.create(model="lfm2", messages=[user_audio("question.wav")], **spoken)
    assert r1.choices[0].message.audio.transcript == want[0]
    history = [user_audio("question.wav"), {"role": "assistant", "audio": {"id": r1.choices[0].message.audio.id}},
               {"role": "user", "content": "Tell me more."}]
    r2 = client.chat.completions.create(model="lfm2", messages=history, **spoken)
    assert r2.choices[0].message.audio.transcript == want[1]
    audio_positions = r2.usage.prompt_tokens_details.audio_tokens
    assert r2.usage.prompt_tokens == len(second["prompt_ids"]) + audio_positions
    fed = len(first["items"]) - (len(first["items"]) == MAX_NEW)  # the row holds all but the last item
    prompt1 = r1.usage.prompt_tokens
    assert r2.usage.prompt_tokens_details.cached_tokens == prompt1 + fed, "turn 2 did not continue turn 1's row"
    close_to(sf.read(io.BytesIO(base64.b64decode(r2.choices[0].message.audio.data)), dtype="float32")[0],
             sf.read(str(tmp_path / "answer_2.wav"), dtype="float32")[0], 1e-6, clip=False)
    # a text-only client sends back only the text: the answer it cites is recognised by it
    r3 = client.chat.completions.create(model="lfm2", messages=[
        user_audio("question.wav"), {"role": "assistant", "content": want[0]},
        {"role": "user", "content": "Tell me more."}])
    assert r3.choices[0].message.content == want[1]


@pytest.mark.parametrize("fmt, stream", [("wav", "audio"), ("pcm", "audio"), ("flac", "audio"), ("pcm", "sse")])
@pytest.mark.parametrize("text", ["Hello there", "The weather is sunny today."])  # the second has no sound
def test_speech_equals_run_py(client, server, tiny_ckpt, tmp_path, fmt, stream, text):
    """/v1/audio/speech in every format, as a stream of audio bytes and as server-sent events: run.py's TTS wav
    (wav: the float samples; pcm and flac: 16 and 24 bits), an answer without sound a valid empty file."""
    want = run_py(tmp_path, tiny_ckpt, "--mode", "tts", "--voice", "us-female", "--text", text)
    body = {"model": "lfm2", "input": text, "voice": "nova", "response_format": fmt,
            "stream_format": stream}  # nova is a US female voice in the map
    if stream == "sse":
        status, data = request(server, "POST", "/v1/audio/speech", json.dumps(body).encode())
        events = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"]
        data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    else:
        data = client.audio.speech.create(**body).read()
    if fmt == "flac" and not want["wave"].size:  # libsndfile writes and reads no FLAC without samples
        assert data[:4] == b"fLaC" and sf.info(io.BytesIO(data)).samplerate == 24000
        return
    got = pcm(data) if fmt == "pcm" else sf.read(io.BytesIO(data), dtype="float32")[0]
    assert (want["wave"].size > 0) == (text == "Hello there"), "the test needs one answer with sound, one without"
    close_to(got, want["wave"], {"wav": 1e-6, "pcm": WAV_TOL, "flac": 1e-6 + 2**-23}[fmt], clip=fmt != "wav")


def long_recording(tmp_path: Path) -> Path:
    """43 s: the two recordings with pauses between them, so that it is cut into chunks."""
    a, ra = sf.read(str(ASSETS / "asr.wav"), dtype="float32")
    q, _ = sf.read(str(ASSETS / "question.wav"), dtype="float32")
    a = audio.resample(torch.from_numpy(a), ra, 16000).numpy()
    wave = np.concatenate([a, np.zeros(8000, np.float32), q, np.zeros(12000, np.float32), a])
    sf.write(str(tmp_path / "long.wav"), wave, 16000)
    return tmp_path / "long.wav"


def test_transcriptions_equal_run_py(client, server, tiny_ckpt, tmp_path):
    """/v1/audio/transcriptions of a 45 s file (cut at pauses into chunks of at most 30 s and batched, as
    run.py's long-form ASR): json, text, srt, vtt, verbose_json (a segment per chunk) and the streamed events,
    all run.py's transcript of the same file."""
    path = long_recording(tmp_path)
    r = run_ok(["--model", tiny_ckpt, "--mode", "asr", "--wav", path, "--greedy", "--max-new-tokens", MAX_NEW,
                "--device", "cpu", "--text-out", tmp_path / "t.srt", "--codes-out", tmp_path / "c.json"], tmp_path)
    spans = re.findall(r"^\[(\S+) --> (\S+)\]", r.stdout, re.M)
    assert len(spans) >= 2, "the recording should be cut into chunks"
    chunks = [answer_text(json.loads((tmp_path / f"c_{k + 1}.json").read_text()), tiny_ckpt).strip()
              for k in range(len(spans))]
    lines = [(a, b, t) for (a, b), t in zip(spans, chunks)]
    texts = [t for t in chunks if t]
    for fmt in ("vtt", "txt"):
        run_ok(["--model", tiny_ckpt, "--mode", "asr", "--wav", path, "--greedy", "--max-new-tokens", MAX_NEW,
                "--device", "cpu", "--text-out", tmp_path / f"t.{fmt}"], tmp_path)
    upload = lambda: open(path, "rb")  # noqa: E731
    assert client.audio.transcriptions.create(model="lfm2", file=upload()).text == " ".join(texts)
    assert client.audio.transcriptions.create(model="lfm2", file=upload(), response_format="text") == \
        " ".join(texts) + "\n"
    assert (tmp_path / "t.txt").read_text() == "".join(t + "\n" for t in texts)
    for fmt in ("srt", "vtt"):
        got = client.audio.transcriptions.create(model="lfm2", file=upload(), response_format=fmt)
        assert got == (tmp_path / f"t.{fmt}").read_text()
    verbose = client.audio.transcriptions.create(model="lfm2", file=upload(), response_format="verbose_json")
    assert [(round(s.start, 3), round(s.end, 3), s.text) for s in verbose.segments] == [
        (_seconds(a), _seconds(b), t) for a, b, t in lines if t]
    assert verbose.duration == round(sf.info(str(path)).duration, 3) and verbose.text == " ".join(texts)
    events = list(client.audio.transcriptions.create(model="lfm2", file=upload(), stream=True))
    assert [e.type for e in events] == ["transcript.text.delta"] * len(texts) + ["transcript.text.done"]
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == " ".join(texts)


def _seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return round(int(h) * 3600 + int(m) * 60 + float(s), 3)


# ---- concurrency ----

def test_concurrent_mixed_requests_equal_their_answers_alone(client, server):
    """16 requests at once (spoken and typed chats, speech, transcriptions), 4 rows: each answer equals the same
    request's answer alone, and more than one row was busy at some step."""
    requests = [
        lambda: client.chat.completions.create(model="m", messages=[user_audio("question.wav")]).choices[0]
        .message.content,
        lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi there"}])
        .choices[0].message.content,
        lambda: client.audio.speech.create(model="m", input="Good morning", voice="echo", response_format="pcm")
        .read(),
        lambda: client.audio.transcriptions.create(model="m", file=open(ASSETS / "asr.wav", "rb")).text,
    ]
    alone = [make() for make in requests]
    busy, done = [], threading.Event()

    def watch():
        while not done.is_set():
            busy.append(request(server, "GET", "/health")[1]["rows_busy"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: requests[i % 4](), range(16)))
    done.set()
    watcher.join()
    for i, got in enumerate(results):
        assert got == alone[i % 4], f"request {i} ({['spoken chat', 'typed chat', 'speech', 'transcript'][i % 4]}) " \
                                    "differs from its answer alone"
    assert max(busy) > 1, f"never more than one row busy: {sorted(set(busy))}"
    assert request(server, "GET", "/health")[1]["rows_busy"] == 0


# ---- bad input: a 4xx with OpenAI's error body, and the server goes on ----

def _bad_requests():
    chat, speech, asr = "/v1/chat/completions", "/v1/audio/speech", "/v1/audio/transcriptions"
    garbage = base64.b64encode(b"RIFF not audio at all" * 20).decode()
    silent = io.BytesIO()
    sf.write(silent, np.zeros(16000, np.float32), 16000, format="WAV")
    silent = base64.b64encode(silent.getvalue()).decode()

    def audio_msg(data):
        return {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data}}]}]}
    return [
        ("POST", chat, b"{not json", 400, "not valid JSON"),
        ("POST", chat, b"[1, 2]", 400, "JSON object"),
        ("POST", chat, json.dumps({"model": "m"}).encode(), 400, "'messages'"),
        ("POST", chat, json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "role"),
        ("POST", chat, json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "content"),
        ("POST", chat, json.dumps({"messages": "hello"}).encode(), 400, "non-empty list"),
        ("POST", chat, json.dumps(audio_msg("***not base64***")).encode(), 400, "not base64"),
        ("POST", chat, json.dumps(audio_msg(garbage)).encode(), 400, "cannot read audio"),
        ("POST", chat, json.dumps(audio_msg("")).encode(), 400, "cannot read audio"),
        ("POST", chat, json.dumps(audio_msg(silent)).encode(), 400, "silent"),
        ("POST", chat, json.dumps({"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"],
                                   "audio": {"voice": "alloy", "format": "mp3"}}).encode(), 400, "audio.format"),
        ("POST", chat, json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}).encode(),
         400, "max_tokens"),
        ("POST", chat, json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}).encode(),
         400, "context of 4096"),
        ("POST", chat, json.dumps({"messages": [{"role": "user", "content": "word " * 5000}]}).encode(), 400,
         "context of 4096"),
        ("POST", chat, json.dumps({"messages": [{"role": "assistant", "audio": {"id": "audio_nope"}}]}).encode(), 400,
         "audio_nope"),
        ("POST", chat, json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}).encode(), 400,
         "temperature"),
        ("POST", speech, json.dumps({"input": "hi", "voice": "robot"}).encode(), 400, "unknown voice"),
        ("POST", speech, json.dumps({"input": "hi", "voice": "alloy", "response_format": "mp3"}).encode(), 400,
         "not supported"),
        ("POST", speech, json.dumps({"voice": "alloy"}).encode(), 400, "'input' is required"),
        ("POST", speech, json.dumps({"input": "   ", "voice": "alloy"}).encode(), 400, "empty"),
        ("POST", asr, b"x", 400, "multipart"),
        ("POST", chat, b"x" * (3 * 2**20 + 1), 413, "limit"),
        ("GET", "/v1/nothing", None, 404, "no route"),
        ("GET", "/../serve.py", None, 404, "no route"),
        ("GET", chat, None, 405, "takes POST"),
        ("DELETE", "/v1/models", None, 405, "takes GET"),
    ]


@pytest.mark.parametrize("method, path, body, status, message", _bad_requests(),
                         ids=[f"{i}-{r[1].rsplit('/', 1)[-1]}-{r[3]}" for i, r in enumerate(_bad_requests())])
def test_bad_input_gets_an_error_body(server, client, method, path, body, status, message):
    got, data = request(server, method, path, body, {"Content-Type": "application/json"})
    assert got == status and isinstance(data, dict), (got, data)
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"], error
    assert client.models.list().data[0].object == "model", "the server stopped serving"


def test_transcription_upload_errors(client):
    """A multipart upload without the file, or of garbage, or in an unknown format: the client's BadRequestError."""
    with pytest.raises(openai.BadRequestError, match="cannot read audio"):
        client.audio.transcriptions.create(model="m", file=("a.wav", b"garbage" * 100))
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.audio.transcriptions.create(model="m", file=open(ASSETS / "asr.wav", "rb"), response_format="xml")


def test_api_key_is_checked(server, tiny_ckpt):
    """With --api-key every /v1 route wants `Authorization: Bearer KEY` (401 otherwise); /health does not."""
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        status, data = request(server, "GET", "/v1/models", None, headers)
        assert status == 401 and data["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert request(server, "GET", "/health", None, {"Authorization": ""})[0] == 200


def test_refused_body_does_not_poison_the_connection(server):
    """A POST refused before its body is read (a wrong key, an unknown path, a wrong method) closes its
    keep-alive connection: the unread body must never be taken for the next request (a browser reuses
    connections). On a connection that stays open, the next request gets its own answer."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    for path, headers, status in (("/v1/chat/completions", {"Authorization": "Bearer wrong"}, 401),
                                  ("/v1/nothing", {}, 404), ("/v1/models", {}, 405)):
        conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
        conn.request("POST", path, body, {"Authorization": f"Bearer {KEY}", **headers})
        r = conn.getresponse()
        assert r.status == status and json.loads(r.read())["error"]
        assert r.getheader("Connection") == "close"
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})  # reconnects
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["object"] == "list"
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)  # a body that was read: kept alive
    conn.request("POST", "/v1/audio/speech", b"{not json", {"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 400 and r.getheader("Connection") is None and json.loads(r.read())["error"]
    sock = conn.sock
    conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["object"] == "list" and conn.sock is sock
    conn.close()


def test_dropped_stream_frees_its_row(server, client):
    """A client that goes away after the first chunk of a streamed answer: its row is freed (within a step) and
    the server goes on; so does one that stalls in the middle of its request (dropped after --timeout)."""
    body = json.dumps({"model": "m", "stream": True, "max_tokens": MAX_NEW,
                       "messages": [user_audio("question.wav")]}).encode()
    sock = socket.create_connection(("127.0.0.1", server))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert b"200 OK" in sock.recv(4096)
    sock.close()
    deadline = time.time() + 30
    while request(server, "GET", "/health")[1]["rows_busy"] and time.time() < deadline:
        time.sleep(0.05)
    assert request(server, "GET", "/health")[1]["rows_busy"] == 0, "the dropped request kept its row"
    stalled = socket.create_connection(("127.0.0.1", server))
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer " + KEY.encode()
                    + b"\r\nContent-Length: 100\r\n\r\n{\"mess")
    stalled.settimeout(20)
    assert stalled.recv(4096) == b"", "a stalled client was not dropped"
    stalled.close()
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices


def test_models_health_and_page(server):
    status, models = request(server, "GET", "/v1/models")
    assert status == 200 and models["object"] == "list" and models["data"][0]["object"] == "model"
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ready" and health["rows"] == 4 and health["dtype"] == "float32"
    assert {"device", "model", "rows_busy", "waiting", "vocoder"} <= set(health)
    status, page = request(server, "GET", "/")
    assert status == 200 and b"<html" in page.lower()
