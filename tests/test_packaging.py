"""The install layout: every package folder is installed, and the kernels' import name is ours alone.

Hugging Face's ``kernels`` package (a dependency of transformers >= 5.25) owns the import name ``kernels``; our
``kernels/`` folder installs as ``gemma_lowmem_kernels`` and must never shadow theirs, not even from the
repository root (where ``python -c``, ``python -m`` and notebooks put the folder on ``sys.path``).
"""

from __future__ import annotations

import configparser
import importlib.util
import subprocess
import sys
from pathlib import Path

import gemma_lowmem_kernels

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def test_every_package_folder_is_listed_for_install():
    options = _setup_cfg()["options"]
    package_dir = dict(line.split(" = ") for line in _lines(options["package_dir"]))
    folders = {"gemma_lowmem": ROOT / "gemma_lowmem"} | {name: ROOT / path for name, path in package_dir.items()}
    found = set()
    for top, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join((top, *parts)))
    assert sorted(_lines(options["packages"])) == sorted(found)


def test_the_kernels_import_name_is_ours_and_their_folder_not_a_package():
    assert Path(gemma_lowmem_kernels.__file__).parent == ROOT / "kernels" / "gemma_lowmem_kernels"
    assert not (ROOT / "kernels" / "__init__.py").exists()  # a regular package here would shadow theirs


def test_from_the_repository_root_import_kernels_never_gives_our_folder(tmp_path):
    """A stand-in for Hugging Face's package later on the path still wins over the folder at the root."""
    theirs = tmp_path / "site" / "kernels"
    theirs.mkdir(parents=True)
    (theirs / "__init__.py").write_text("def get_kernel(name):\n    return name\n")
    code = "import kernels, gemma_lowmem_kernels; print(kernels.__file__); print(kernels.get_kernel('x'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""})
    assert out.stdout.splitlines() == [str(theirs / "__init__.py"), "x"]
    assert importlib.util.find_spec("gemma_lowmem_kernels.int8_linear") is not None
