"""The README's tour runs as written (on the committed demo data), and its CI markers are intact."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def marked_block(marker: str) -> str:
    """The code block after ``<!-- marker -->`` (as .ci/run extracts it)."""
    match = re.search(rf"^<!-- {marker} -->\n```\w*\n(.*?)^```", README, flags=re.S | re.M)
    assert match, f"the README has no block marked <!-- {marker} -->"
    return match.group(1)


def test_ci_markers():
    assert marked_block("demo-command").startswith("pip install -e . && streamnn-pack data/demo")
    assert "pytest" in marked_block("test-command")


def test_tour_python_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 1, "the README has one Python block, the tour"
    code = blocks[0].replace('"data/demo"', repr(str(ROOT / "data" / "demo")))
    script = tmp_path / "tour.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Store('demo.h5', test=120, train=400" in result.stdout
    losses = [float(line.split()[1]) for line in result.stdout.splitlines() if re.match(r"^\d+ [\d.]+$", line)]
    assert len(losses) == 5 and all(0 < x < 1.5 for x in losses)
    accuracy = float(re.search(r"^test accuracy ([\d.]+)$", result.stdout, flags=re.M).group(1))
    assert accuracy > 0.6  # a trained network, not chance
    assert (tmp_path / "my.h5").is_file()


def test_tour_commands_run(tmp_path):
    (tmp_path / "data").symlink_to(ROOT / "data")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", marked_block("tour-commands")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "preview.png").is_file()
    assert {"checkpoint-latest.h5", "checkpoint-best.h5", "metrics.csv", "curves.png"} <= {
        p.name for p in (tmp_path / "runs" / "tour").iterdir()}
    predictions = [line.split("\t") for line in result.stdout.splitlines() if line.startswith("data/demo/test_set")]
    assert len(predictions) == 60 and all(cls in ("cats", "dogs") for _, cls, _ in predictions)
