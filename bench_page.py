"""The page's latency (`python bench.py page`): end of speech to first sound in the browser, against run.py's
first audio for the same recording, in one run. Prints a table and one JSON line.

The page runs in Debian's headless Chromium (driven by Selenium, a test dependency), its microphone a recording
played in real time: a second of quiet, assets/question.wav, three seconds of quiet. The page ends the turn when
its voice detection has heard the pause (0.7 s after the last word, the page's default), sends the turn to
serve.py, and shows `first audio N ms` (from the end of the turn to the first sample scheduled to play) once the
answer is in. run.py answers the same question.wav (its `[time]` line: from the prompt to the first audio
written). Both on the full-size random-weight checkpoint by default, greedy, with the same model options.
"""

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from bench_serve import ROOT, start_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream"]


def recording(folder: Path) -> Path:
    """question.wav between a second and three seconds of quiet noise (-55 dBFS), 16-bit: what the page hears."""
    question, rate = sf.read(ROOT / "assets" / "question.wav", dtype="float32")
    rng = np.random.default_rng(0)
    quiet = lambda s: (rng.standard_normal(int(s * rate)) * 10 ** (-55 / 20)).astype(np.float32)  # noqa: E731
    path = folder / "turn.wav"
    sf.write(path, np.concatenate([quiet(1), question, quiet(3)]), rate, subtype="PCM_16")
    return path


def page_first_audio(url: str, wav: Path, profile: Path, timeout: float = 600) -> float:
    """One spoken turn in a fresh browser: the page's `first audio N ms`, in seconds."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}", f"--use-file-for-fake-audio-capture={wav}%noloop"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        deadline = time.time() + timeout
        while driver.find_element(By.ID, "server-state").text != "ready":
            if time.time() > deadline:
                raise RuntimeError("the page does not see the server")
            time.sleep(0.1)
        driver.find_element(By.ID, "start").click()
        while not (m := re.search(r"first audio (\d+) ms", driver.find_element(By.ID, "status").text)):
            if time.time() > deadline:
                raise RuntimeError(f"no answer in the page: {driver.find_element(By.ID, 'error').text!r}")
            time.sleep(0.1)
        return int(m.group(1)) / 1000
    finally:
        driver.quit()


def run_py_first_audio(folder: Path, options: list) -> float:
    """run.py's first audio for question.wav (a whole process; its `[time]` line)."""
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--model", str(folder), "--wav",
                        str(ROOT / "assets" / "question.wav"), "--out", "/tmp/bench-page-answer.wav", *options],
                       capture_output=True, text=True)
    m = re.search(r"first audio ([\d.]+) s", r.stderr)
    if not m:
        raise RuntimeError(f"run.py: {r.stderr[-500:]}")
    return float(m.group(1))


def bench_page(args) -> dict:
    """End of speech to first sound in the page (serve.py, headless Chromium, a recorded question) against
    run.py's first audio for the same recording, alternating, medians of --rounds each."""
    from fixtures import FULL_CONFIG, cached_checkpoint

    folder = Path(args.model) if args.model else cached_checkpoint(FULL_CONFIG, 0)
    options = ["--device", "cpu", "--dtype", args.dtype, "--greedy", "--max-new-tokens", str(args.steps),
               "--quantize", args.quantize]
    page, cli = [], []
    with tempfile.TemporaryDirectory() as tmp:
        wav = recording(Path(tmp))
        server, port = start_server(folder, *options, "--batch", 1)
        try:
            for i in range(args.rounds + 1):  # the first round warms both up and is not counted
                t_page = page_first_audio(f"http://127.0.0.1:{port}/", wav, Path(tmp) / f"profile{i}")
                t_cli = run_py_first_audio(folder, options)
                if i:
                    page.append(t_page)
                    cli.append(t_cli)
                print(f"round {i}{'' if i else ' (warm-up)'}: page {t_page:.3f} s, run.py {t_cli:.3f} s", flush=True)
        finally:
            server.kill()
            server.wait()
    result = {"bench": "page", "options": options, "rounds": args.rounds, "page_s": page, "run_py_s": cli,
              "page_median_s": statistics.median(page), "run_py_median_s": statistics.median(cli),
              "difference_ms": round(1000 * (statistics.median(page) - statistics.median(cli)), 1)}
    print(f"first audio: page {result['page_median_s']:.3f} s (end of the turn to the first sound), run.py "
          f"{result['run_py_median_s']:.3f} s (medians of {args.rounds}): {result['difference_ms']:+.0f} ms")
    print(json.dumps(result))
    return result


def add_parsers(sub):
    p = sub.add_parser("page", help=bench_page.__doc__)
    p.add_argument("--model", help="checkpoint folder (default: the full-size random-weight test fixture)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", default="int8", choices=["int8", "int4"])
    p.add_argument("--steps", type=int, default=64, help="greedy steps per answer (the server's --max-new-tokens)")
    p.add_argument("--rounds", type=int, default=3, help="measurements on each side")
    p.set_defaults(fn=bench_page)
