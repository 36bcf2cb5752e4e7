"""`lopper bench`: figures present and positive, ratios of a model to itself, FLOPs arithmetic of a pruned model, CLI."""
from __future__ import annotations

import json

import pytest

import lopper
from lopper.bench import BenchArgs, bench
from lopper.cli import main
from lopper.errors import LopperError

FAST = dict(batch=2, prompt_len=16, new_tokens=3, repeats=2, warmup=1, quiet=True)
# tiny_config defaults: hidden 32 = 4 heads x 8, 2 KV heads, MLP 24, 3 layers
HIDDEN, HEADS, KV, HEAD_DIM, MLP, LAYERS = 32, 4, 2, 8, 24, 3
MATMUL_PER_LAYER = 2 * HIDDEN * HEADS * HEAD_DIM + 2 * HIDDEN * KV * HEAD_DIM + 3 * HIDDEN * MLP


def positive(d: dict, keys) -> None:
    for k in keys:
        assert d[k] > 0, k


def test_figures_present_positive_and_self_ratios_one(model_dir):
    src = str(model_dir("llama"))
    r = bench(BenchArgs(models=[src, src], **FAST))
    assert len(r["models"]) == 2 and len(r["ratios"]) == 2
    for m in r["models"]:
        positive(m, ["params", "params_non_embedding", "matmul_params_non_embedding", "flops_per_token",
                     "weights_bytes", "weights_bytes_disk", "peak_memory_bytes"])
        assert m["memory_method"].startswith("estimate")
        positive(m["prefill"], ["tokens_per_s", "min", "max"])
        assert len(m["prefill"]["repeats"]) == FAST["repeats"]
        assert m["prefill"]["min"] <= m["prefill"]["tokens_per_s"] <= m["prefill"]["max"]
        for key in ("batch_1", "batch_2"):
            d = m["decode"][key]
            assert len(d["repeats"]) == FAST["repeats"] and d["ms_per_token"] >= 0
            assert all(g["3"] > 0 and g["1"] > 0 for g in d["generate_seconds"])
        assert m["matmul_params_non_embedding"] == LAYERS * MATMUL_PER_LAYER
        assert m["flops_per_token"] == 2 * LAYERS * MATMUL_PER_LAYER + 4 * FAST["prompt_len"] * LAYERS * HEADS * HEAD_DIM
    q = r["ratios"][1]
    for k in ("params", "params_non_embedding", "flops", "bytes", "prefill_limit", "decode_limit"):
        assert q[k] == 1.0, k
    assert q["prefill_speedup"] > 0  # timings of one model twice: ~1, but a shared CPU is too noisy to assert more
    for k in ("decode_speedup_batch_1", "decode_speedup_batch_2"):
        assert q[k] is None or q[k] > 0, k  # None: a decode time clamped to 0 (t_N < t_1 by noise on tiny models)
    assert "| params ratio | 1.00x | 1.00x |" in r["markdown"]


def test_pruned_model_flops_limit_matches_param_arithmetic(model_dir, tmp_path):
    src = str(model_dir("llama"))
    out = tmp_path / "d1"
    lopper.prune(model=src, out=str(out), drop_layers=1, width_metric="magnitude", calib_samples=2, seq_len=16,
                 quiet=True)
    r = bench(models=[src, str(out)], **FAST)
    a, b = r["models"]
    assert b["matmul_params_non_embedding"] == (LAYERS - 1) * MATMUL_PER_LAYER
    assert a["params"] - b["params"] == a["params_non_embedding"] - b["params_non_embedding"] > 0
    q = r["ratios"][1]
    # every layer costs the same, so the FLOPs limit is layers / kept layers exactly
    assert q["prefill_limit"] == pytest.approx(LAYERS / (LAYERS - 1)) and q["prefill_limit"] > 1
    assert q["flops"] == pytest.approx((LAYERS - 1) / LAYERS)
    assert q["decode_limit"] == pytest.approx(a["weights_bytes"] / b["weights_bytes"]) and q["decode_limit"] > 1
    assert q["params"] == b["params"] / a["params"] < 1


def test_encoder_prefill_only(model_dir):
    r = bench(models=[str(model_dir("bert"))], **FAST)
    m = r["models"][0]
    assert m["encoder"] and m["decode"] is None and m["prefill"]["tokens_per_s"] > 0
    assert "decode_speedup_batch_1" not in r["ratios"][0]
    with pytest.raises(LopperError, match="prompt-len"):
        bench(models=[str(model_dir("bert"))], **{**FAST, "prompt_len": 1000})


def test_cli_writes_json_and_markdown(model_dir, tmp_path, capsys):
    src = str(model_dir("llama"))
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    assert main(["bench", src, src, "--batch", "2", "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1",
                 "--warmup", "0", "--json", str(js), "--markdown", str(md)]) == 0
    report = json.loads(js.read_text())
    assert [m["model"] for m in report["models"]] == [src, src]
    assert report["args"]["prompt_len"] == 8 and report["flops_formula"]
    assert md.read_text().startswith("| |") and "prefill limit" in capsys.readouterr().out


@pytest.mark.parametrize("kw, msg", [(dict(models=[]), "no model"), (dict(models=["x"], new_tokens=1), "new-tokens"),
                                     (dict(models=["x"], device="cuda"), "CUDA")])
def test_bad_arguments(kw, msg):
    import torch
    if kw.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(LopperError, match=msg):
        bench(**kw)


def test_speedups_follow_a_fake_timer_that_charges_flops(model_dir, tmp_path, monkeypatch):
    """Wall-clock speed-ups of tiny models on a shared CPU say nothing; a timer that charges each call its FLOPs
    (torch's FlopCounterMode) checks what bench does with times: a model with a third of its layers dropped must come
    out about 1.5x faster in prefill (the FLOP limit) and faster in decode, not slower, not the other way round."""
    import importlib

    from torch.utils.flop_counter import FlopCounterMode

    def flop_seconds(fn, device):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    monkeypatch.setattr(importlib.import_module("lopper.bench"), "timed", flop_seconds)
    src, out = str(model_dir("llama")), tmp_path / "d1"
    lopper.prune(model=src, out=str(out), drop_layers=1, width_metric="magnitude", calib_samples=2, seq_len=16,
                 quiet=True)
    q = bench(models=[src, str(out)], **FAST)["ratios"][1]
    assert q["prefill_limit"] == pytest.approx(LAYERS / (LAYERS - 1))
    assert q["prefill_speedup"] == pytest.approx(q["prefill_limit"], rel=0.05)
    for k in ("decode_speedup_batch_1", "decode_speedup_batch_2"):
        assert 1.2 < q[k] < q["prefill_limit"], k  # the lm_head's share of each step is not cut
