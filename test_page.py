"""The browser page (web/) in a real Chromium (Debian's, driven through its chromedriver: nothing is downloaded),
against serve.py on the tiny checkpoint (greedy), its microphone a recording played in real time
(`--use-file-for-fake-audio-capture`). The assertions compare the page with what the server answers for the same
request (resent with urllib), never with fixed strings; and no JavaScript error may reach the console.
LFM2_WEB_SCREENSHOT=PATH saves a screenshot of a conversation there (the README's)."""

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from conftest import ROOT

QUESTION = ROOT / "assets" / "question.wav"
ANSWER_TIMEOUT = 60  # seconds per answer of the tiny model, on a busy 2-core machine
START_TIMEOUT = 120
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = os.environ.get("LFM2_WEB_SCREENSHOT")
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--autoplay-policy=no-user-gesture-required", "--window-size=1280,900"]
MIC_FLAGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


# ---- the server ----

class Server:
    """serve.py on a free port, started (and stopped, and started again) by the tests."""

    def __init__(self, ckpt: Path, *extra):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url, self.proc = f"http://127.0.0.1:{port}", None
        self.command = [sys.executable, str(ROOT / "serve.py"), "--model", str(ckpt), "--port", str(port),
                        "--greedy", "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "40", *extra]

    def start(self):
        self.proc = subprocess.Popen(self.command, stderr=subprocess.DEVNULL,
                                     env=os.environ | {"OMP_NUM_THREADS": "1"})
        deadline = time.time() + START_TIMEOUT
        while True:
            try:
                self.health()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve.py exited ({self.proc.returncode}): {self.command}") from None
                if time.time() > deadline:
                    raise RuntimeError(f"no /health at {self.url} after {START_TIMEOUT} s") from None
                time.sleep(0.2)

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path, data: bytes, content_type="application/json", timeout=ANSWER_TIMEOUT):
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": content_type})
        return urllib.request.urlopen(request, timeout=timeout)

    def health(self):
        return self.get("/health")

    def chat(self, body) -> dict:
        """The request resent: the streamed answer's transcript, audio (pcm16 bytes), audio id, finish."""
        out = {"text": "", "audio": b"", "id": None, "finish": None}
        with self.post("/v1/chat/completions", json.dumps(body).encode()) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[5:])["choices"][0]
                delta = choice["delta"]
                audio = delta.get("audio") or {}
                out["id"] = audio.get("id") or out["id"]
                out["text"] += audio.get("transcript", "") + (delta.get("content") or "")
                out["audio"] += base64.b64decode(audio.get("data", ""))
                out["finish"] = choice.get("finish_reason") or out["finish"]
        return out

    def chat_error(self, body) -> tuple[int, str]:
        try:
            self.post("/v1/chat/completions", json.dumps(body).encode()).close()
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())["error"]["message"]
        raise AssertionError("the server accepted the request")

    def transcribe(self, wav: bytes) -> str:
        boundary = uuid.uuid4().hex
        parts = [(b'name="file"; filename="chunk.wav"\r\nContent-Type: audio/wav', wav),
                 (b'name="model"', b"lfm2-audio"), (b'name="response_format"', b"json")]
        body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; " + head + b"\r\n\r\n"
                        + data + b"\r\n" for head, data in parts) + b"--" + boundary.encode() + b"--\r\n"
        with self.post("/v1/audio/transcriptions", body, f"multipart/form-data; boundary={boundary}") as r:
            return json.loads(r.read())["text"]

@pytest.fixture(scope="session")
def server(tiny_ckpt):
    s = Server(tiny_ckpt)
    s.start()
    yield s
    s.stop()


# ---- the recordings the fake microphone plays ----

RATE = 16000


def noise(seconds, rng):
    return (rng.standard_normal(int(seconds * RATE)) * 10 ** (-55 / 20)).astype(np.float32)  # -55 dBFS


@pytest.fixture(scope="session")
def recordings(tmp_path_factory):
    """turn.wav: a question between pauses; bargein.wav: the question, 1.5 s, the question again (spoken
    over the answer); captions.wav: the question and its first words, with pauses."""
    q, rate = sf.read(QUESTION, dtype="float32")
    assert rate == RATE and q.ndim == 1
    rng = np.random.default_rng(0)
    first_words = q[: int(2.36 * RATE)]  # cut in a dip between two words
    plan = {"turn": [noise(1, rng), q, noise(3, rng)],
            "bargein": [noise(1, rng), q, noise(1.5, rng), q, noise(3, rng)],
            "captions": [noise(1, rng), q, noise(1.5, rng), first_words, noise(2.5, rng)]}
    out = tmp_path_factory.mktemp("recordings")
    for name, parts in plan.items():
        sf.write(out / f"{name}.wav", np.concatenate(parts), RATE, subtype="PCM_16")
    return {name: out / f"{name}.wav" for name in plan}


# ---- the browser ----

@pytest.fixture
def browser(server, tmp_path):
    """browser(recording=None, flags=(), url=None, query="") -> a Chromium showing the page (`query`: its address
    options, e.g. "?max_tokens=300"); at the end, no JavaScript error may
    be in its console (and no failed request, unless the test sets driver.network_errors_expected)."""
    drivers = []

    def launch(recording=None, flags=MIC_FLAGS, url=None, query=""):
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS + list(flags) + [f"--user-data-dir={tmp_path / f'profile{len(drivers)}'}"]:
            options.add_argument(flag)
        if recording:
            options.add_argument(f"--use-file-for-fake-audio-capture={recording}%noloop")
        downloads = tmp_path / "downloads"
        downloads.mkdir(exist_ok=True)
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.network_errors_expected = False
        driver.downloads = downloads
        drivers.append(driver)
        driver.get((url or server.url) + "/" + query)
        wait(lambda: driver.find_element(By.ID, "server-state").text == "ready", 10, "the page shows the server")
        return driver

    yield launch
    problems = []
    for driver in drivers:
        for entry in driver.get_log("browser"):
            network = entry.get("source") == "network"
            if entry["level"] == "SEVERE" and not (network and driver.network_errors_expected):
                problems.append(entry["message"])
        driver.quit()
    assert not problems, f"the browser's console: {problems}"


def wait(condition, timeout, what):
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(0.1)


def log(driver):
    """#log's entries: (class, text)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#log > *')].map(e => [e.className, e.textContent])")


def lfm2(driver, name):
    return driver.execute_script(f"return window.lfm2.{name}")


def text_of(driver, element_id):
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def settled_history(driver):
    """The history once no answer is streaming, else None (one look: the page does not change in between)."""
    busy, history = driver.execute_script("return [window.lfm2.busy, window.lfm2.history]")
    return None if busy else history


def wait_history(driver, n, timeout=ANSWER_TIMEOUT, what=None):
    """Until the history holds n messages and no answer is streaming."""
    def settled():
        history = settled_history(driver)
        return history is not None and len(history) == n and history

    return wait(settled, timeout, what or f"a history of {n} messages")


def type_turn(driver, text):
    box = driver.find_element(By.ID, "text")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def read_wav(b64):
    with wave.open(io.BytesIO(base64.b64decode(b64))) as w:
        info = (w.getframerate(), w.getnchannels(), w.getsampwidth())
        samples = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    return info, samples


def envelope(x, rate=RATE):
    """The level of each 20 ms (linear: the loud parts count, the browser's gain changes hardly do)."""
    n = int(0.02 * rate)
    frames = x[: len(x) // n * n].reshape(-1, n)
    return np.sqrt((frames ** 2).mean(1))


def similarity(heard, original):
    """The best correlation of the two level envelopes over all shifts: did the page send what it heard?
    (The question after the browser's processing: about 0.86; other speech: 0.5; the question reversed: 0.4.)"""
    a, b = envelope(heard), envelope(original)
    best = -1.0
    for shift in range(-len(a) + 10, len(b) - 10):
        lo, hi = max(0, shift), min(len(b), shift + len(a))
        x, y = a[lo - shift: hi - shift], b[lo:hi]
        if len(x) > 50:
            best = max(best, float(np.corrcoef(x, y)[0, 1]))
    return best


def assert_answer_shown(driver, server, entry_text, status=True):
    """Resends the page's last request; the page's answer text, and its sound, are what the server streams."""
    again = server.chat(lfm2(driver, "lastRequestBody"))
    assert entry_text == again["text"]
    if status:
        shown = text_of(driver, "status")
        assert re.search(r"first audio \d+ ms", shown), shown
        seconds = float(re.search(r"(\d+\.\d) s of audio", shown).group(1))
        assert seconds == pytest.approx(len(again["audio"]) / 2 / 24000, abs=0.051)
        assert seconds > 0
    return again


# ---- the tests ----

def test_modules(browser):
    """The page's pure parts, in the browser: SSE split anywhere, PCM split mid-sample, resampling, WAV,
    caption timestamps, the voice detector on a made-up signal, and gapless scheduling of the answer's sound."""
    d = browser(flags=())
    result = d.execute_async_script("""
    const done = arguments[0];
    Promise.all([import('./api.js'), import('./audio.js'), import('./captions.js')]).then(([api, audio, captions]) => {
      const out = {};
      const stream = 'data: {"a": 1}\\r\\n\\r\\n: a comment\\n\\ndata: [DONE]\\n\\n';
      for (const size of [1, 3, 7, stream.length]) {
        const p = new api.SseParser(); const events = [];
        for (let i = 0; i < stream.length; i += size) events.push(...p.push(stream.slice(i, i + size)));
        out['sse' + size] = events;
      }
      const dec = new audio.Pcm16Decoder();
      const bytes = new Uint8Array([0x00, 0x80, 0xff, 0x7f, 0x01]);  // -32768, 32767, half of 1
      out.pcm = [...dec.push(bytes.subarray(0, 3)), ...dec.push(bytes.subarray(3)), ...dec.push(new Uint8Array([0]))];
      const tone = new Float32Array(48000).map((_, i) => 0.5 * Math.sin(2 * Math.PI * 440 * i / 48000));
      const down = audio.resample(tone, 48000, 16000);
      out.resampled = [down.length, Math.max(...down.subarray(1000, 15000))];
      const wav = audio.encodeWav(new Float32Array([0, 1, -1, 2]), 16000);
      out.wav = [new TextDecoder().decode(wav.subarray(0, 4)), wav.length, new DataView(wav.buffer).getInt16(46, true),
                 new DataView(wav.buffer).getInt16(50, true)];
      out.base64 = audio.bytesToBase64(audio.base64ToBytes('AAECAw==')) === 'AAECAw==';
      out.stamps = [captions.timestamp(4.2, ','), captions.timestamp(3725.0456, '.')];
      out.srt = captions.toSrt([{start: 0, end: 4.2, text: ' hi '}, {start: 5, end: 6, text: ''}]);
      out.vtt = captions.toVtt([{start: 0, end: 4.2, text: 'hi'}]);
      // 1 s of quiet noise, 1 s of a loud tone, 1.5 s of quiet noise, in 20 ms frames
      const vad = new audio.Vad(16000, {pause: 0.7});
      let seed = 1; const rnd = () => ((seed = (seed * 16807) % 2147483647) / 2147483647 - 0.5);
      const events = [];
      for (let f = 0; f < 175; f++) {
        const frame = new Float32Array(320).map((_, i) => f >= 50 && f < 100
          ? 0.3 * Math.sin(2 * Math.PI * 300 * (f * 320 + i) / 16000) : 0.002 * rnd());
        const e = vad.push(frame);
        if (e) events.push([f, e.type, e.start, e.end]);
      }
      out.vad = events;
      // gapless: pieces that arrive ahead of time are scheduled back to back
      const player = new audio.Player();
      player.play(new Float32Array(2400));
      const afterFirst = player.nextTime;
      player.play(new Float32Array(2400));
      player.play(new Float32Array(1200));
      out.player = [player.underruns, Math.round((player.nextTime - afterFirst) * 24000)];
      player.stop();
      done(out);
    });""")
    assert all(result[f"sse{n}"] == ['{"a": 1}', "[DONE]"] for n in (1, 3, 7)), result
    assert result["pcm"] == [-1, 32767 / 32768, 1 / 32768]
    assert result["resampled"][0] == 16000 and abs(result["resampled"][1] - 0.5) < 0.01
    assert result["wav"] == ["RIFF", 52, 32767, 32767]
    assert result["base64"]
    assert result["player"] == [0, 3600]  # no underrun; the next piece starts 2400 + 1200 samples later
    assert result["stamps"] == ["00:00:04,200", "01:02:05.046"]
    assert result["srt"] == "1\n00:00:00,000 --> 00:00:04,200\nhi\n\n"
    assert result["vtt"] == "WEBVTT\n\n00:00:00.000 --> 00:00:04.200\nhi\n\n"
    (f0, start, *_), (f1, end, t0, t1) = result["vad"]
    assert (start, end) == ("start", "end")
    assert f0 == 52  # the onset: 3 loud frames
    assert 99 + 35 <= f1 <= 99 + 36  # 0.7 s of quiet after the last loud frame
    assert t0 == pytest.approx(1.0 - 0.3, abs=0.03) and t1 == pytest.approx(2.0 + 0.2, abs=0.03)  # pre-roll, tail


def test_spoken_turn_then_typed_turn(server, browser, recordings):
    d = browser(recordings["turn"])
    health = server.health()
    assert text_of(d, "h-model") == health["model"]
    assert text_of(d, "h-rows") == f"{health['rows_busy']} / {health['rows']}"
    d.find_element(By.ID, "start").click()
    history = wait_history(d, 2, 9 + ANSWER_TIMEOUT, "the spoken turn and its answer")

    # The page heard the question and ended the turn on the pause.
    (user_class, label), (bot_class, answer) = log(d)
    assert user_class == "user" and bot_class == "assistant"
    (rate, channels, width), heard = read_wav(history[0]["content"][0]["input_audio"]["data"])
    assert (rate, channels, width) == (16000, 1, 2)
    assert label == f"(spoken, {len(heard) / rate:.1f} s)"
    assert 3.0 < len(heard) / rate < 6.0  # the question's 3.4 s of speech, not the pauses around it
    question, _ = sf.read(QUESTION, dtype="float32")
    assert similarity(heard, question) > 0.75

    # The answer shown and played is the server's answer to that request; the history cites it by its id.
    body = lfm2(d, "lastRequestBody")
    assert body["stream"] is True and body["modalities"] == ["text", "audio"]
    assert body["audio"]["format"] == "pcm16" and body["messages"] == history[:1]
    assert_answer_shown(d, server, answer)
    assert history[1]["role"] == "assistant" and history[1]["content"] is None
    first_id = history[1]["audio"]["id"]  # the id the page was given (the resend got an id of its own)
    assert first_id.startswith("audio_")
    wait(lambda: not lfm2(d, "playing"), 10, "the answer's sound to finish playing")

    # A typed second turn sends the first turn as it was, and cites the first answer by its audio id.
    type_turn(d, "And what did I ask before?")
    history = wait_history(d, 4, what="the typed turn and its answer")
    body = lfm2(d, "lastRequestBody")
    assert body["messages"] == history[:3]
    assert body["messages"][0] == {"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": history[0]["content"][0]["input_audio"]["data"], "format": "wav"}}]}
    assert body["messages"][1] == {"role": "assistant", "content": None, "audio": {"id": first_id}}
    assert body["messages"][2] == {"role": "user", "content": [{"type": "text", "text": "And what did I ask before?"}]}
    entries = log(d)
    assert [c for c, _ in entries] == ["user", "assistant", "user", "assistant"]
    assert entries[2][1] == "And what did I ask before?"
    assert_answer_shown(d, server, entries[3][1])
    if SCREENSHOT:
        d.save_screenshot(SCREENSHOT)


def test_push_to_talk(server, browser, recordings):
    d = browser(recordings["turn"])
    ptt = d.find_element(By.ID, "ptt")
    ActionChains(d).click_and_hold(ptt).perform()  # the microphone opens, the recording starts playing
    wait(lambda: ptt.get_attribute("aria-pressed") == "true", 5, "push to talk recording")
    time.sleep(6.5)  # 1 s of pause, the question, a little pause: no voice detection, the hold decides
    ActionChains(d).release(ptt).perform()
    history = wait_history(d, 2, what="the push-to-talk turn and its answer")
    (_, label), (_, answer) = log(d)
    _, heard = read_wav(history[0]["content"][0]["input_audio"]["data"])
    assert label == f"(spoken, {len(heard) / RATE:.1f} s)" and 5.5 < len(heard) / RATE < 7.0
    question, _ = sf.read(QUESTION, dtype="float32")
    assert similarity(heard, question) > 0.75
    assert_answer_shown(d, server, answer)


def test_barge_in(server, browser, recordings):
    # 300 steps: the tiny model's greedy answer to the question runs to the limit, 20 s of sound streamed in a
    # few seconds, so the second question (1.5 s after the first) always speaks over it
    d = browser(recordings["bargein"], query="?max_tokens=300")
    d.find_element(By.ID, "start").click()
    wait(lambda: sum(c == "user" for c, _ in log(d)) == 2, 16, "the second spoken turn")

    def answered():
        history = settled_history(d)
        return history and history[-1]["role"] == "assistant" and history

    history = wait(answered, ANSWER_TIMEOUT, "the answer to the second turn")
    entries = log(d)
    users = [e for e in entries if e[0] == "user"]
    assert all(re.fullmatch(r"\(spoken, \d\.\d s\)", text) for _, text in users)
    body = lfm2(d, "lastRequestBody")
    assert body["messages"] == history[:-1]
    # The first answer was interrupted: dropped from the history, the first question kept.
    assert [m["role"] for m in history] == ["user", "user", "assistant"]
    assert entries[-1][0] == "assistant" and entries[-2][0] == "user"
    assert all("aborted" in c for c, _ in entries[1:-2])  # the interrupted answer, if it showed text
    assert "answer interrupted (you started speaking)" in text_of(d, "events")
    assert_answer_shown(d, server, entries[-1][1])


def test_reset(server, browser):
    d = browser(flags=())  # no microphone needed
    type_turn(d, "Hello there")
    wait_history(d, 2)
    d.find_element(By.ID, "reset").click()
    assert lfm2(d, "history") == [] and log(d) == [] and lfm2(d, "lastRequestBody") is None
    type_turn(d, "A new start")
    history = wait_history(d, 2)
    assert lfm2(d, "lastRequestBody")["messages"] == history[:1]
    assert history[0]["content"][0]["text"] == "A new start"
    assert_answer_shown(d, server, log(d)[1][1])


def test_stop_aborts_the_answer(server, browser):
    d = browser(flags=(), query="?max_tokens=300")  # an answer that runs to the limit: seconds of streaming
    type_turn(d, "Please count to one hundred slowly")
    wait(lambda: lfm2(d, "playing"), ANSWER_TIMEOUT, "the answer's first sound")
    d.find_element(By.ID, "stop").click()
    assert not lfm2(d, "busy") and not lfm2(d, "playing")
    assert [m["role"] for m in lfm2(d, "history")] == ["user"]  # the answer dropped, the question kept
    assert "dropped from the history" in text_of(d, "events")
    wait(lambda: server.health()["rows_busy"] == 0, 10, "the server to free the row of the request closed")


def test_request_options_from_the_address(server, browser):
    d = browser(flags=())
    d.get(server.url + "/?temperature=0&seed=3&max_tokens=50&other=1")
    d.find_element(By.ID, "speak").click()  # text answers only
    type_turn(d, "Hi")
    body = wait(lambda: lfm2(d, "lastRequestBody"), 5, "the request")
    d.find_element(By.ID, "stop").click()
    assert {k: body.get(k) for k in ("temperature", "seed", "max_tokens", "other")} == {
        "temperature": 0, "seed": 3, "max_tokens": 50, "other": None}
    assert body["modalities"] == ["text"] and "audio" not in body


def test_live_captions(server, browser, recordings):
    d = browser(recordings["captions"])
    d.find_element(By.CSS_SELECTOR, "input[name=mode][value=captions]").click()
    d.find_element(By.ID, "start").click()

    def answered():  # one look at the captions: all of them answered, and two
        captions = lfm2(d, "captions")
        return len(captions) == 2 and all(c["status"] != "pending" for c in captions) and captions

    captions = wait(answered, 13 + ANSWER_TIMEOUT, "two captions")
    items = d.find_elements(By.CSS_SELECTOR, "#captions li")
    assert len(items) == 2
    first, second = captions
    assert 0 <= first["start"] < first["end"] < second["start"] < second["end"]
    assert 3.0 < first["end"] - first["start"] < 6.0 and 1.2 < second["end"] - second["start"] < 3.0
    # The gap between them is the recording's pause, give or take the pre-roll and tail the page keeps.
    assert 1.0 < second["start"] - first["end"] < 3.0
    for caption, item in zip(captions, items):
        assert caption["status"] == "done"
        (rate, channels, _), samples = read_wav(caption["wav"])
        assert (rate, channels) == (16000, 1)
        assert len(samples) / rate == pytest.approx(caption["end"] - caption["start"], abs=0.01)
        assert caption["text"] == server.transcribe(base64.b64decode(caption["wav"]))
        assert caption["text"].strip() in item.text

    def stamp(t, sep):
        ms = round(t * 1000)
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"

    spoken = [c for c in captions if c["text"].strip()]
    expected = {
        "txt": "".join(f"{c['text'].strip()}\n" for c in spoken),
        "srt": "".join(f"{i}\n{stamp(c['start'], ',')} --> {stamp(c['end'], ',')}\n{c['text'].strip()}\n\n"
                       for i, c in enumerate(spoken, 1)),
        "vtt": "WEBVTT\n\n" + "".join(f"{stamp(c['start'], '.')} --> {stamp(c['end'], '.')}\n{c['text'].strip()}\n\n"
                                      for c in spoken),
    }
    for fmt, text in expected.items():
        d.find_element(By.CSS_SELECTOR, f"[data-save={fmt}]").click()
        blob_text = d.execute_async_script("window.lfm2.lastDownload.blob.text().then(arguments[0])")
        assert blob_text == text
        saved = d.downloads / f"captions.{fmt}"
        wait(lambda: saved.exists() and saved.read_text() == text, 5, f"the download of captions.{fmt}")
    assert re.fullmatch(r"1\n00:00:0\d,\d{3} --> 00:00:0\d,\d{3}\n.+\n\n2\n.*", expected["srt"], re.S)


def test_http_error_is_shown(server, browser):
    d = browser(flags=())
    d.network_errors_expected = True  # the console reports the 400 response
    # An answer the server never gave, cited by id: any server refuses that with a 400.
    d.execute_script("window.lfm2.history.push({role: 'assistant', content: null, audio: {id: 'audio_none'}})")
    type_turn(d, "Hello")
    wait(lambda: text_of(d, "error"), ANSWER_TIMEOUT, "an error message")
    status, message = server.chat_error(lfm2(d, "lastRequestBody"))
    assert status == 400
    assert f"HTTP 400: {message}" in text_of(d, "error")
    assert lfm2(d, "history") == [{"role": "assistant", "content": None, "audio": {"id": "audio_none"}}]
    assert log(d) == [["user failed", "Hello"]]


def test_broken_stream_is_shown(server, browser):
    """The server goes away in the middle of an answer: the page says the stream broke and keeps the question."""
    # sampled, this answer runs to max_tokens (about a minute): the server is stopped in its middle, whatever
    # the machine's speed (a greedy answer of the tiny model ends in a fraction of a second)
    d = browser(flags=(), url=server.url, query="?temperature=1&seed=0&max_tokens=3000")
    d.network_errors_expected = True
    type_turn(d, "Tell me a long story")
    wait(lambda: lfm2(d, "playing"), ANSWER_TIMEOUT, "the answer's first sound")
    server.stop()
    try:
        wait(lambda: text_of(d, "error"), 10, "an error message")
        assert "broke" in text_of(d, "error"), text_of(d, "error")
        assert [m["role"] for m in lfm2(d, "history")] == ["user"]  # the partial answer is not cited
    finally:
        server.start()


def test_api_key(tiny_ckpt, browser):
    """A server started with --api-key: the page asks for the key, shows the 401 until it has it, then works."""
    keyed = Server(tiny_ckpt, "--api-key", "sesame")
    keyed.start()
    try:
        d = browser(flags=(), url=keyed.url)
        d.network_errors_expected = True  # the 401
        key = d.find_element(By.ID, "api-key")
        wait(key.is_displayed, 5, "the API key field, once /health says the server wants one")
        type_turn(d, "Hello")
        wait(lambda: "HTTP 401" in text_of(d, "error"), ANSWER_TIMEOUT, "the 401")
        key.send_keys("sesame", Keys.ENTER)
        type_turn(d, "Hello again")
        wait_history(d, 2, what=f"the answer with the key (page: {text_of(d, 'error')!r}, {log(d)})")
    finally:
        keyed.stop()


@pytest.mark.parametrize("flags, message", [
    (["--use-fake-device-for-media-stream", "--deny-permission-prompts"], "microphone permission refused"),
    ([], "no microphone found"),  # no fake device, and this machine has no sound card
])
def test_microphone_errors_are_shown(browser, flags, message):
    d = browser(flags=flags)
    if not flags and d.execute_async_script(
            "navigator.mediaDevices.enumerateDevices().then(ds => arguments[0](ds.some(d => d.kind == 'audioinput')))"):
        pytest.skip("this machine has a microphone")
    d.find_element(By.ID, "start").click()
    wait(lambda: text_of(d, "error"), 10, "an error message")
    assert text_of(d, "error") == message
    assert d.find_element(By.ID, "start").text == "Start listening"


def test_server_down_is_shown(server, browser):
    d = browser(flags=())
    d.network_errors_expected = True
    server.stop()
    try:
        wait(lambda: text_of(d, "server-state") == "server down", 8, "the server down notice")
        type_turn(d, "Hello")
        wait(lambda: text_of(d, "error"), 10, "an error message")
        assert "server down" in text_of(d, "error")
        assert lfm2(d, "history") == []
    finally:
        server.start()
    wait(lambda: text_of(d, "server-state") == "ready", 8, "the server up again")
