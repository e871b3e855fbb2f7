"""Shared fixtures: tiny checkpoints built once per session (see checkpoint_factory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Tests import the helper module as `import checkpoint_factory`; pytest's default import mode puts
# this folder on sys.path already, but --import-mode=importlib does not.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Tiny models on a shared 2-core machine: intra-op threads only add wake-up latency (one
    ``index_add_`` measured 10-40 ms with 2 threads under load, 5 us with one). Correctness
    tests don't need them; benchmarks measure threading separately. It also matches the CLI
    subprocesses the tests start (OMP_NUM_THREADS=1), so in-process and subprocess greedy
    answers agree bit for bit."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default TinySpec in the HF layout. Shared by the session: copy it before corrupting it."""
    from checkpoint_factory import TinySpec, make_hf_checkpoint  # lazy: transformers is slow

    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf"), TinySpec())


@pytest.fixture(scope="session")
def tiny_mistral_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default TinySpec in the Mistral-native layout; same weights as tiny_hf_checkpoint."""
    from checkpoint_factory import TinySpec, make_mistral_checkpoint

    return make_mistral_checkpoint(tmp_path_factory.mktemp("tiny_mistral"), TinySpec())
