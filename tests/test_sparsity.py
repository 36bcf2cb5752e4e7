"""Unstructured and N:M sparsity (src/lopper/sparsity.py): exact counts per scope, N:M groups, ignored modules left
alone, Wanda ranks by |W| * ||X||, SparseGPT reconstructs better than magnitude and Wanda (measured), structured +
sparsity gives a standard checkpoint with its zeros, plan replays reproduce the weights bit for bit, OWL keeps the
mean, bad settings are refused with one line."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

import lopper
from lopper import sparsity as sp
from lopper.arch import adapter_for
from lopper.cli import main
from lopper.errors import LopperError
from lopper.plan import Plan
from tiny import tiny_model

FAST = dict(calib_samples=4, seq_len=32, quiet=True)
SHAPE = dict(layers=4, heads=4, kv_heads=2, head_dim=8, mlp=24, init=0.2)


@pytest.fixture
def src(model_dir):
    return model_dir("llama", **SHAPE)


def windows(n=6, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (1, length), generator=g) for _ in range(n)]


def sparsified(family="llama", windows_=None, model=None, **spec):
    model = model if model is not None else tiny_model(family, **SHAPE, attn="eager" if family != "bert" else None)
    adapter = adapter_for(model)
    result = sp.sparsify(model, adapter, sp.Spec(**spec), windows_ or windows(), quiet=True)
    return model, adapter, result


def zeros(w: torch.Tensor) -> torch.Tensor:
    return w == 0


# ---- counts per scope and pattern ----------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("frac", [0.3, 0.5, 0.7])
def test_row_scope_zeroes_the_fraction_of_every_row(criterion, frac):
    model, _, result = sparsified(sparsity=frac, criterion=criterion, scope="row")
    assert len(result.targets) == 4 * 7
    for t in result.targets:
        w = t.weight()
        want = round(frac * w.shape[1])
        assert zeros(w).sum(1).tolist() == [want] * w.shape[0], t.name
        assert torch.equal(zeros(w), ~result.keep[t.name])


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_layer_scope_zeroes_the_fraction_of_every_module(criterion):
    _, _, result = sparsified(sparsity=0.45, criterion=criterion, scope="layer")
    for t in result.targets:
        w = t.weight()
        assert int(zeros(w).sum()) == round(0.45 * w.numel()), t.name
    rows = torch.cat([zeros(t.weight()).sum(1) for t in result.targets])
    assert rows.min() != rows.max()  # not per row: the rows differ


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_global_scope_zeroes_the_fraction_of_all_candidates(criterion):
    _, _, result = sparsified(sparsity=0.6, criterion=criterion, scope="global")
    total, zeroed = result.counts()
    assert zeroed == round(0.6 * total)
    assert sum(int(zeros(t.weight()).sum()) for t in result.targets) == zeroed
    per_module = {round(v, 3) for v in result.achieved().values()}
    assert len(per_module) > 1  # one threshold for all: modules end up at different fractions


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_n_m_groups_keep_at_most_n(criterion, pattern):
    n, m = map(int, pattern.split(":"))
    _, _, result = sparsified(pattern=pattern, criterion=criterion)
    for t in result.targets:
        w = t.weight()
        assert w.shape[1] % m == 0
        nonzero = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
        assert int(nonzero.max()) <= n, t.name
        assert int(nonzero.min()) == n  # random weights have no zeros of their own: exactly N kept
    total, zeroed = result.counts()
    assert zeroed == total * (m - n) // m


def test_partial_last_group_keeps_at_most_n():
    score = torch.rand(5, 11)
    gone = sp.lowest_nm(score, 2, 4)  # groups of 4, 4, and a tail of 3 (keeps 2)
    assert gone[:, :8].reshape(5, 2, 4).sum(-1).eq(2).all()
    assert gone[:, 8:].sum(1).eq(1).all()
    assert not sp.lowest_nm(torch.rand(3, 10), 2, 4)[:, 8:].any()  # a tail of 2 <= N is left alone


def test_sparsegpt_with_many_blocks_meets_exact_counts():
    """Columns span several 128-blocks: the per-block counts add up to the module's count."""
    torch.manual_seed(0)
    w = torch.randn(40, 300)
    x = torch.randn(500, 300) * torch.linspace(0.1, 3, 300)
    h = 2 * x.T @ x / x.shape[0]
    for scope in ("row", "layer"):
        new, keep = sp.sparsegpt(w, h, 0.37, sp.Spec(sparsity=0.37, criterion="sparsegpt", scope=scope))
        assert torch.equal(new == 0, ~keep)
        if scope == "row":
            assert (~keep).sum(1).eq(round(0.37 * 300)).all()
        else:
            assert int((~keep).sum()) == round(0.37 * w.numel())
    new, keep = sp.sparsegpt(w, h, 0.5, sp.Spec(pattern="2:4", criterion="sparsegpt"))
    assert (new.reshape(40, -1, 4) != 0).sum(-1).eq(2).all()


# ---- what is left alone -------------------------------------------------------------------------------------------
def test_ignored_modules_embeddings_and_lm_head_are_untouched():
    model = tiny_model("llama", **SHAPE, attn="eager")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, _, result = sparsified(model=model, sparsity=0.5, criterion="sparsegpt", ignore=r"mlp\.|layers\.0\.")
    names = {t.name for t in result.targets}
    assert names and not any("mlp." in n or "layers.0." in n for n in names)
    for n, p in model.named_parameters():
        module = n.rsplit(".", 1)[0]
        if module in names:
            assert int((p == 0).sum()) == p.numel() // 2, n
        else:
            assert torch.equal(p, before[n]), n  # lm_head, embeddings, norms, ignored modules
    assert "lm_head" in dict(model.named_modules()) and "lm_head" not in names


# ---- criteria -----------------------------------------------------------------------------------------------------
def test_wanda_ranks_by_weight_times_input_norm():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    norms = torch.logspace(-2, 2, 32)[torch.randperm(32)]  # skewed input channels
    spec = sp.Spec(sparsity=0.5, criterion="wanda")
    wanda = sp.prune_mask(sp.score(w, "wanda", norms ** 2), 0.5, spec)
    magnitude = sp.prune_mask(sp.score(w, "magnitude", None), 0.5, spec)
    expect = torch.zeros_like(wanda)
    expect.scatter_(1, (w.abs() * norms).argsort(1)[:, :16], True)
    assert torch.equal(wanda, expect)
    assert (wanda != magnitude).float().mean() > 0.2


def test_wanda_in_a_model_uses_the_input_norms_of_the_calibration_windows():
    """Layer 0's modules see the dense model's activations: their masks are |W| * ||X|| with X hooked here."""
    model = tiny_model("llama", **SHAPE, attn="eager")
    adapter = adapter_for(model)
    ws = windows()
    first = [t for t in sp.targets(model, adapter) if t.layer == 0]
    sq = {}
    hooks = [t.module.register_forward_pre_hook(
        lambda m, a, n=t.name: sq.__setitem__(n, sq.get(n, 0) + a[0].reshape(-1, a[0].shape[-1]).pow(2).sum(0)))
        for t in first]
    with torch.no_grad():
        for ids in ws:
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    weights = {t.name: t.weight().detach().clone() for t in first}
    by_magnitude = copy.deepcopy(model)
    _, _, result = sparsified(model=model, windows_=ws, sparsity=0.5, criterion="wanda")
    _, _, mag = sparsified(model=by_magnitude, windows_=ws, sparsity=0.5, criterion="magnitude")
    differ = 0
    for name, w in weights.items():
        score = w.abs() * sq[name].sqrt()[None, :]
        expect = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.argsort(1)[:, :w.shape[1] // 2], True)
        assert torch.equal(~result.keep[name], expect), name
        differ += int((result.keep[name] != mag.keep[name]).sum())
    assert differ > 0


def reconstruction(model, ws, **spec):
    """(relative error of layer 0's module outputs on its calibration inputs, relative error of the final hidden
    states on the calibration windows) after sparsifying a copy of `model`."""
    adapter = adapter_for(model)
    first = [t for t in sp.targets(model, adapter) if t.layer == 0]
    xs = {}
    hooks = [t.module.register_forward_pre_hook(
        lambda m, a, n=t.name: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))) for t in first]

    def hidden(m):
        with torch.no_grad():
            return torch.cat([m.model(input_ids=ids).last_hidden_state for ids in ws])

    dense = hidden(model)
    for h in hooks:
        h.remove()
    xs = {k: torch.cat(v) for k, v in xs.items()}
    pruned = copy.deepcopy(model)
    sparsified(model=pruned, windows_=ws, **spec)
    modules = dict(pruned.named_modules())
    layer = sum(((x @ (dict(model.named_modules())[n].weight - modules[n].weight).T) ** 2).sum().item()
                / ((x @ dict(model.named_modules())[n].weight.T) ** 2).sum().item() for n, x in xs.items())
    out = ((hidden(pruned) - dense) ** 2).mean().item() / (dense ** 2).mean().item()
    return layer, out


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_calibration_outputs_better(pattern):
    model = tiny_model("llama", layers=3, init=0.02, attn="eager")
    ws = windows(8, 32, seed=1)
    frac = 0.5 if pattern == "unstructured" else 0.0
    err = {c: reconstruction(model, ws, sparsity=frac, pattern=pattern, criterion=c) for c in sp.CRITERIA}
    print(pattern, {c: (round(a, 4), round(b, 4)) for c, (a, b) in err.items()})
    # measured (relative squared error; layer 0 modules, final hidden states), magnitude / wanda / sparsegpt:
    # unstructured 50%: 0.600 / 0.493 / 0.397 and 0.0337 / 0.0247 / 0.0165; 2:4: 0.954 / 0.839 / 0.610 and
    # 0.0438 / 0.0386 / 0.0273
    for i in (0, 1):
        assert err["sparsegpt"][i] < 0.85 * min(err["wanda"][i], err["magnitude"][i])


# ---- OWL ----------------------------------------------------------------------------------------------------------
def test_owl_ratios_average_to_the_target_and_favour_outlier_layers():
    model = tiny_model("llama", **SHAPE, attn="eager")
    adapter = adapter_for(model)
    tg = sp.targets(model, adapter)
    with torch.no_grad():  # give layer 2 heavy outliers
        adapter.layers()[2].mlp.down_proj.weight[:, :2] *= 40
    sq = sp.input_sq(model, adapter, tg, windows(), quiet=True)
    spec = sp.Spec(sparsity=0.6, allocation="owl")
    ratios = sp.owl_targets(tg, sq, spec)
    assert sum(ratios.values()) / len(ratios) == pytest.approx(0.6, abs=1e-9)
    assert max(ratios.values()) - min(ratios.values()) == pytest.approx(2 * sp.OWL_LAMBDA)
    assert min(ratios, key=ratios.get) == 2
    _, _, result = sparsified(model=model, sparsity=0.6, allocation="owl")
    assert result.layer_targets == pytest.approx(ratios)
    for i, r in ratios.items():
        for t in (t for t in result.targets if t.layer == i):
            assert result.achieved()[t.name] == pytest.approx(round(r * t.weight().shape[1]) / t.weight().shape[1])


def test_owl_mean_is_weighted_by_layer_size():
    model = tiny_model("llama", **SHAPE, attn="eager")
    adapter = adapter_for(model)
    tg = [t for t in sp.targets(model, adapter) if t.layer != 1 or "mlp" in t.name]  # layer 1 is smaller
    sq = sp.input_sq(model, adapter, tg, windows(), quiet=True)
    ratios = sp.owl_targets(tg, sq, sp.Spec(sparsity=0.5, allocation="owl"))
    size = {i: sum(t.weight().numel() for t in tg if t.layer == i) for i in ratios}
    assert sum(ratios[i] * size[i] for i in ratios) / sum(size.values()) == pytest.approx(0.5, abs=1e-9)


# ---- other architectures ------------------------------------------------------------------------------------------
def test_gpt2_conv1d_rows_are_output_channels():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_layer=2, n_head=4, n_embd=32, n_positions=64, resid_pdrop=0,
                                  embd_pdrop=0, attn_pdrop=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _, _, result = sparsified(model=model, sparsity=0.5, criterion="sparsegpt")
    c_attn = model.transformer.h[0].attn.c_attn.weight  # Conv1D: [in 32, out 96]
    assert (c_attn == 0).sum(0).eq(16).all()  # every output channel lost half its inputs
    assert len(result.targets) == 2 * 4
    _, _, nm = sparsified(model=model, pattern="2:4", criterion="wanda")
    w = model.transformer.h[1].mlp.c_proj.weight.T
    assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all()


def test_encoder_layers_are_sparsified_sequentially():
    model, _, result = sparsified("bert", sparsity=0.5, criterion="sparsegpt", scope="layer")
    assert len(result.targets) == 4 * 6
    assert result.counts()[1] == sum(round(0.5 * t.weight().numel()) for t in result.targets)


# ---- the prune command: checkpoint, plan, masks, report, replay ---------------------------------------------------
def test_structured_plus_sparsity_is_a_standard_checkpoint_with_its_zeros(src, tmp_path):
    out = tmp_path / "out"
    report = lopper.prune(model=str(src), out=str(out), drop_layers=1, mlp=0.5, heads=0.5, sparsity=0.5,
                          sparsity_criterion="sparsegpt", repair="lsq", **FAST)
    assert report["standard_checkpoint"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    masks = sp.load_masks(out / sp.MASKS_FILE)
    modules = dict(model.named_modules())
    assert len(masks) == 3 * 7 and all(n.startswith("model.layers.") for n in masks)
    for name, keep in masks.items():
        w = modules[name].weight
        assert w.shape == keep.shape and w.shape[1] in (12, 16, 32)  # the cut widths
        assert torch.equal(w == 0, ~keep), name
    s = report["sparsity"]
    assert s["overall"] == 0.5 and s["zeroed"] == s["weights"] // 2
    embed = {id(p) for p in (model.model.embed_tokens.weight, model.lm_head.weight)}
    nonzero = sum(int((p != 0).sum()) for p in model.parameters() if id(p) not in embed)
    assert s["nonzero_params_non_embedding"] == nonzero == report["params_non_embedding_after"] - s["zeroed"]
    assert [r["layer"] for r in s["per_layer"]] == [0, 1, 2] and {r["sparsity"] for r in s["per_layer"]} == {0.5}
    plan = json.loads((out / "lopper_plan.json").read_text())
    assert plan["format"] == "lopper-plan/1"
    assert plan["sparsity"]["criterion"] == "sparsegpt" and plan["sparsity"]["masks"] == sp.MASKS_FILE
    assert plan["sparsity"]["modules"] == {n: 0.5 for n in masks}
    assert json.loads((out / "lopper_report.json").read_text())["sparsity"] == s
    with torch.no_grad():  # lopper.load gives the same model
        ids = torch.randint(3, 96, (1, 12))
        assert torch.equal(model(input_ids=ids).logits, lopper.load(str(out))(input_ids=ids).logits)


@pytest.mark.parametrize("spec", [dict(sparsity=0.5, sparsity_criterion="wanda", mlp=0.25),
                                  dict(sparsity=0.5, sparsity_criterion="sparsegpt", drop_layers=1, repair="lsq"),
                                  dict(sparsity_pattern="2:4", sparsity_criterion="sparsegpt"),
                                  dict(sparsity=0.6, sparsity_allocation="owl", sparsity_criterion="magnitude")])
def test_replaying_the_saved_plan_reproduces_the_weights(src, tmp_path, spec):
    first, second = tmp_path / "first", tmp_path / "second"
    lopper.prune(model=str(src), out=str(first), **spec, **FAST)
    repair = {"repair": spec["repair"]} if "repair" in spec else {}
    lopper.prune(model=str(src), out=str(second), plan=str(first / "lopper_plan.json"), **repair, **FAST)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (first / sp.MASKS_FILE).read_bytes() == (second / sp.MASKS_FILE).read_bytes()
    p1, p2 = Plan.load(first / "lopper_plan.json"), Plan.load(second / "lopper_plan.json")
    assert p1.sparsity["modules"] == p2.sparsity["modules"]


def test_replay_applies_the_recorded_masks_not_new_ones(src, tmp_path):
    """Edit the masks file: the replay follows it (the masks, not the settings, are what is replayed)."""
    first, second = tmp_path / "first", tmp_path / "second"
    lopper.prune(model=str(src), out=str(first), sparsity=0.5, sparsity_criterion="magnitude", **FAST)
    masks = sp.load_masks(first / sp.MASKS_FILE)
    name = "model.layers.1.mlp.up_proj"
    masks[name] = ~masks[name]
    (first / sp.MASKS_FILE).write_bytes(sp.pack_masks(masks))
    lopper.prune(model=str(src), out=str(second), plan=str(first / "lopper_plan.json"), **FAST)
    w = transformers.AutoModelForCausalLM.from_pretrained(second).get_submodule(name).weight
    assert torch.equal(w == 0, ~masks[name])


def test_replay_without_the_masks_file_is_refused(src, tmp_path):
    first = tmp_path / "first"
    lopper.prune(model=str(src), out=str(first), sparsity=0.5, **FAST)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(first / "lopper_plan.json", lone / "plan.json")
    with pytest.raises(LopperError, match="masks .* missing"):
        lopper.prune(model=str(src), out=str(tmp_path / "second"), plan=str(lone / "plan.json"), **FAST)
    assert not (tmp_path / "second").exists()


def test_dry_run_plan_records_settings_and_prune_applies_them(src, tmp_path):
    kw = dict(mlp=0.25, sparsity=0.5, sparsity_criterion="wanda", sparsity_scope="layer", repair_units="plan")
    plan = lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), **kw, **FAST)
    assert plan.sparsity["sparsity"] == 0.5 and "masks" not in plan.sparsity
    lopper.prune(model=str(src), out=str(tmp_path / "a"), plan=str(tmp_path / "plan.json"), **FAST)
    lopper.prune(model=str(src), out=str(tmp_path / "b"), **kw, **FAST)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_old_plans_without_sparsity_load_and_save_unchanged(src, tmp_path):
    lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), mlp=0.5, **FAST)
    text = (tmp_path / "plan.json").read_text()
    assert '"sparsity"' not in text
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.sparsity is None and plan.to_json() == text
    report = lopper.prune(model=str(src), out=str(tmp_path / "out"), plan=str(tmp_path / "plan.json"), **FAST)
    assert "sparsity" not in report and not (tmp_path / "out" / sp.MASKS_FILE).exists()


def test_masks_file_round_trip():
    g = torch.Generator().manual_seed(0)
    masks = {"a.b": torch.rand(5, 7, generator=g) > 0.5, "c": torch.rand(3, 3, generator=g) > 0.3}
    import io as _io
    import numpy as np
    data = sp.pack_masks(masks)
    assert len(sp.pack_masks({"big": torch.rand(1000, 1000) > 0.5})) < 1000 * 1000 / 8 + 2000  # one bit a weight
    path = _io.BytesIO(data)
    back = sp.load_masks(path)
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)
    with np.load(_io.BytesIO(data)) as z:
        assert z["a.b"].dtype == np.uint8 and z["a.b"].size == 5  # ceil(35 / 8) bytes


def test_cli_prints_nonzero_counts(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(src), "--out", str(out), "--sparsity", "0.5", "--sparsity-criterion", "magnitude",
                 "--sparsity-scope", "layer", "--sparsity-ignore", "self_attn", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "nonzero params (non-embedding)" in text and "sparsity of layer weights (unstructured)" in text
    plan = json.loads((out / "lopper_plan.json").read_text())
    assert plan["sparsity"]["scope"] == "layer" and all("mlp" in n for n in plan["sparsity"]["modules"])


# ---- refusals -----------------------------------------------------------------------------------------------------
BAD = [
    (dict(sparsity=1.0), "out of range"),
    (dict(sparsity=-0.1), "out of range"),
    (dict(sparsity_pattern="2-4"), "unknown"),
    (dict(sparsity_pattern="4:4"), "0 < N < M"),
    (dict(sparsity_pattern="0:4"), "0 < N < M"),
    (dict(sparsity_pattern="2:4", sparsity=0.3), "pass --sparsity 0.5"),
    (dict(sparsity_pattern="2:4", sparsity_scope="layer"), "drop --sparsity-scope"),
    (dict(sparsity_pattern="2:4", sparsity_allocation="owl"), "owl"),
    (dict(sparsity=0.5, sparsity_criterion="sparsegpt", sparsity_scope="global"), "row or layer"),
    (dict(sparsity=0.5, sparsity_allocation="owl", sparsity_scope="global"), "choose one"),
    (dict(sparsity=0.5, sparsity_criterion="obs"), "is not one of"),
    (dict(sparsity=0.5, sparsity_ignore="("), "regular expression"),
    (dict(sparsity_criterion="magnitude"), "do nothing without --sparsity"),
    (dict(sparsity=0.5, sparsity_ignore="layers"), "leaves no Linear"),
]


@pytest.mark.parametrize("kw,message", BAD)
def test_bad_sparsity_settings_are_refused(src, tmp_path, kw, message):
    with pytest.raises(LopperError, match=message) as e:
        lopper.prune(model=str(src), out=str(tmp_path / "out"), **kw, **FAST)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_replayed_structured_plan_can_get_sparsity_but_a_sparse_plan_keeps_its_own(src, tmp_path):
    lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), mlp=0.5, **FAST)
    kw = dict(sparsity=0.5, sparsity_criterion="sparsegpt", repair_units="plan")
    lopper.prune(model=str(src), out=str(tmp_path / "a"), plan=str(tmp_path / "plan.json"), **kw, **FAST)
    lopper.prune(model=str(src), out=str(tmp_path / "b"), mlp=0.5, **kw, **FAST)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LopperError, match="drop the --sparsity options"):
        lopper.prune(model=str(src), out=str(tmp_path / "c"), plan=str(tmp_path / "a" / "lopper_plan.json"),
                     sparsity=0.3, **FAST)


def test_cli_bad_pattern_exits_2(src, tmp_path, capsys):
    assert main(["prune", str(src), "--out", str(tmp_path / "o"), "--sparsity-pattern", "5:4", "--quiet"]) == 2
    assert "0 < N < M" in capsys.readouterr().err


# ---- semi-structured loading --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_four(tmp_path_factory):
    from tiny import save_tiny
    root = tmp_path_factory.mktemp("two-four")
    src = save_tiny(root / "src", "llama", layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128)  # kernel sizes
    out = root / "out"
    lopper.prune(model=str(src), out=str(out), sparsity_pattern="2:4", sparsity_criterion="magnitude", **FAST)
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_semi_structured_without_cuda_is_refused(two_four):
    with pytest.raises(LopperError, match="needs CUDA"):
        lopper.load(str(two_four), semi_structured=True)
    assert sp.is_2_4(lopper.load(str(two_four)).model.layers[0].mlp.up_proj.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's 2:4 kernels need CUDA")
def test_semi_structured_on_cuda_matches_dense(two_four):
    from torch.sparse import SparseSemiStructuredTensor
    dense = lopper.load(str(two_four), device="cuda", dtype="float16")
    sparse = lopper.load(str(two_four), device="cuda", dtype="float16", semi_structured=True)
    assert isinstance(sparse.model.layers[0].mlp.up_proj.weight.data, SparseSemiStructuredTensor) or isinstance(
        sparse.model.layers[0].mlp.up_proj.weight, SparseSemiStructuredTensor)
    ids = torch.randint(3, 96, (1, 64), device="cuda")
    with torch.no_grad():
        a, b = dense(input_ids=ids).logits.float(), sparse(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 5e-2 * a.abs().max()
