"""heal's training windows: --tokens below one pass takes the head of the seeded order (as before repetition existed),
above it repeats the text in new orders with shifted boundaries, and every window is a real slice of the text."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lopper.heal import data


class CharTokenizer:
    """One token per character, its code point: window contents tell where in the text they came from."""

    def __call__(self, text, **_):
        return {"input_ids": [ord(c) for c in text]}


def _text(tmp_path, n: int) -> str:
    path = tmp_path / "text.txt"
    path.write_text("".join(chr(0x100 + i) for i in range(n)), encoding="utf-8")
    return str(path)


@settings(max_examples=40, deadline=None)
@given(seq_len=st.integers(16, 40), length=st.integers(1, 5), frac=st.floats(0, 3.0), seed=st.integers(0, 9))
def test_windows_repeat_text_without_recurring(tmp_path_factory, seq_len, length, frac, seed):
    n_tokens = length * seq_len + seq_len // 3
    path = _text(tmp_path_factory.mktemp("w"), n_tokens)
    cap = int(frac * n_tokens)
    w = data.windows(CharTokenizer(), [path], seq_len, seed, cap)
    n = n_tokens // seq_len
    assert w.shape == (max(1, cap // seq_len) if cap else n, seq_len)
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(len(w), seq_len - 1, dtype=torch.long))  # contiguous slices
    assert int(w.min()) >= 0x100 and int(w.max()) < 0x100 + n_tokens
    one_pass = data.windows(CharTokenizer(), [path], seq_len, seed)
    assert torch.equal(w[:len(one_pass)], one_pass[:len(w)])  # pass 0 is the one-pass order
    if n > 1 and len(w) <= 3 * n:  # three passes have three distinct boundary shifts at seq_len >= 16
        assert len({tuple(r) for r in w[:, :1].tolist()}) == len(w)


def test_encoder_lines_repeat_in_new_order(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(f"line {i}" for i in range(10)), encoding="utf-8")

    class Tok:
        def __call__(self, lines, **_):
            return {"input_ids": [[ord(c) for c in line] for line in lines]}

    one = data.encoder_items(Tok(), [str(path)], 32, "lines", 0)
    assert len(one) == 10
    more = data.encoder_items(Tok(), [str(path)], 32, "lines", 0, cap_tokens=25 * 6)
    assert len(more) == 25 and [x.tolist() for x in more[:10]] == [x.tolist() for x in one]
    assert sorted(x.tolist() for x in more[10:20]) == sorted(x.tolist() for x in one)
    assert [x.tolist() for x in more[10:20]] != [x.tolist() for x in one]
