"""The README keeps up with the tree: every module is in its Layout; the adding-a-layer page's example runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from qna_bench import results

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
ADDING_A_LAYER = (REPO / "docs" / "adding-a-layer.md").read_text()
PACKAGES = ("qna_bench", "baselines")


def _section(title: str) -> str:
    """The README text from the heading ``title`` to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", README, flags=re.MULTILINE)
    assert match, f"README has no section {title!r}"
    level = len(match.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", flags=re.MULTILINE).search(README, match.end())
    return README[match.end() : end.start() if end else len(README)]


def _unmentioned(layout: str) -> list[str]:
    """Modules the Layout neither names nor covers by naming their folder (a subpackage such as measure/;
    a top-level package's own modules are each named)."""
    missing = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if path.name == "__init__.py":
                continue
            folder = path.parent.relative_to(REPO)
            named_folder = folder.parent != Path(".") and f"{folder.name}/" in layout
            if not named_folder and not re.search(rf"(?<![\w.]){re.escape(path.name)}\b", layout):
                missing.append(str(path.relative_to(REPO)))
    return missing


def test_every_module_is_in_the_readme_layout():
    assert _unmentioned(_section("Layout")) == []


def test_the_layout_check_notices_a_module_left_out():
    assert "qna_bench/runner.py" in _unmentioned(_section("Layout").replace("runner.py", "r.py"))
    # A subpackage's folder covers its modules; a top-level package's name does not cover its own.
    missing = _unmentioned("qna_bench/ baselines/ measure/")
    assert "qna_bench/runner.py" in missing and "baselines/swin.py" in missing
    assert "qna_bench/measure/latency.py" not in missing and "qna_bench/models/nat.py" in missing


def test_the_add_your_own_layer_example_runs_as_a_plugin(tmp_path):
    (code,) = re.findall(r"```python\n(.*?)```", ADDING_A_LAYER, flags=re.DOTALL)[:1]
    (command,) = re.findall(r"```bash\n(.*?)```", ADDING_A_LAYER, flags=re.DOTALL)[:1]
    (tmp_path / "my_layers.py").write_text(code)
    name = re.search(r'@register_layer\(\s*"(\w+)"', code).group(1)
    assert "plugins=[my_layers]" in command and name in command
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(REPO / "run_bench.py"), "plugins=[my_layers]", f"layers=[{name}]", "windows=[3,5]",
         "problem=tiny", "measure.min_run_time_s=0.01", "plots=false", f"results_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr
    frame = results.read_results(out / results.RESULTS_FILE)
    assert set(frame["layer"]) == {name} and set(frame["status"]) == {"ok"} and len(frame) == 4
    assert (frame["median_s"] > 0).all()
