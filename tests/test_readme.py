"""The README's Python example runs as written (on the committed demo data)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no Python example"
    code = blocks[0].replace('"data/demo"', repr(str(ROOT / "data" / "demo")))
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "demo.h5").is_file()
    losses = [float(line.split()[1]) for line in result.stdout.splitlines() if re.match(r"^\d+ [\d.]+$", line)]
    assert len(losses) == 5 and all(0 < x < 1 for x in losses)
