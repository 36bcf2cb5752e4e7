"""The core invariants, for every family of the registry (tests/families.py), on architectures and plans drawn by
hypothesis: a physically pruned model computes what the original computes with the same units zeroed
(`lopper.surgery.mask`); its parameter count is the one `lopper plan` predicts and its shapes are the plan's; a
standard checkpoint's config alone rebuilds it; pruning nothing changes nothing; a saved folder reloads (plain
transformers for uniform widths the config can describe, lopper.load otherwise) with the cut model's outputs, and
generates with a KV cache what it generates without one."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lopper
from lopper import io, surgery
from lopper.arch import adapter_for
from lopper.evaluate import planned_params
from lopper.plan import identity_plan
from checks import check_rebuilds_from_config, check_shapes, cut_and_compare, n_params
from families import REGISTRY
from tiny import outputs, tiny_tokenizer

TF4 = os.environ.get("LOPPER_TF4_PATH", "")
LOAD_IN_TF4 = r"""
import json, sys, torch, transformers
assert transformers.__version__.startswith("4."), transformers.__version__
folder, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
config = json.load(open(folder + "/config.json"))
encoder = config["model_type"] in ("bert", "roberta")
cls = transformers.AutoModel if encoder else transformers.AutoModelForCausalLM
kw = {} if encoder else {"attn_implementation": "eager"}
m = cls.from_pretrained(folder, **kw).eval()
with torch.no_grad():
    o = m(input_ids=torch.tensor(ids))
json.dump((o.logits if hasattr(o, "logits") else o.last_hidden_state).tolist(), open(out, "w"))
"""


def check_pruned_equals_masked(family, arch: dict, plan_of, visible: bool = True) -> None:
    model = family.build(arch)
    ids = family.inputs(arch["seed"])
    adapter = adapter_for(model)
    plan = plan_of(adapter)
    predicted = planned_params(model, type(adapter), plan)  # what `lopper plan` reports, on meta tensors
    # every drawn plan removes something the outputs show, but a whole expert no token was routed to
    standard, got = cut_and_compare(model, plan, ids, visible=visible)
    assert predicted["params"] == n_params(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and not family.encoder
    check_shapes(model, plan, tied)
    if standard:
        check_rebuilds_from_config(model, ids, got)


CASES = [(f.name, tied, kind) for f in REGISTRY.values() for tied in f.tie_options for kind in f.kinds]


@pytest.mark.parametrize("name,tied,kind", CASES)
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_pruned_equals_masked(name, tied, kind, data):
    check_drawn(data, name, kind, tied)


@pytest.mark.parametrize("name", list(REGISTRY))
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_random_architectures_and_plans(name, data):
    """Any tiny architecture of the family, any valid plan (any structure, widths differing between layers)."""
    check_drawn(data, name)


def check_drawn(data, name: str, kind: str | None = None, tied: bool | None = None) -> None:
    """Draw what is not given (structure, tying), then an architecture and a plan, and check pruned == masked."""
    family = REGISTRY[name]
    kind = kind or data.draw(st.sampled_from(family.kinds), label="kind")
    tied = data.draw(st.sampled_from(family.tie_options), label="tied") if tied is None else tied
    arch = data.draw(family.archs(name, kind, tied), label="arch")
    check_pruned_equals_masked(family, arch, lambda adapter: family.plan(data, adapter, kind),
                               visible=not (family.moe and kind == "experts"))


@pytest.mark.parametrize("name", list(REGISTRY))
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_identity_plan_changes_nothing(name, data):
    family = REGISTRY[name]
    tied = data.draw(st.sampled_from(family.tie_options), label="tied")
    arch = data.draw(family.archs(name, "all", tied), label="arch")
    model = family.build(arch)
    ids = family.inputs(arch["seed"])
    before, config, state = outputs(model, ids), model.config.to_dict(), copy.deepcopy(model.state_dict())
    params = n_params(model)
    assert surgery.apply(model, adapter_for(model), identity_plan(adapter_for(model))) is True
    assert torch.equal(outputs(model, ids), before)
    assert n_params(model) == params
    changed = {k: v for k, v in model.config.to_dict().items() if config.get(k) != v}
    # Qwen2's max_window_layers is rewritten as "kept layers below it": clamped to the layer count, same meaning
    assert changed in ({}, {"max_window_layers": min(config.get("max_window_layers") or 0, arch["layers"])})
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_the_registry_covers_every_supported_family():
    from lopper.arch import SUPPORTED
    assert set(REGISTRY) == set(SUPPORTED), "add a row to tests/families.py for each adapter"


def uniform(plan):
    """The plan with the first kept layer's entry copied to every kept layer of the same original widths (MoE: dense
    and expert layers apart): uniform widths, so a standard checkpoint wherever the config class describes the cut."""
    first: dict = {}
    for i in plan.layers:
        widths = tuple((k, v[i]) for k, v in sorted(plan.model.items()) if isinstance(v, list) and len(v) > i)
        plan.per_layer[i] = copy.deepcopy(plan.per_layer[first.setdefault(widths, i)])
        for key in ("heads", "kv_heads"):  # attention is the same in dense and expert layers
            if key in plan.per_layer[i]:
                plan.per_layer[i][key] = list(plan.per_layer[plan.layers[0]][key])
    return plan


def reload(model, plan, folder):
    """io.save, then plain transformers for a standard config, else lopper.load (which replays the plan)."""
    out = io.save(model, folder, source=str(folder.parent / "nowhere"), tokenizer=None, plan=plan, report={},
                  dtype=None)
    if json.loads((out / "config.json").read_text()).get("lopper_layout"):
        reloaded, plain = lopper.load(str(out)), False
    else:
        cls = transformers.AutoModel if adapter_for(model).is_encoder else transformers.AutoModelForCausalLM
        reloaded, plain = cls.from_pretrained(out).eval(), True
    if getattr(model.config, "_experts_implementation", None):
        reloaded.set_experts_implementation("eager")  # tiny expert widths are not grouped_mm's multiples of 8
    return reloaded, plain


def accepts(config, hidden: int, heads: int) -> bool:
    """Whether transformers' config class takes this hidden size with this head count (Llama's and others' validate
    that the one divides the other)."""
    try:
        type(config).from_dict({**config.to_dict(), "hidden_size": hidden, "num_attention_heads": heads})
        return True
    except Exception:  # ValueError, or huggingface_hub's StrictDataclassClassValidationError around it
        return False


@pytest.mark.parametrize("name", list(REGISTRY))
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_a_uniform_cut_is_standard_unless_the_config_cannot_say_it(name, data):
    """Uniform widths give a standard checkpoint whose config alone rebuilds the cut model, except where the config
    cannot say it: transformers' configs require hidden_size to be a multiple of the head count, and where the config
    derives head_dim = hidden / heads (the registry's trait, not the adapter's) the cut must keep that ratio."""
    family = REGISTRY[name]
    kind = data.draw(st.sampled_from(family.kinds), label="kind")
    arch = data.draw(family.archs(name, kind, family.tie_options[-1]), label="arch")
    model = family.build(arch)
    ids = family.inputs(arch["seed"])
    text = model.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    plan = uniform(family.plan(data, adapter_for(model), kind))
    standard = surgery.apply(model, adapter_for(model), plan)
    heads = len(plan.per_layer[plan.layers[0]]["heads"])
    hidden = len(plan.hidden)
    assert standard is (accepts(text, hidden, heads) and (not family.derived_head_dim or hidden == heads * head_dim))
    if standard:
        check_rebuilds_from_config(model, ids, outputs(model, ids))


@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("widths", ["uniform", "per-layer"])
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_saved_folder_reloads_and_generates_like_the_cut_model(name, widths, data, tmp_path_factory):
    """A cut of every structure, saved: plain transformers reloads it when its widths are uniform and the config
    class can describe them (a lopper layout and lopper.load otherwise), with the cut model's outputs; decoders then
    generate greedily with a KV cache what they generate without one, and what the original generates with the same
    units masked (after dropped layers, cache slots and layer types must follow the kept layers)."""
    family = REGISTRY[name]
    tied = data.draw(st.sampled_from(family.tie_options), label="tied")
    arch = data.draw(family.archs(name, "all", tied), label="arch")
    model = family.build(arch)
    plan = family.plan(data, adapter_for(model), "all")
    if widths == "uniform":
        plan = uniform(plan)
    ids = family.inputs(arch["seed"])
    masked = copy.deepcopy(model)
    surgery.mask(masked, adapter_for(masked), plan)
    standard = surgery.apply(model, adapter_for(model), plan)
    got = outputs(model, ids)
    reloaded, plain = reload(model, plan, tmp_path_factory.mktemp(name) / "out")
    assert plain is standard
    assert (outputs(reloaded, ids) - got).abs().max().item() < 1e-5
    check_shapes(reloaded, plan, bool(getattr(model.config, "tie_word_embeddings", False)) and not family.encoder)
    if family.encoder:
        return
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = reloaded.generate(ids[:1], use_cache=True, **gen)
        uncached = reloaded.generate(ids[:1], use_cache=False, **gen)
        reference = masked.generate(ids[:1], use_cache=True, **gen)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)


@pytest.mark.skipif(not TF4, reason="LOPPER_TF4_PATH not set (.ci/run sets it)")
@pytest.mark.parametrize("name", list(REGISTRY))
@settings(max_examples=1, deadline=None, database=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_a_standard_folder_loads_in_transformers_4(name, data, tmp_path_factory):
    """A uniform cut of one structure (or all), saved as a standard checkpoint, gives the same outputs in transformers
    4.57 (run in a subprocess from LOPPER_TF4_PATH) as the cut model in 5.x."""
    family = REGISTRY[name]
    kind = data.draw(st.sampled_from(family.kinds), label="kind")  # GPT-2 / OPT: head cuts alone are not standard
    arch = data.draw(family.archs(name, kind, family.tie_options[0]), label="arch")
    model = family.build(arch)
    plan = uniform(family.plan(data, adapter_for(model), kind))
    assume(surgery.apply(model, adapter_for(model), plan))  # a lopper layout is read by lopper.load alone
    folder = tmp_path_factory.mktemp(name)
    reload(model, plan, folder / "out")
    ids = family.inputs(arch["seed"])
    done = subprocess.run([sys.executable, "-c", LOAD_IN_TF4, str(folder / "out"), json.dumps(ids.tolist()),
                           str(folder / "o.json")], env={**os.environ, "PYTHONPATH": TF4}, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    got = torch.tensor(json.loads((folder / "o.json").read_text()))
    assert (got - outputs(model, ids)).abs().max().item() < 1e-5


def prune_options(family) -> dict:
    """A cut of every structure the family has, through lopper.prune's own selection (calibration and activation
    scores), with no repair, so that the result equals the original with the saved plan's units masked."""
    if family.moe:
        return dict(drop_layers=1, experts=0.25, mlp=0.5)
    kw = dict(drop_layers=1, heads=0.5, mlp=0.25)
    return kw if family.encoder else {**kw, "hidden": 0.5}


@pytest.mark.parametrize("name", list(REGISTRY))
@settings(max_examples=1, deadline=None)
@given(data=st.data())
def test_prune_end_to_end(name, data, tmp_path_factory):
    """lopper.prune on a saved folder: the output reloads (plain transformers when standard) and equals the original
    with the saved plan's units masked; LayerNorm families, whose hidden cuts are not mask-equivalent, equal the
    original cut by the plan in memory."""
    family = REGISTRY[name]
    tied = data.draw(st.sampled_from(family.tie_options), label="tied")
    arch = data.draw(family.archs(name, "all", tied), label="arch")
    if family.moe:  # loaded for pruning with transformers' grouped_mm experts kernel: widths multiples of 8
        arch = dict(family=name, seed=arch["seed"], layers=4, experts=4, per=16, shared=16, mlp=16, tied=tied,
                    **({"dense": (1,)} if name != "mixtral" else {}))
    assume(arch["layers"] >= 3)  # one dropped, the first and last protected
    root = tmp_path_factory.mktemp(name)
    family.build(arch).save_pretrained(root / "src")
    tiny_tokenizer(96).save_pretrained(root / "src")
    try:
        report = lopper.prune(model=str(root / "src"), out=str(root / "out"), round_to=1, calib="builtin",
                              calib_samples=4, seq_len=32, quiet=True, repair="none", **prune_options(family))
    except lopper.LopperError as e:  # e.g. 3 query heads per KV group have no half
        assume("no head count" not in str(e))
        raise
    assert report["params_after"] < report["params_before"]
    plan = io.Plan.load(root / "out" / io.PLAN_FILE)
    cls = transformers.AutoModel if family.encoder else transformers.AutoModelForCausalLM
    reloaded = cls.from_pretrained(root / "out").eval() if report["standard_checkpoint"] else \
        lopper.load(str(root / "out"))
    original = family.build(arch)
    for model in (reloaded, original):
        if getattr(model.config, "_experts_implementation", None):
            model.set_experts_implementation("eager")
    if family.layernorm and "hidden" in prune_options(family):
        surgery.apply(original, adapter_for(original), plan)
    else:
        surgery.mask(original, adapter_for(original), plan)
    ids = family.inputs(arch["seed"])
    torch.testing.assert_close(outputs(reloaded, ids), outputs(original, ids), atol=1e-4, rtol=0)
