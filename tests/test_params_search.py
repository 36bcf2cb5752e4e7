"""--params-search loss: every depth/width mix is tried at the same parameter count and the lowest loss wins."""
import json

import pytest

import lopper


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loss_search_keeps_the_lowest_loss_mix(model_dir, tmp_path, family):
    src = model_dir(family, layers=6, heads=4, kv_heads=2, head_dim=8, mlp=64)
    report = lopper.prune(model=str(src), out=str(tmp_path / "out"), params=0.3, params_search="loss",
                          calib_samples=8, seq_len=32, round_to=4, quiet=True)
    chosen = report["plan"]["params"]
    candidates = chosen["candidates"]
    assert len({c["drop_layers"] for c in candidates}) >= 2  # several mixes were really tried
    assert all(abs(c["removed"] - 0.3) <= 0.02 for c in candidates)
    best = min(candidates, key=lambda c: c["loss"])
    assert chosen["choice"]["drop_layers"] == best["drop_layers"]
    assert json.loads((tmp_path / "out" / "lopper_report.json").read_text())["plan"]["params"] == chosen
