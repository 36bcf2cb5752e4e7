"""Calibration sources: the model's own samples (the default for causal LMs), the shipped text (encoders, or
`--calib builtin`), or a file."""
from __future__ import annotations

import pytest
import torch

import lopper
from lopper.errors import LopperError
from lopper.io import load_model
from lopper.text import generated_windows

FAST = {"calib_samples": 3, "seq_len": 16, "quiet": True}


def test_self_generated_windows_are_the_models_seeded_samples(model_dir):
    model, tok, _ = load_model(str(model_dir("llama")))
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = generated_windows(model, tok, 35, 12)  # more than one generation batch
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG is left as it was
    b = generated_windows(model, tok, 35, 12)
    assert len(a) == 35 and all(w.shape == (1, 12) and w.dtype == torch.long for w in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({tuple(w[0].tolist()) for w in a}) > 30  # sampled, not greedy copies
    assert int(max(w.max() for w in a)) < model.config.vocab_size


def test_the_default_is_self_for_causal_lms_and_builtin_for_encoders(model_dir, tmp_path):
    causal = lopper.prune(model=str(model_dir("llama")), out=str(tmp_path / "a"), mlp=0.5, **FAST)
    assert causal["args"]["calib"] == "self"
    encoder = lopper.prune(model=str(model_dir("bert")), out=str(tmp_path / "b"), mlp=0.5, **FAST)
    assert encoder["args"]["calib"] == "builtin"
    text = lopper.prune(model=str(model_dir("llama")), out=str(tmp_path / "c"), mlp=0.5, calib="builtin", **FAST)
    assert text["args"]["calib"] == "builtin"


def test_an_encoder_cannot_sample_its_calibration(model_dir, tmp_path):
    with pytest.raises(LopperError, match="--calib self samples text from the model"):
        lopper.prune(model=str(model_dir("bert")), out=str(tmp_path / "o"), mlp=0.5, calib="self", **FAST)
    assert not (tmp_path / "o").exists()


def test_sampling_starts_from_the_first_special_token_there_is():
    from types import SimpleNamespace as NS
    from lopper.text import start_token
    tok = NS(bos_token_id=None, eos_token_id=None)
    assert start_token(NS(config=NS(bos_token_id=None, eos_token_id=[7, 8], vocab_size=96)), tok) == 7
    assert start_token(NS(config=NS(vocab_size=96)), NS(bos_token_id=None, eos_token_id=2)) == 2
    assert start_token(NS(config=NS(vocab_size=96)), tok) is None  # then the default is --calib builtin
    # a tokenizer whose special tokens were added past the model's vocabulary: the config's token instead
    assert start_token(NS(config=NS(vocab_size=96, bos_token_id=1)), NS(bos_token_id=None, eos_token_id=96)) == 1
