"""Our own calls into torch / transformers / peft raise no FutureWarning or DeprecationWarning, and
``constraints.txt`` pins every dependency ``setup.cfg`` names, within its range.

A warning is ours when, at the moment it is raised, the innermost frame of this repository on the stack is in
``gemma_lowmem/`` or ``kernels/gemma_lowmem_kernels/``: the library's deprecated API was reached through our call,
however deep inside the library the warning itself sits (``is_gradient_checkpointing`` is read by peft inside
``get_peft_model``). A warning raised while a library is being imported (torch warns about its own ``torch.jit``
use) is not a call of ours, nor is one reached from test code alone. Each stage of a representative run is its own
test, so a failure names the stage: load (int8 and float) + LoRA, tokenize + fit with checkpointing and packed
rows, generation, adapter save + load.
"""

from __future__ import annotations

import configparser
import inspect
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import gemma_lowmem
import gemma_lowmem_kernels
from gemma_lowmem.checkpoint import save_adapter
from gemma_lowmem.config import LoraConfig, ModelConfig, TrainConfig
from gemma_lowmem.data.collate import collate_for
from gemma_lowmem.data.conversation import Conversation
from gemma_lowmem.data.tokenize import encode_conversations
from gemma_lowmem.evaluation.generate import generate_texts
from gemma_lowmem.model import add_lora, load_adapter, load_base_model
from gemma_lowmem.train import fit
from tests.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OURS = (Path(gemma_lowmem.__file__).resolve().parent, Path(gemma_lowmem_kernels.__file__).resolve().parent)
CATEGORIES = (FutureWarning, DeprecationWarning)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _our_caller(frame: FrameType | None) -> str | None:
    """``file:line`` of the innermost repository frame when it is ours; None for imports and test-only calls."""
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name:  # raised while a module is imported: the library's own code, not our call
            return None
        path = Path(name).resolve()
        if path.is_relative_to(ROOT):
            if any(path.is_relative_to(folder) for folder in OURS):
                return f"{path.relative_to(ROOT)}:{frame.f_lineno}"
            return None  # tests/ called the library itself
        frame = frame.f_back
    return None


@contextmanager
def deprecations_from_our_calls() -> Iterator[list[str]]:
    """Collect every FutureWarning/DeprecationWarning raised through our code inside the block, each time it is
    raised (``always``: the once-per-location registry would hide a warning an earlier test already raised)."""
    found: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        # Called synchronously from warnings.warn, so the stack still holds the call that raised it; the walk
        # starts above this function (a frame of tests/).
        where = _our_caller(inspect.currentframe().f_back) if issubclass(category, CATEGORIES) else None
        if where is not None:
            found.append(f"{category.__name__} through {where}: {message}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings on exit
        yield found


def assert_none(found: list[str]) -> None:
    assert not found, "deprecated APIs called from our code:\n" + "\n".join(sorted(set(found)))


def lora_model(tiny_model_dir: Path, quant: str) -> torch.nn.Module:
    base = load_base_model(ModelConfig(model=str(tiny_model_dir), quant=quant), torch.device("cpu"))
    return add_lora(base, LoraConfig(r=4, alpha=8), gradient_checkpointing=True)


def conversations(n: int) -> list[Conversation]:
    return [Conversation([{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": str(2 * i)}]) for i in range(n)]


def test_the_capture_sees_a_deprecation_reached_through_our_code_and_ignores_test_calls():
    """The check itself: a library's warning reached through a function of ours is caught, one from here is not."""
    from gemma_lowmem.data.records import BadRows
    from gemma_lowmem.tasks.sources import normalise_rows

    library: dict = {}  # a stand-in library function that warns about itself, in a file outside the repository
    exec(compile("import warnings\ndef old_api(row):\n    warnings.warn('old_api is deprecated', FutureWarning)\n"
                 "    return row\n", "/site-packages/some_library.py", "exec"), library)
    with deprecations_from_our_calls() as found:
        library["old_api"]({})
    assert found == []
    with deprecations_from_our_calls() as found:
        normalise_rows([{}], library["old_api"], "rows", skip_bad_rows=False, bad_rows=BadRows())
    assert len(found) == 1 and "gemma_lowmem/tasks/sources.py" in found[0], found


@pytest.mark.parametrize("quant", ["int8", "none"])
def test_loading_and_adding_lora(tiny_model_dir, quant):
    with deprecations_from_our_calls() as found:
        lora_model(tiny_model_dir, quant)
    assert_none(found)


def test_tokenizing_and_training_with_checkpointing_and_packing(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir, "int8")
    with deprecations_from_our_calls() as found:
        data = encode_conversations(tiny_tokenizer(), conversations(10), max_seq_length=64).examples
        cfg = TrainConfig(max_steps=2, batch_size=2, grad_accum=2, eval_every=1, save_every=1, packing=True,
                          pack_len=64, gradient_checkpointing=True)
        result = fit(model, data[:8], data[8:], cfg, run_dir=tmp_path, show_progress=False,
                     collate_fn=collate_for(model, pad_id=0, packed=cfg.packing))
    assert result.steps == 2
    assert_none(found)


def test_generation(tiny_model_dir):
    model = lora_model(tiny_model_dir, "int8")
    with deprecations_from_our_calls() as found:
        texts = generate_texts(model, tiny_tokenizer(), ["<bos>hello", "<bos>a longer prompt"], max_new_tokens=3,
                               show_progress=False)
    assert len(texts) == 2
    assert_none(found)


def test_saving_and_loading_the_adapter(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir, "int8")
    with deprecations_from_our_calls() as found:
        save_adapter(model, tmp_path / "adapter", {})
        base = load_base_model(ModelConfig(model=str(tiny_model_dir), quant="int8"), torch.device("cpu"))
        load_adapter(base, tmp_path / "adapter")
    assert_none(found)


# ------------------------------------------------------------------------------------------------------ versions


def _setup_requirements() -> list[Requirement]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    lines = parser["options"]["install_requires"].splitlines()
    lines += [line for _, block in parser["options.extras_require"].items() for line in block.splitlines()]
    return [Requirement(line) for line in lines if line.strip()]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
            assert m, f"constraints.txt: {line!r} is not NAME==VERSION"
            name = canonicalize_name(m.group(1))
            assert name not in pins, f"constraints.txt pins {name} twice"
            pins[name] = m.group(2)
    return pins


def test_constraints_pin_every_dependency_within_setup_cfg_ranges():
    pins = _pins()
    for req in _setup_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt has no pin for {req.name} (setup.cfg needs {req})"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
