"""The README's Python examples, run as written on the tiny test checkpoint (its repo id replaced by the folder, the
server's address by a test server's), and its commands: the test line that CI runs, and the quick subset."""

import os
import re
import subprocess
import sys

import soundfile as sf

from conftest import ROOT
from test_server import start_server

README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.S)


def run_example(code: str, cwd, **replace) -> subprocess.CompletedProcess:
    for old, new in replace.items():
        assert old in code, f"the README example no longer holds {old!r}"
        code = code.replace(old, new)
    (cwd / "assets").symlink_to(ROOT / "assets")
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=900,
                       env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"the README example failed:\n{code}\n{r.stderr}"
    return r


def test_python_example(tiny_ckpt, tmp_path):
    """The one-call example: a spoken answer, a transcript, a TTS file."""
    code = next(c for c in EXAMPLES if "from tasks import" in c)
    assert len(code.strip().splitlines()) <= 8, "the first Python example should stay short"
    r = run_example(code, tmp_path, **{'"LiquidAI/LFM2-Audio-1.5B"': f'"{tiny_ckpt}"'})
    assert r.stdout.strip(), "no transcript printed"
    for name in ("answer.wav", "hello.wav"):
        assert sf.info(str(tmp_path / name)).samplerate == 24000


def test_server_example(tiny_ckpt, tmp_path):
    """The OpenAI client example against serve.py."""
    code = next(c for c in EXAMPLES if "from openai import" in c)
    server, port = start_server(tiny_ckpt)
    try:
        r = run_example(code, tmp_path, **{"http://127.0.0.1:8000/v1": f"http://127.0.0.1:{port}/v1"})
    finally:
        server.kill()
    assert r.stdout.strip(), "no transcript printed"
    assert sf.info(str(tmp_path / "hello.wav")).samplerate == 24000


def test_commands():
    """The set-up and test commands are where .ci/run and a newcomer look for them."""
    assert "    pip install -e . && python run.py --wav assets/question.wav\n" in README
    assert '    pip install -e ".[test]" && python .ci/reference.py && python -m pytest -q\n' in README
    assert "pytest -q -m quick" in README
    assert len(README.splitlines()) <= 200, "the README is a user's guide: measurements go to BENCHMARKS.md"
