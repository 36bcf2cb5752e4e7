"""Training data for heal: the text files as one token stream cut into windows (or, for encoders, their lines), in
an order fixed by the seed alone. Global step s trains on items [s*G, (s+1)*G) of that order (G = global batch),
whatever the number of processes: accelerate gives process r the micro-batches r, r+P, r+2P, ..."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..errors import LopperError
from ..text import read_text, token_stream


class Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _order(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def windows(tokenizer, paths: list[str], seq_len: int, seed: int, cap_tokens: int = 0) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows of the files' joint token stream, shuffled; at most cap_tokens tokens."""
    stream = torch.cat([token_stream(tokenizer, read_text(p, "--text")) for p in paths])
    n = len(stream) // seq_len
    if n == 0:
        raise LopperError(f"--text has {len(stream)} tokens, fewer than one window of --seq-len {seq_len}: give "
                          "more text or a smaller --seq-len")
    order = _order(n, seed)
    if cap_tokens:
        order = order[:max(1, cap_tokens // seq_len)]
    return stream[:n * seq_len].view(n, seq_len)[order]


def encoder_items(tokenizer, paths: list[str], seq_len: int, mode: str, seed: int,
                  cap_tokens: int = 0) -> list[torch.Tensor]:
    """Token ids with the tokenizer's special tokens: one per non-empty line (truncated to seq_len), or windows."""
    if mode == "windows":
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        ends = [t for t in (cls, sep) if t is not None]
        body = windows(tokenizer, paths, seq_len - len(ends), seed, cap_tokens)
        pre = torch.tensor([cls] if cls is not None else [], dtype=torch.long)
        post = torch.tensor([sep] if sep is not None else [], dtype=torch.long)
        return [torch.cat([pre, w, post]) for w in body]
    lines = [line.strip() for p in paths for line in read_text(p, "--text").splitlines() if line.strip()]
    ids = tokenizer(lines, truncation=True, max_length=seq_len, verbose=False)["input_ids"]
    items, total = [], 0
    for i in _order(len(ids), seed).tolist():
        if cap_tokens and total + len(ids[i]) > cap_tokens:
            break
        items.append(torch.tensor(ids[i], dtype=torch.long))
        total += len(ids[i])
    return items


def stack(batch: list[torch.Tensor]) -> dict:
    return {"input_ids": torch.stack(batch)}


class Pad:
    """Collate for encoders: right-pad to the longest item, with an attention mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[torch.Tensor]) -> dict:
        n = max(len(x) for x in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, :len(x)], mask[i, :len(x)] = x, 1
        return {"input_ids": ids, "attention_mask": mask}
