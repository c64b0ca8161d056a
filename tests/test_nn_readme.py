"""The layers example of docs/python.md (a network of layers trained over a Loader) runs as written."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_python_doc_layers_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python.md").read_text(), flags=re.S)
    cnn = [b for b in blocks if "Conv2D(" in b]
    assert len(cnn) == 1, "docs/python.md has one layers example"
    pack = (f"from streamnn.pack import pack\npack({str(ROOT / 'data' / 'demo')!r}, 'demo.h5', size=32, "
            "force=True, workers=1)\n")
    script = tmp_path / "layers_example.py"
    script.write_text(pack + cnn[0])
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(line.split()[1]) for line in result.stdout.splitlines() if re.match(r"^\d+ [\d.]+$", line)]
    assert len(losses) == 3 and all(0 < x < 1.5 for x in losses)
    assert "conv0.W" in result.stdout and "parameters" in result.stdout
