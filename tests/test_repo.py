"""The repository keeps its promises: every notebook is in the README's table of contents, is
committed executed top to bottom, and the package never imports a test-only reference."""

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def test_readme_lists_every_notebook_and_nothing_else():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"\]\((notebooks/[^)]+\.ipynb)\)", readme))
    present = {str(p.relative_to(ROOT)) for p in NOTEBOOKS}
    assert listed == present


def test_notebooks_are_committed_executed_in_order():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        counts = [c["execution_count"] for c in cells if c["cell_type"] == "code" and "".join(c["source"]).strip()]
        assert counts == list(range(1, len(counts) + 1)), f"{path.name}: execution counts {counts}"
        errors = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"] if o["output_type"] == "error"]
        assert not errors, f"{path.name} has stored error outputs"


def test_package_does_not_import_test_references():
    for path in (ROOT / "llm_scratch").rglob("*.py"):
        text = path.read_text()
        for banned in ("transformers", "peft", "trl", "pytest"):
            assert not re.search(rf"^\s*(import|from)\s+{banned}\b", text, re.M), f"{path.name} imports {banned}"
