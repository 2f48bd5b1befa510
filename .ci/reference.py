"""Make the official `liquid-audio` 1.3.0 package importable on Python 3.11, for the parity tests.

    python .ci/reference.py          # install into .ci/reference/ (idempotent, quick when done)
    python .ci/reference.py --check  # exit 1 unless the reference imports

The wheel declares Python >= 3.12 for four lines of 3.12-only syntax, and its processor imports
torchaudio (no build for our torch) for one pure-PyTorch function, `functional.resample`. So we unzip
the wheel, rewrite those four lines in 3.11 syntax, and put beside it a stub `torchaudio` package whose
`functional.resample` is the function's own source, cut out of torchaudio's wheel. Nothing here is
committed: both wheels come from PyPI at install time. Tests import it through `ensure_on_path()`.
"""

import ast
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "reference"  # git-ignored
STAMP = TARGET / "INSTALLED"
LIQUID_AUDIO = "liquid-audio==1.3.0"
TORCHAUDIO = "torchaudio==2.9.0"
# packages the reference imports (beyond our own runtime dependencies)
REFERENCE_DEPS = ["transformers>=4.55.4", "accelerate", "einops", "librosa", "sentencepiece"]

# the four lines of Python 3.12 syntax, and their 3.11 spelling
PATCHES = {
    "liquid_audio/model/transformer.py": [
        ('type CacheType = torch.Tensor | None | Sequence["CacheType"]',
         'CacheType = Any  # 3.11: was a `type` alias'),
        ("def wrap_activation_checkpoint[T: nn.Module](mod: T) -> T:",
         "def wrap_activation_checkpoint(mod):"),
    ],
    "liquid_audio/utils.py": [
        ("def mel2emb_len[T: (int, torch.Tensor)](l: T) -> T:", "def mel2emb_len(l):"),
        ("def emb2mel_len[T: (int, torch.Tensor)](l: T) -> T:", "def emb2mel_len(l):"),
    ],
}
RESAMPLE_DEFS = ["_CPU", "_get_sinc_resample_kernel", "_apply_sinc_resample_kernel", "resample"]


def ensure_on_path() -> None:
    if str(TARGET) not in sys.path:
        sys.path.insert(0, str(TARGET))


def download(spec: str, dest: Path, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", *extra, "-d", str(dest), spec]
    subprocess.run(cmd, check=True)
    name = spec.split("==")[0].replace("-", "_")
    return next(dest.glob(f"{name}-*.whl"))


def install_liquid_audio(tmp: Path) -> None:
    with zipfile.ZipFile(download(LIQUID_AUDIO, tmp)) as z:
        z.extractall(TARGET, [n for n in z.namelist() if n.startswith("liquid_audio/")])
    for rel, subs in PATCHES.items():
        path = TARGET / rel
        src = path.read_text()
        for old, new in subs:
            if old not in src:
                raise SystemExit(f"reference: expected line not found in {rel}: {old}")
            src = src.replace(old, new)
        path.write_text(src)


def install_torchaudio_stub(tmp: Path) -> None:
    wheel = download(TORCHAUDIO, tmp, "--platform", "manylinux_2_28_x86_64")
    with zipfile.ZipFile(wheel) as z:
        src = z.read("torchaudio/functional/functional.py").decode()
    defs = {}  # top-level name -> its statement
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef):
            defs[node.name] = node
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            defs[node.targets[0].id] = node
    body = "\n\n\n".join(ast.get_source_segment(src, defs[name]) for name in RESAMPLE_DEFS)
    pkg = TARGET / "torchaudio"
    (pkg / "functional").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        f"# stub: only functional.resample, cut from {wheel.name}\nfrom . import functional\n")
    (pkg / "functional" / "__init__.py").write_text(
        "import math\nfrom typing import Optional\n\nimport torch\nfrom torch import Tensor\n\n\n" + body + "\n")


def check() -> None:
    ensure_on_path()
    import liquid_audio  # noqa: F401
    import torchaudio.functional  # noqa: F401

    assert torchaudio.__file__.startswith(str(TARGET)), torchaudio.__file__


def install() -> None:
    if STAMP.exists():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *REFERENCE_DEPS], check=True)
    TARGET.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        install_liquid_audio(Path(tmp))
        install_torchaudio_stub(Path(tmp))
    check()
    STAMP.write_text(f"{LIQUID_AUDIO} {TORCHAUDIO}\n")


if __name__ == "__main__":
    if "--check" in sys.argv:
        try:
            check()
        except Exception as e:  # one line, not a traceback
            raise SystemExit(f"reference not importable: {type(e).__name__}: {e}")
        print("reference OK:", TARGET)
    else:
        install()
        print("reference installed:", TARGET)
