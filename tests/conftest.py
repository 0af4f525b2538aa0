"""Test options: slow tests (the real Gemma 3 270M, whole scripts) run only with --run-slow, as CI does."""

from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_gemma3, tiny_tokenizer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run the slow tests (real model, whole scripts)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny matmuls gain nothing from threads, and on shared cores spinning OpenMP
    threads cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma 3 and its tokenizer saved as a model folder (what ``--model PATH`` loads)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_gemma3().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
