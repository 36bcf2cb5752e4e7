"""Shared fixtures: tiny model folders (model + tokenizer), built once per session and copied per use on request."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ["HF_HUB_OFFLINE"] = "1"  # never download anything
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine each parallel op can wait ms for them
torch.set_num_threads(1)

from hypothesis import settings  # noqa: E402

from tiny import save_tiny  # noqa: E402

# CI (.ci/run) draws examples seeded from the commit: every commit checks new draws (over time far more than the few
# examples a test runs each time), and rerunning one commit draws the same ones, so a failure is reproduced by its
# seed (printed in the header: `pytest --hypothesis-seed N`). A local run draws new ones (and hypothesis replays any
# failure it found from its database).
settings.register_profile("ci", print_blob=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def commit_seed() -> int | None:
    """The first 32 bits of the checked-out commit, or None outside a git checkout."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return int(head[:8], 16) if len(head) >= 8 else None


@pytest.hookimpl(tryfirst=True)  # before hypothesis reads the seed option in its own
def pytest_configure(config):
    if os.environ.get("HYPOTHESIS_PROFILE") == "ci" and config.getoption("hypothesis_seed", None) is None:
        seed = commit_seed()
        if seed is None:
            settings.register_profile("ci", print_blob=True, database=None, derandomize=True)
            settings.load_profile("ci")
        else:
            config.option.hypothesis_seed = seed


def pytest_report_header(config):
    seed = config.getoption("hypothesis_seed", None)
    return f"hypothesis seed: {seed} (rerun the same draws with --hypothesis-seed {seed})" if seed is not None else None


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(family, **tiny_config kwargs) -> folder with config, safetensors and tokenizer. Cached: treat it as
    read-only (tests that damage a folder use `model_copy`)."""
    cache: dict = {}

    def make(family: str, seed: int = 0, **kw) -> Path:
        key = (family, seed, tuple(sorted(kw.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-model")
            cache[key] = Path(save_tiny(folder, family, seed=seed, **kw))
        return cache[key]

    return make


@pytest.fixture
def model_copy(model_dir, tmp_path):
    """A private, writable copy of a cached model folder."""
    def make(family: str, **kw) -> Path:
        dest = tmp_path / f"{family}-copy"
        shutil.copytree(model_dir(family, **kw), dest)
        return dest
    return make
