"""GGUF out: a cut model written as a .gguf file reads back (through transformers' GGUF reader, which undoes
llama.cpp's layout on its own) as the same model up to its weight type's rounding; cutting nothing gives back the
input's tensors byte for byte; the tokenizer metadata is the input's; what a GGUF cannot hold is refused by name."""
from __future__ import annotations

import importlib.util

import json

import pytest
import torch

gguf = pytest.importorskip("gguf")

import lopper  # noqa: E402
from lopper import gguf_out, io  # noqa: E402
from lopper.cli import main  # noqa: E402
from lopper.errors import LopperError  # noqa: E402
from ggufs import byte_level_bpe, stored, write_gguf  # noqa: E402
from tiny import outputs, tiny_model, tree_digest  # noqa: E402

T = gguf.GGMLQuantizationType
SHAPE = dict(layers=3, heads=4, kv_heads=2, head_dim=16, mlp=64, vocab=300, init=0.2)
CUT = dict(drop_layers=1, mlp=0.5, width_metric="magnitude", repair="none", quiet=True)
IDS = torch.randint(4, SHAPE["vocab"], (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tok():
    return byte_level_bpe(SHAPE["vocab"])


def source(tmp_path, tok, arch="llama", kind=T.F32, tied=False):
    """transformers' GGUF reader takes Qwen3's head size from its config class (128), not from the file."""
    path = tmp_path / f"in-{arch}-{kind.name}.gguf"
    shape = {**SHAPE, "head_dim": 128} if arch == "qwen3" else SHAPE
    write_gguf(path, tiny_model(arch, tied=tied, **shape), tok, kind, arch=arch)
    return path


def fields(path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("kind", [T.F32, T.Q8_0, T.Q4_1])
def test_cutting_nothing_gives_back_the_input_tensors_byte_for_byte(tmp_path, tok, kind):
    path = source(tmp_path, tok, kind=kind, tied=True)
    model, _, adapter = io.load_model(str(path))
    gguf_out.write(model, adapter, str(path), tmp_path / "same.gguf")
    a, b = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(tmp_path / "same.gguf"))
    assert sorted(t.name for t in a.tensors) == sorted(t.name for t in b.tensors)  # no output.weight: tied
    before = {t.name: (t.tensor_type, bytes(t.data)) for t in a.tensors}
    assert all(before[t.name] == (t.tensor_type, bytes(t.data)) for t in b.tensors)
    written = fields(tmp_path / "same.gguf")
    assert written.pop("general.file_type") == (0 if kind == T.F32 else gguf.LlamaFileType[f"MOSTLY_{kind.name}"])
    assert written == fields(path)  # the template has no file_type


@pytest.mark.parametrize("arch,heads", [("llama", 0.5), ("llama", 0.0), ("qwen2", 0.0), ("qwen3", 0.0)])
@pytest.mark.parametrize("kind", [T.F32, T.Q8_0])
def test_an_exported_cut_reads_back_as_the_cut_model(tmp_path, tok, arch, heads, kind):
    """transformers reads qwen head sizes as hidden / heads (it ignores key_length), so heads are cut on llama only."""
    path = source(tmp_path, tok, arch)
    lopper.prune(model=str(path), out=str(tmp_path / "cut"), heads=heads, **CUT)
    assert main(["export", str(tmp_path / "cut"), "--format", "gguf", "--out", str(tmp_path / "cut.gguf"),
                 "--gguf-type", kind.name, "--quiet"]) == 0
    back, _, _ = io.load_model(str(tmp_path / "cut.gguf"))
    expected = stored(lopper.load(str(tmp_path / "cut")).float(), kind)
    assert (outputs(back, IDS) - outputs(expected, IDS)).abs().max() < 1e-4
    meta = fields(tmp_path / "cut.gguf")
    assert meta[f"{arch}.block_count"] == 2 and meta[f"{arch}.feed_forward_length"] == 32
    assert meta[f"{arch}.attention.head_count"] == (2 if heads else 4)
    assert (f"{arch}.attention.key_length" in meta) == bool(heads)  # llama.cpp's head size when heads * d != hidden
    tokenizer_keys = {k: v for k, v in fields(path).items() if k.startswith("tokenizer.")}
    assert tokenizer_keys and all(meta[k] == v for k, v in tokenizer_keys.items())


def test_prune_writes_a_smaller_gguf_in_the_input_types_with_plan_and_report(tmp_path, tok):
    path = source(tmp_path, tok, kind=T.Q8_0)
    before = tree_digest(tmp_path)
    out = tmp_path / "out" / "small.gguf"
    assert main(["prune", str(path), "--out", str(out), "--drop-layers", "1", "--mlp", "0.4", "--width-metric",
                 "magnitude", "--repair", "none", "--quiet"]) == 0
    assert tree_digest(tmp_path) == {**before, **tree_digest(tmp_path)}  # the input is untouched
    page = ["small.lopper_report.html"] if importlib.util.find_spec("matplotlib") else []
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.gguf", "small.lopper_plan.json", *page,
                                                            "small.lopper_report.json"]
    report = json.loads((out.parent / "small.lopper_report.json").read_text())
    assert report["size_bytes_after"] == out.stat().st_size < 0.8 * path.stat().st_size
    assert report["gguf"]["types"] == {"Q8_0": 2 + 2 * 7, "F32": 2 * 2 + 1} and not report["gguf"]["f16_fallback"]
    meta = fields(out)
    assert meta["llama.feed_forward_length"] % 32 == 0  # 0.4 of 64 rounded to whole Q8_0 blocks
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert lopper.plan(model=str(path), out=str(tmp_path / "p.json"), plan=str(out.parent / "small.lopper_plan.json"),
                       quiet=True).layers is not None


def test_rows_that_are_not_whole_blocks_are_written_in_f16(tmp_path, tok):
    path = source(tmp_path, tok, kind=T.Q8_0)
    report = lopper.prune(model=str(path), out=str(tmp_path / "o.gguf"), round_to=8, mlp=0.25, **{
        k: v for k, v in CUT.items() if k != "mlp" and k != "drop_layers"})
    assert len(report["gguf"]["f16_fallback"]) == 3 and all("ffn_down" in n for n in report["gguf"]["f16_fallback"])
    back, _, _ = io.load_model(str(tmp_path / "o.gguf"))
    assert back.config.intermediate_size == 48


@pytest.mark.parametrize("given,written", [(T.Q4_K, T.Q4_1), (T.Q6_K, T.Q8_0), (T.Q5_K, T.Q5_1), (T.IQ4_XS, T.Q4_0),
                                           (T.Q4_1, T.Q4_1), (T.BF16, T.BF16)])
def test_types_gguf_cannot_write_become_the_next_legacy_type_up(given, written):
    assert gguf_out._writable(given) == written


def test_what_a_gguf_cannot_hold_is_refused_before_any_work(tmp_path, tok, capsys):
    path = source(tmp_path, tok)
    lopper.prune(model=str(path), out=str(tmp_path / "folder"), **CUT)
    cases = [([str(tmp_path / "folder"), "--out", str(tmp_path / "x.gguf"), "--mlp", "0.5"],
              "copies the tokenizer and settings from the input GGUF"),
             ([str(path), "--out", str(tmp_path / "x.gguf"), "--params", "0.2", "--allocation", "global"],
              "--allocation global"),
             ([str(path), "--out", str(path), "--mlp", "0.5"], "is the input model")]
    for argv, message in cases:
        assert main(["prune", *argv, "--quiet"]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "taken.gguf").write_bytes(b"x")
    assert main(["prune", str(path), "--out", str(tmp_path / "taken.gguf"), "--mlp", "0.5", "--quiet"]) == 2
    assert "pass --force" in capsys.readouterr().err and (tmp_path / "taken.gguf").read_bytes() == b"x"
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(LopperError, match="not supported for llama.cpp architecture 'llama'"):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(gguf_out, "ARCHES", ("qwen2",))
            gguf_out.check_source(str(path))
