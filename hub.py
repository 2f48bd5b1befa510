"""The checkpoint from the Hugging Face Hub: a local folder as it is, or a repo id fetched into the hub cache.

Only the files the model needs are downloaded; with HF_HUB_OFFLINE=1 only the cache is used.
"""

from pathlib import Path

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
DETOKENIZER_DIR = "audio_detokenizer"  # LFM2.5-Audio's LFM2 vocoder (detokenizer.py); absent in LFM2-Audio
CHECKPOINT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MIMI_FILE]
DOWNLOAD_PATTERNS = CHECKPOINT_FILES + [f"{DETOKENIZER_DIR}/*"]


def checkpoint_folder(repo_id_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id (owner/name), fetched into the hub cache."""
    path = Path(repo_id_or_path)
    if path.is_dir():
        return path
    name = str(repo_id_or_path)
    if isinstance(repo_id_or_path, Path) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name}: no such checkpoint folder (nor a Hugging Face repo id owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=DOWNLOAD_PATTERNS))
    except (OSError, ValueError) as e:  # offline cache miss, unknown repo, network down (hub errors are OSErrors)
        raise FileNotFoundError(f"{name}: could not get the checkpoint from Hugging Face ({type(e).__name__}: "
                                f"{e}); a local folder works too (--model DIR), and HF_HUB_OFFLINE=1 uses what "
                                "the hub cache already holds") from None
