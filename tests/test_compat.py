"""Folders saved by `lopper.prune` load in plain transformers 4.5x as well as 5.x, with the same outputs (every
family's saved cut is checked the same way in test_families.py).

Runs when LOPPER_TF4_PATH names a folder holding transformers 4.57 (`pip install --target`), as .ci/run sets up."""
import json
import os
import subprocess
import sys

import pytest
import torch

import lopper
from tiny import char_tokenizer, outputs, tiny_model

TF4 = os.environ.get("LOPPER_TF4_PATH", "")

LOAD_IN_TF4 = r"""
import json, sys, torch, transformers
assert transformers.__version__.startswith("4."), transformers.__version__
folder, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
m = transformers.AutoModel.from_pretrained(folder) if "bert" in open(folder + "/config.json").read() else \
    transformers.AutoModelForCausalLM.from_pretrained(folder)
with torch.no_grad():
    o = m(input_ids=torch.tensor(ids))
t = o.logits if hasattr(o, "logits") else o.last_hidden_state
json.dump(t.tolist(), open(out, "w"))
"""


def prune_and_compare_in_transformers_4(model, cut: dict, tmp_path) -> None:
    """Save `model`, prune it to a standard checkpoint, and check transformers 4.57 computes the same logits."""
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    char_tokenizer(model.config.vocab_size).save_pretrained(src)
    report = lopper.prune(model=str(src), out=str(out), width_metric="magnitude", quiet=True, round_to=1, **cut)
    assert report["standard_checkpoint"]
    ids = torch.randint(3, 90, (1, 12))
    expected = outputs(lopper.load(str(out)), ids)
    env = {**os.environ, "PYTHONPATH": TF4}
    subprocess.run([sys.executable, "-c", LOAD_IN_TF4, str(out), json.dumps(ids.tolist()), str(tmp_path / "o.json")],
                   check=True, env=env, capture_output=True)
    got = torch.tensor(json.load(open(tmp_path / "o.json")))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.skipif(not TF4, reason="LOPPER_TF4_PATH not set (.ci/run sets it)")
@pytest.mark.parametrize("family,cut", [("llama", {"drop_layers": 1, "mlp": 0.5, "heads": 0.5, "hidden": 0.25}),
                                        ("qwen2", {"mlp": 0.25, "heads": 0.5}),
                                        ("qwen3", {"drop_layers": 1, "hidden": 0.5}),
                                        ("bert", {"drop_layers": 1, "mlp": 0.5})])
def test_saved_folder_loads_in_transformers_4(tmp_path, family, cut):
    model = tiny_model(family, layers=4, heads=4, kv_heads=2, head_dim=8, mlp=32)
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 5000.0} if family != "bert" else None
    prune_and_compare_in_transformers_4(model, cut, tmp_path)
