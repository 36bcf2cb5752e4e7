"""GGUF in: a tiny Llama written with gguf's own GGUFWriter (llama.cpp's tensor names, q/k rows in llama.cpp's
permuted order, a byte-level BPE vocabulary in the metadata) reads back as the model it was written from, and lopper
prunes it into a standard safetensors folder that plain transformers loads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

import lopper  # noqa: E402
from lopper import io  # noqa: E402
from lopper.cli import main  # noqa: E402
from lopper.errors import LopperError  # noqa: E402
from tiny import SPECIALS, calibration_text, outputs, tiny_model, tree_digest  # noqa: E402

T = gguf.GGMLQuantizationType
SHAPE = dict(layers=3, heads=4, kv_heads=2, head_dim=16, mlp=64, vocab=300, init=0.2)  # rows: multiples of 32
FAST = ["--calib-samples", "4", "--seq-len", "32", "--quiet"]
SENTENCE = "The capital of France is Paris, and the Senate met there."


def byte_level_bpe(vocab: int):
    """llama.cpp's "gpt2" tokenizer model: byte-level BPE, trained offline on lopper's calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([calibration_text()], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert tok.get_vocab_size() == vocab
    return tok


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's order of q_proj/k_proj rows (transformers' GGUF reader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tok, kind: T = T.F32, arch: str = "llama") -> None:
    """`model` as a GGUF: matrices in `kind` (F32, F16 or a quantized type), norms in F32, as llama.cpp writes."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control, 1: normal
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_pad_token_id(0), w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(3)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        a = t.float().numpy()
        if base.endswith(("q_proj", "k_proj")):
            a = permute(a, cfg.num_attention_heads if base.endswith("q_proj") else cfg.num_key_value_heads)
        if a.ndim == 2 and kind != T.F32:
            w.add_tensor(f"{names.get_name(base)}.{suffix}", gguf.quants.quantize(a, kind), raw_dtype=kind)
        else:
            w.add_tensor(f"{names.get_name(base)}.{suffix}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def stored(model, kind: T):
    """The model with every matrix replaced by what `kind` stores of it, dequantized (blocks run along rows, so
    permuting rows commutes with this)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and kind != T.F32:
                q = gguf.quants.quantize(p.numpy(), kind)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, kind).reshape(p.shape).copy()))
    return model


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
