"""Memory: the estimate is made from the config before anything is loaded, a run that cannot fit is refused then
(naming what to change), and the report states the estimate beside the measured peak."""
from __future__ import annotations

import pytest
import torch
import transformers

import lopper
from lopper import api, memory
from lopper.errors import LopperError
from lopper.io import model_class

FAST = {"calib_samples": 4, "seq_len": 32, "quiet": True}


def llama(layers: int, hidden=4096, mlp=14336, vocab=128256):
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=32,
                                    num_key_value_heads=8, num_hidden_layers=layers, vocab_size=vocab)


def estimate(config, **kw):
    args = dict(dtype=torch.float32, device="cpu", checkpoint_bytes=0, samples=32, seq_len=256, repair=True,
                correct=0.3, sparsegpt=False, search=False) | kw
    return memory.estimate_prune(memory.model_shape(config, model_class(config)), **args)


def test_the_estimate_follows_the_config():
    eight_b = estimate(llama(32))
    assert 8.0e9 < eight_b["weights_bytes"] / 4 < 8.1e9  # Llama-3-8B's 8.03B parameters, float32
    assert estimate(llama(32), dtype=torch.bfloat16)["weights_bytes"] == eight_b["weights_bytes"] // 2
    assert estimate(llama(16))["peak_bytes"] < eight_b["peak_bytes"]
    more = estimate(llama(32), samples=512)
    assert more["phases_bytes"]["repair"] > eight_b["phases_bytes"]["repair"]
    assert estimate(llama(32), repair=False)["phases_bytes"]["repair"] == 0
    assert estimate(llama(32), search=True)["largest_phase"] == "search"
    fisher = estimate(llama(32), repair=False, fisher=True)  # the embedding's gradient alone is 2.1 GB in float32
    assert fisher["largest_phase"] == "fisher" and fisher["phases_bytes"]["fisher"] > 128256 * 4096 * 4


def test_a_run_that_cannot_fit_is_refused_before_loading(model_dir, tmp_path, monkeypatch):
    src = model_dir("llama")
    monkeypatch.setattr(memory, "available", lambda device: 1000)
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded although it cannot fit"))
    with pytest.raises(LopperError, match=r"needs about .* GB on cpu .* is available: free memory, or use "):
        lopper.prune(model=str(src), out=str(tmp_path / "out"), params=0.25, **FAST)
    with pytest.raises(LopperError, match="needs about"):
        lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), params=0.25, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_the_report_states_estimate_and_measured_peak(model_dir, tmp_path):
    report = lopper.prune(model=str(model_dir("llama")), out=str(tmp_path / "out"), params=0.25, **FAST)
    m = report["memory"]
    assert m["estimate"]["peak_bytes"] >= m["estimate"]["weights_bytes"] > 0
    assert m["measured"]["peak_bytes"] > 0 and "ru_maxrss" in m["measured"]["method"]
