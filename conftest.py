"""pytest fixtures: the official reference package and the test checkpoint folders (built by `.ci/fixtures.py`).

Without the official package the parity tests skip, except where LFM2AUDIO_REQUIRE_REFERENCE=1 or CI=true (as
`.ci/run` sets): there a missing reference fails.
"""

import os
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
