"""pytest fixtures (the official reference package, the test checkpoint folders built by `.ci/fixtures.py`) and
the helpers the test files share.

Without the official package the parity tests skip, except where LFM2AUDIO_REQUIRE_REFERENCE=1 or CI=true (as
`.ci/run` sets): there a missing reference fails, and so does a run in which any test was skipped, deselected or
marked xfail, or a test file was left out.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / ".ci"))
import fixtures  # noqa: E402  (.ci/fixtures.py)

REQUIRE_REFERENCE = os.environ.get("LFM2AUDIO_REQUIRE_REFERENCE") == "1" or os.environ.get("CI") == "true"


def official():
    """The official `liquid_audio` package; skip, or fail in CI, when it is missing."""
    try:
        return fixtures.official()
    except ImportError as e:
        if REQUIRE_REFERENCE:
            pytest.fail(str(e), pytrace=False)
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A folder with an LFM2-shaped tokenizer.json (merges as "a b" strings) and tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("tokenizer")
    fixtures.write_tokenizer(folder)
    return folder


def pytest_configure(config):
    config.addinivalue_line("markers", "full_size: uses the full-size checkpoint (~6 GB RAM per model; run "
                                       "under flock /tmp/lfm2audio-bigmem.lock). Runs in CI, never skipped.")
    config.addinivalue_line("markers", "quick: the edit-test loop's subset (`pytest -m quick`, a few minutes); "
                                       "CI runs everything")


_ran = {"files": set(), "skipped": 0, "deselected": 0, "marked xfail": 0}  # counted here, not by a plugin


def pytest_collection_finish(session):
    _ran["files"].update(Path(str(item.path)).name for item in session.items)


def pytest_deselected(items):
    _ran["deselected"] += len(items)


def pytest_runtest_logreport(report):
    if hasattr(report, "wasxfail"):  # xfailed or xpassed
        if report.when == "call" or report.skipped:
            _ran["marked xfail"] += 1
    elif report.skipped:
        _ran["skipped"] += 1


def pytest_sessionfinish(session, exitstatus):
    """In CI every test runs: a skipped test is a failed run (a parity test that does not run checks nothing), and
    so is one that selected, deselected or left out tests in a way the README's test line cannot show (`-k`, `-m`,
    `--deselect`, `--ignore` in addopts, an xfail marker)."""
    if not REQUIRE_REFERENCE or exitstatus != 0:
        return
    problems = [f"{n} test(s) {kind}" for kind, n in _ran.items() if kind != "files" and n]
    missing = sorted({p.name for p in ROOT.glob("test_*.py")} - _ran["files"])
    if missing:
        problems.append(f"test files not run: {', '.join(missing)}")
    if problems:
        print(f"\nerror: {'; '.join(problems)}; CI runs every test", file=sys.stderr)
        session.exitstatus = 1


@pytest.fixture(scope="session")
def tiny_ckpt() -> Path:
    """A TINY_CONFIG checkpoint folder (seed 0), cached on disk."""
    official()
    return fixtures.cached_checkpoint(fixtures.TINY_CONFIG, 0)


@pytest.fixture(scope="session")
def official_tiny(tiny_ckpt):
    """(official LFM2AudioModel, LFM2AudioProcessor) on the tiny checkpoint, float32 on CPU; shared, not to be
    modified."""
    return fixtures.load_official(tiny_ckpt)


@pytest.fixture(scope="session")
def full_ckpt() -> Path:
    """A full-size checkpoint folder (the real config, seed 0; ~3.3 GB), cached on disk.

    Run tests that use it under `flock /tmp/lfm2audio-bigmem.lock`.
    """
    official()
    return fixtures.cached_checkpoint(fixtures.FULL_CONFIG, 0)


@pytest.fixture(scope="session")
def lfm25_ckpt() -> Path:
    """An LFM2.5-Audio-shaped folder: the TINY_CONFIG checkpoint plus a real-size `audio_detokenizer/` (seed 0),
    cached on disk."""
    official()
    return fixtures.cached_lfm25_checkpoint(fixtures.TINY_CONFIG, 0)


# ---- helpers shared by the test files ----

ROOT = Path(__file__).resolve().parent
RUN_PY = ROOT / "run.py"


def add_turn(chat, turn, official: bool = False):
    """The user turn (("audio", file in assets/) or ("text", message)) on our Chat or the official ChatState
    (official=True: it takes a [1, T] wave), closed; the assistant's opened."""
    import audio
    kind, value = turn
    chat.new_turn("user")
    if kind == "audio":
        wave, rate = audio.load_audio(fixtures.ASSETS / value)
        chat.add_audio(wave[None] if official else wave, rate)
    else:
        chat.add_text(value)
    chat.end_turn()
    chat.new_turn("assistant")


def record_prefills(model, monkeypatch) -> list:
    """A list that gets (start, number of positions) of each `model.prefill` call."""
    calls, prefill = [], model.prefill
    monkeypatch.setattr(model, "prefill",
                        lambda x, start=0, row=0: calls.append((start, x.shape[1])) or prefill(x, start, row))
    return calls


def run_cli(args, cwd: Path, stdin: str | None = None, dtype: str | None = "float32", script: Path = RUN_PY,
            **env) -> subprocess.CompletedProcess:
    """run.py with `args` in `cwd`; `dtype` None: no --dtype, run.py picks it (auto). OMP_NUM_THREADS=1: on a CPU
    shared with other jobs two OpenMP threads spin-wait on each other; the thread count changes no result."""
    environment = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | env
    # float32 by default, as the official reference runs (--dtype auto is bf16 on CPUs with native bf16)
    dtype_args = ["--dtype", dtype] if dtype else []
    return subprocess.run([sys.executable, str(script), *dtype_args, *map(str, args)], cwd=cwd,
                          input=stdin or "", capture_output=True, text=True, timeout=900, env=environment)


def run_ok(args, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    r = run_cli(args, cwd, stdin)
    assert r.returncode == 0, f"run.py failed ({r.returncode}):\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r


def run_error(args, cwd: Path, expect: str, stdin: str | None = None, **env) -> str:
    """Run, expecting failure: non-zero exit, exactly one stderr line `error: ...` containing `expect`."""
    r = run_cli(args, cwd, stdin, **env)
    assert r.returncode != 0, f"expected a failure, got exit 0:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got:\n{r.stderr}"
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    return lines[0]
