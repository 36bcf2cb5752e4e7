"""GGUF in: a tiny Llama written with gguf's own GGUFWriter (llama.cpp's tensor names, q/k rows in llama.cpp's
permuted order, a byte-level BPE vocabulary in the metadata) reads back as the model it was written from, and lopper
prunes it into a standard safetensors folder that plain transformers loads."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

import lopper  # noqa: E402
from lopper import io  # noqa: E402
from lopper.cli import main  # noqa: E402
from lopper.errors import LopperError  # noqa: E402
from ggufs import byte_level_bpe, stored, write_gguf  # noqa: E402
from tiny import calibration_text, outputs, tiny_model, tree_digest  # noqa: E402

T = gguf.GGMLQuantizationType
SHAPE = dict(layers=3, heads=4, kv_heads=2, head_dim=16, mlp=64, vocab=300, init=0.2)  # rows: multiples of 32
FAST = ["--calib-samples", "4", "--seq-len", "32", "--quiet"]
SENTENCE = "The capital of France is Paris, and the Senate met there."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """kind -> (the .gguf file, alone in its folder; the reference folder: the same weights as safetensors)."""
    root = tmp_path_factory.mktemp("gguf")
    tok = byte_level_bpe(SHAPE["vocab"])
    made = {}
    for kind in (T.F32, T.F16, T.Q8_0):
        model = tiny_model("llama", **SHAPE)
        (root / kind.name).mkdir()
        write_gguf(root / kind.name / f"tiny-{kind.name}.gguf", model, tok, kind)
        stored(model, kind).save_pretrained(root / f"ref-{kind.name}")
        made[kind] = (root / kind.name / f"tiny-{kind.name}.gguf", root / f"ref-{kind.name}")
    made["tokenizer"] = tok
    return made


IDS = torch.randint(4, SHAPE["vocab"], (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind,saved", [(T.F32, torch.float32), (T.F16, torch.float16), (T.Q8_0, torch.bfloat16)],
                         ids=["F32", "F16", "Q8_0"])
def test_a_gguf_reads_back_as_the_model_it_was_written_from(files, kind, saved):
    path, ref = files[kind]
    model, tok, _ = io.load_model(str(path))
    assert not hasattr(model.config, "quantization_config") and model.dtype == torch.float32
    got, expected = outputs(model, IDS), outputs(lopper.load(str(ref)), IDS)
    assert (got - expected).abs().max() < 1e-5
    assert io.read_config(str(path)).dtype == saved  # the dtype a pruned copy is saved in
    assert tok(SENTENCE)["input_ids"] == files["tokenizer"].encode(SENTENCE).ids


def test_prune_writes_a_standard_folder_that_plain_transformers_loads(files, tmp_path):
    path, _ = files[T.F32]
    before, out = tree_digest(path.parent), tmp_path / "pruned"
    assert main(["prune", str(path), "--out", str(out), "--mlp", "0.5", *FAST]) == 0
    assert tree_digest(path.parent) == before
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["intermediate_size"] == 32 and config["dtype"] == "float32"
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(outputs(plain, IDS), outputs(lopper.load(str(out)), IDS))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(SENTENCE)["input_ids"] == files["tokenizer"].encode(SENTENCE).ids
    report = json.loads((out / "lopper_report.json").read_text())
    assert report["source"] == str(path) and report["size_bytes_before"] == path.stat().st_size
    assert json.loads((out / "lopper_plan.json").read_text())["meta"]["source"] == str(path)


def test_a_quantized_gguf_is_saved_in_bfloat16(files, tmp_path):
    path, ref = files[T.Q8_0]
    lopper.prune(model=str(path), out=str(tmp_path / "out"), drop_layers=1, width_metric="magnitude",
                 calib_samples=4, seq_len=32, quiet=True)
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    dequantized = transformers.AutoModelForCausalLM.from_pretrained(ref)
    assert saved.dtype == torch.bfloat16
    assert torch.equal(saved.model.embed_tokens.weight, dequantized.model.embed_tokens.weight.bfloat16())


def test_a_folder_and_gguf_file_name_the_same_model_and_bench_reads_it(files, tmp_path, capsys):
    path, _ = files[T.F32]
    plan = lopper.plan(model=str(path.parent), gguf_file=path.name, out=str(tmp_path / "plan.json"), mlp=0.5,
                       width_metric="magnitude", quiet=True)
    assert plan.meta["source"] == str(path)
    assert main(["eval", str(path.parent), "--gguf-file", path.name, "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == str(path) and result["size_bytes"] == path.stat().st_size
    bench = lopper.bench(models=[str(path)], batch=1, prompt_len=8, new_tokens=2, repeats=1, warmup=0, quiet=True)
    assert bench["models"][0]["weights_bytes_disk"] == path.stat().st_size


def test_heal_distils_from_a_gguf_teacher(files, tmp_path):
    path, _ = files[T.F32]
    lopper.prune(model=str(path), out=str(tmp_path / "student"), mlp=0.5, calib_samples=4, seq_len=32, quiet=True)
    (tmp_path / "train.txt").write_text(calibration_text()[:20000])
    report = lopper.heal(model=str(tmp_path / "student"), teacher=str(path), text=[str(tmp_path / "train.txt")],
                         out=str(tmp_path / "healed"), seq_len=32, batch=4, tokens=3 * 4 * 32, warmup=0.0,
                         device="cpu", quiet=True)
    assert report["heal"]["teacher"] == str(path)


def test_errors_name_the_problem(files, tmp_path, monkeypatch, capsys):
    path, _ = files[T.F32]
    with pytest.raises(LopperError, match="does not exist"):
        lopper.load(str(tmp_path / "nothing.gguf"))
    with pytest.raises(LopperError, match="does not exist"):
        lopper.evaluate(model=str(path.parent), gguf_file="other.gguf")
    with pytest.raises(LopperError, match="names another"):
        lopper.evaluate(model=str(path), gguf_file=path.name)
    model = tiny_model("llama", **SHAPE)
    for arch, message in (("bloom", "unsupported architecture model_type='bloom'"),  # transformers reads it
                          ("rwkv6", "transformers cannot read")):  # transformers does not
        write_gguf(tmp_path / f"{arch}.gguf", model, files["tokenizer"], arch=arch)
        assert main(["prune", str(tmp_path / f"{arch}.gguf"), "--out", str(tmp_path / "out"), "--mlp", "0.5",
                     *FAST]) == 2
        error = capsys.readouterr().err
        assert message in error and "lopper reads GGUF files of " in error and "llama" in error
        assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(io, "is_gguf_available", lambda: False)
    with pytest.raises(LopperError, match=r'pip install "lopper\[gguf\]"'):
        lopper.load(str(path))


def test_stream_on_refuses_a_gguf_by_name(files, tmp_path):
    path, _ = files[T.F32]
    with pytest.raises(LopperError, match=r"--stream on reads safetensors.*GGUF file: use --stream off"):
        lopper.prune(model=str(path), out=str(tmp_path / "o"), mlp=0.5, stream="on", quiet=True)
    assert not (tmp_path / "o").exists()
