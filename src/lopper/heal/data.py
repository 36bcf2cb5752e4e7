"""Training data for heal: the text files as one token stream cut into windows (or, for encoders, their lines), in
an order fixed by the seed alone. Global step s trains on items [s*G, (s+1)*G) of that order (G = global batch),
whatever the number of processes: accelerate gives process r the micro-batches r, r+P, r+2P, ..."""
from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from ..errors import LopperError
from ..text import read_text, token_stream

log = logging.getLogger("lopper")


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
    """[n, seq_len] non-overlapping windows of the files' joint token stream, shuffled. cap_tokens (0: one pass) is
    the number of tokens wanted: fewer than the stream holds takes the head of the order; more repeats the stream,
    each further pass in a new order and with the window boundaries moved by a golden-ratio fraction of seq_len,
    so that a window seldom recurs word for word (multi-epoch distillation, e.g. 20M tokens from a 5M-token corpus)."""
    stream = torch.cat([token_stream(tokenizer, read_text(p, "--text")) for p in paths])
    n = len(stream) // seq_len
    if n == 0:
        raise LopperError(f"--text has {len(stream)} tokens, fewer than one window of --seq-len {seq_len}: give "
                          "more text or a smaller --seq-len")
    want = max(1, cap_tokens // seq_len) if cap_tokens else n
    chunks, have = [], 0
    while have < want:  # each pass adds at least one window
        p = len(chunks)
        shift = round(p * 0.618 * seq_len) % seq_len if n > 1 else 0
        k = (len(stream) - shift) // seq_len
        chunks.append(stream[shift:shift + k * seq_len].view(k, seq_len)[_order(k, seed + p)][:want - have])
        have += len(chunks[-1])
    if len(chunks) > 1:
        log.info("--tokens %d is %.2f passes over the %d tokens of --text: each pass in a new order, windows shifted",
                 cap_tokens, want * seq_len / len(stream), len(stream))
    return torch.cat(chunks)


def encoder_items(tokenizer, paths: list[str], seq_len: int, mode: str, seed: int,
                  cap_tokens: int = 0) -> list[torch.Tensor]:
    """Token ids with the tokenizer's special tokens: one per non-empty line (truncated to seq_len), or windows.
    Lines repeat, each pass in a new order, while cap_tokens wants more than one pass holds."""
    if mode == "windows":
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        ends = [t for t in (cls, sep) if t is not None]
        body = windows(tokenizer, paths, seq_len - len(ends), seed, cap_tokens)
        pre = torch.tensor([cls] if cls is not None else [], dtype=torch.long)
        post = torch.tensor([sep] if sep is not None else [], dtype=torch.long)
        return [torch.cat([pre, w, post]) for w in body]
    lines = [line.strip() for p in paths for line in read_text(p, "--text").splitlines() if line.strip()]
    ids = tokenizer(lines, truncation=True, max_length=seq_len, verbose=False)["input_ids"]
    items, total, p = [], 0, 0
    while True:
        for i in _order(len(ids), seed + p).tolist():
            if cap_tokens and total + len(ids[i]) > cap_tokens:
                return items
            items.append(torch.tensor(ids[i], dtype=torch.long))
            total += len(ids[i])
        p += 1
        if not cap_tokens or not ids:
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
