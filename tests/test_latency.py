"""--target-speedup (lopper.latency) under deterministic cost models, and the device-aware default --round-to."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import lopper
from lopper import latency
from lopper.arch import adapter_for
from lopper.bench import static_figures
from lopper.cli import report_table
from lopper.errors import LopperError
from lopper.importance import collect, width_scores
from lopper.select import Target, default_round_to
from lopper.surgery import apply, silenced
from tiny import tiny_model

BATCH, LENGTH = 2, 64


def flop_timer(power: float = 1.0, const: float = 2e-4):
    """Fake seconds of one prefill: (FLOPs of the layers)^power + a constant for embeddings and lm_head.
    power 1: exactly additive per layer, so the table's prediction must be exact; power > 1: it is not."""
    def t(model) -> float:
        flops = static_figures(model, adapter_for(model), LENGTH)["flops_per_token"] * BATCH * LENGTH
        return (flops * 1e-9) ** power + const
    return t


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", layers=8, heads=4, kv_heads=2, head_dim=8, mlp=48, attn="eager")
    adapter = adapter_for(model)
    windows = [torch.randint(4, 96, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    stats = collect(model, adapter, windows, quiet=True)
    return model, adapter, stats, width_scores(adapter, stats, "activation")


def _real_speedup(model, plan, timer) -> float:
    cut = copy.deepcopy(model)
    with silenced():
        apply(cut, adapter_for(cut), plan)
    return timer(model) / timer(cut)


def test_linear_cost_prediction_is_exact_and_lands_within_5pct(setup):
    model, adapter, stats, scores = setup
    timer = flop_timer()
    plan = latency.solve_speedup(model, adapter, Target(round_to=4), stats, scores, 1.5, timer)
    s = plan.meta["speedup"]
    real = _real_speedup(model, plan, timer)
    assert abs(real - s["measured"]) < 1e-3  # meta rounds to 4 decimals
    assert abs(s["predicted"] - s["measured"]) < 1e-3  # FLOPs are additive per layer: the table is exact
    assert abs(real / 1.5 - 1) <= 0.05 and s["within_tolerance"]
    assert len(s["rounds"]) == 1
    kept = plan.widths()[plan.layers[0]]
    assert kept["mlp"] % 4 == 0 and len(plan.layers) >= 2  # round_to and the protected first/last layers


def test_superlinear_cost_is_corrected_by_measurement(setup):
    model, adapter, stats, scores = setup
    timer = flop_timer(power=1.6, const=0.0)
    plan = latency.solve_speedup(model, adapter, Target(round_to=1), stats, scores, 1.5, timer)
    s = plan.meta["speedup"]
    first = s["rounds"][0]
    assert abs(first["measured"] / first["predicted"] - 1) > 0.01  # the table alone is off under this cost model
    assert abs(_real_speedup(model, plan, timer) / 1.5 - 1) <= 0.05


def test_noisy_table_is_levelled(setup):
    """A timer whose fixed cost comes out negative and whose narrower layers look slower (noise, on a shared CPU)."""
    model, adapter, _, _ = setup

    def noisy(m) -> float:
        a = adapter_for(m)
        w = a.layer_widths(a.layers()[0])["mlp"]
        return len(a.layers()) * (0.01 + 0.002 * (48 - w) / 48) - 0.05

    table = latency.measure_table(model, adapter, 4, noisy)
    assert table.fixed == 0.0
    widths = sorted(table.mlp)
    assert len(widths) >= 4 and all(table.mlp[a] <= table.mlp[b] for a, b in zip(widths, widths[1:]))


def test_impossible_and_non_speedups_are_refused(setup):
    model, adapter, stats, scores = setup
    with pytest.raises(LopperError, match="out of reach"):
        latency.solve_speedup(model, adapter, Target(round_to=4), stats, scores, 40.0, flop_timer())
    for s in (1.0, 0.5):
        with pytest.raises(LopperError, match="not a speed-up"):
            latency.solve_speedup(model, adapter, Target(round_to=4), stats, scores, s, flop_timer())


def test_prune_reports_predicted_and_measured(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "prefill_timer", lambda b, l, d: flop_timer())
    src = model_dir("llama", layers=6, mlp=32)
    report = lopper.prune(model=str(src), out=str(tmp_path / "o"), target_speedup=1.3, calib_samples=4, seq_len=16,
                          round_to=4, params_search="loss", quiet=True)
    s = report["plan"]["speedup"]
    assert abs(s["measured"] / 1.3 - 1) <= 0.05
    assert all("loss" in r for r in s["rounds"])  # --params-search loss scored the candidates by calibration loss
    saved = json.loads((tmp_path / "o" / "lopper_report.json").read_text())
    assert saved["plan"]["speedup"]["measured"] == s["measured"]
    assert "predicted -> measured" in report_table(report)
    with pytest.raises(LopperError, match="not a speed-up"):
        lopper.prune(model=str(src), out=str(tmp_path / "p"), target_speedup=0.9, quiet=True)
    with pytest.raises(LopperError, match="chooses depth and width"):
        lopper.prune(model=str(src), out=str(tmp_path / "p"), target_speedup=1.5, mlp=0.5, quiet=True)


def test_default_round_to_follows_device_and_dtype(monkeypatch):
    assert default_round_to(2048, "cuda", torch.bfloat16) == 64
    assert default_round_to(384, "cuda", torch.float16) == 64  # 128 bytes, not the size rule's 8
    assert default_round_to(512, "cuda", torch.float32) == 32
    assert default_round_to(4096, "cuda", torch.bfloat16) == 128
    assert default_round_to(64, "cuda", torch.bfloat16) == 1  # tiny models keep fine widths
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert default_round_to(384, "cpu", torch.float32) == 16 and default_round_to(384, "cpu", torch.bfloat16) == 32
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert default_round_to(384, "cpu", torch.float32) == 8 and default_round_to(4096, "cpu", torch.float32) == 64
