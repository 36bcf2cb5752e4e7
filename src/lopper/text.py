"""Text to token windows, for calibration and perplexity."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .errors import LopperError


def default_calibration_path() -> Path:
    return Path(str(resources.files("lopper") / "data" / "calibration.txt"))


def read_text(path: str | Path, flag: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise LopperError(f"{flag} {p} does not exist: give the path of a UTF-8 text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise LopperError(f"{flag} {p} is empty: give a text file with content")
    return text


def token_stream(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one stream of token ids (no special tokens between documents)."""
    ids: list[int] = []
    for start in range(0, len(text), 200_000):  # chunks keep fast tokenizers' memory flat on big files
        ids += tokenizer(text[start:start + 200_000], add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer, path: str | Path | None, samples: int, seq_len: int) -> list[torch.Tensor]:
    """`samples` non-overlapping windows of `seq_len` tokens, spread evenly over the text: [1, seq_len] each."""
    if samples < 1 or seq_len < 2:
        raise LopperError(f"--calib-samples {samples} / --seq-len {seq_len} too small: use at least 1 and 2")
    path = path or default_calibration_path()
    stream = token_stream(tokenizer, read_text(path, "--calib"))
    need = samples * seq_len
    if len(stream) < need:
        raise LopperError(f"--calib {path} has {len(stream)} tokens but --calib-samples {samples} x --seq-len "
                          f"{seq_len} needs {need}: give a longer file or lower --calib-samples / --seq-len")
    gap = (len(stream) - need) // samples
    return [stream[i * (seq_len + gap):i * (seq_len + gap) + seq_len][None] for i in range(samples)]
