"""llama.cpp itself reads what `lopper prune --out FILE.gguf` writes: its perplexity of a cut tiny model equals
lopper's of the same file, scored the same way. Runs where llama.cpp's tools are built: set LOPPER_LLAMA_CPP_BIN
to the folder with llama-perplexity (benchmarks/gguf_llamacpp.py says how to build it); skipped elsewhere."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
BIN = os.environ.get("LOPPER_LLAMA_CPP_BIN", "")
pytestmark = pytest.mark.skipif(not (BIN and Path(BIN, "llama-perplexity").is_file()),
                                reason="llama.cpp not built here: set LOPPER_LLAMA_CPP_BIN")

import lopper  # noqa: E402
from lopper.io import load_model  # noqa: E402
from ggufs import byte_level_bpe, write_gguf  # noqa: E402
from tiny import calibration_text, tiny_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gguf_llamacpp as bench  # noqa: E402

T = gguf.GGMLQuantizationType


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_llama_cpp_reads_the_cut_file_as_lopper_does(tmp_path, kind, monkeypatch):
    tok = byte_level_bpe(300)
    path = tmp_path / "in.gguf"
    write_gguf(path, tiny_model("llama", layers=3, heads=4, kv_heads=2, head_dim=16, mlp=64, vocab=300, init=0.2),
               tok, T.F32)
    out = tmp_path / "cut.gguf"
    lopper.prune(model=str(path), out=str(out), drop_layers=1, mlp=0.5, heads=0.5, width_metric="magnitude",
                 repair="none", gguf_type=kind, quiet=True)
    text = tmp_path / "text.txt"
    text.write_text(calibration_text()[:40000])
    monkeypatch.setattr(bench, "WIKI", text)
    args = type("A", (), dict(bin=BIN, ctx=64, chunks=8, threads=2))()
    ours = bench.lopper_perplexity(args, *load_model(str(out))[:2], add_bos=False)
    theirs = bench.llama_perplexity(args, str(out))
    assert abs(theirs["perplexity"] / ours["perplexity"] - 1) < (0.002 if kind == "F32" else 0.02)
