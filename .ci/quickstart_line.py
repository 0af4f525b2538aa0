"""Print the command line of the README's quick start: the first ```bash block under "## Quick start"."""

import re
import sys
from pathlib import Path

text = Path(sys.argv[1]).read_text(encoding="utf-8")
section = text.split("## Quick start", 1)[1]
block = re.search(r"```bash\n(.*?)```", section, re.S)
lines = [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]
if len(lines) != 1:
    sys.exit(f"{sys.argv[1]}: the quick start should be one command line, found {len(lines)}")
print(lines[0])
