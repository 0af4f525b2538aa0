"""The README's Python example runs as written (on a tiny random model instead of a hub id); the Korean README's
quick start is the English one's (CI runs that line unpinned: .ci/quickstart_smoke.sh)."""

import re
from pathlib import Path

from tests.tiny import tiny_gemma3, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_reuse_example_runs(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    example = next(b for b in blocks if "fit(" in b)
    model_dir = tmp_path / "model"
    tiny_gemma3().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    code = example.replace('"path/or/hub-id"', repr(str(model_dir)))
    code = code.replace('"runs/reuse"', repr(str(tmp_path / "run")))
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def quick_start(path: Path) -> str:
    return re.search(r"```bash\n(pip install [^\n]*--demo)\n```", path.read_text(encoding="utf-8")).group(1)


def test_both_readmes_give_the_same_quick_start():
    assert quick_start(README) == quick_start(ROOT / "README.ko.md")
