#!/usr/bin/env bash
# The README's quick start as a new user meets it: its install commands exactly as written (no constraints, so the
# newest releases), in a fresh venv, then a short smoke: import every module, the scripts' --help, and one training
# step of a tiny random Gemma in int8. A failure here fails CI: the quick start must be the command that works (if a
# new release breaks it, the quick start pins around it).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The quick start's command line, read from the README so the two cannot drift: its pip installs, without the run.
line=$(python .ci/quickstart_line.py README.md)
install=${line%%&& python scripts/train.py*}
if [[ "$install" == "$line" || "$install" != pip\ install* ]]; then
    echo "quickstart smoke: the README's quick start does not read 'pip install ... && python scripts/train.py ...'"
    echo "  got: $line"
    exit 1
fi
echo "quickstart smoke: $install"

python -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
eval "$install" > "$work/install.log" 2>&1 || { tail -50 "$work/install.log"; exit 1; }
pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|peft|bitsandbytes|kernels|accelerate)=='

# From the repository root, as a user of the checkout would run it: the folder kernels/ must not shadow any
# installed package named kernels, and every module of ours must import.
python - <<'EOF'
import importlib
import pkgutil

import gemma_lowmem
import gemma_lowmem_kernels

names = [gemma_lowmem.__name__, gemma_lowmem_kernels.__name__]
for package in (gemma_lowmem, gemma_lowmem_kernels):
    names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
try:
    import kernels
except ImportError:
    pass
else:  # Hugging Face's package (a dependency of newer transformers), never our folder
    assert getattr(kernels, "__file__", None) and "site-packages" in kernels.__file__, kernels
print(f"quickstart smoke: imported {len(names)} modules")
EOF
for script in train grade evaluate plan_memory prepare_data; do
    python "scripts/$script.py" --help > /dev/null
done
echo "quickstart smoke: --help of every script"

python -c "
import sys
from tests.tiny import tiny_gemma3, tiny_tokenizer
tiny_gemma3().save_pretrained(sys.argv[1]); tiny_tokenizer().save_pretrained(sys.argv[1])
" "$work/tiny"
HF_HUB_OFFLINE=1 python scripts/train.py --demo --model "$work/tiny" --lang en --max-seq-length 3072 \
    --max-article-length 300 --batch-size 1 --grad-accum 1 --max-steps 1 --no-evaluate \
    --output-dir "$work/run" --cache-dir "$work/cache" > "$work/train.log" 2>&1 || { tail -50 "$work/train.log"; exit 1; }
python -c "
import json, math, sys
summary = json.load(open(sys.argv[1]))
assert summary['steps'] == 1 and math.isfinite(summary['final_loss']), summary
print('quickstart smoke: 1 training step of a tiny int8 Gemma, loss', round(summary['final_loss'], 3))
" "$work/run/summary.json"
deactivate
cd "$root"
