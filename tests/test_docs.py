"""The README and docs/ keep up with the tree: every relative link resolves, every config key has its
line in docs/configuration.md, the schema page matches `results.SCHEMA`, and the README stays a door."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

from qna_bench.config import BenchConfig

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOPICS = ("configuration", "scaling-out", "adding-a-layer", "compare", "results-schema", "methodology", "roofline",
          "qna-layer", "findings", "index")
# [text](target) and ![alt](target), not inside code.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def _config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of a structured config, dotted (``measure.threads``), from its dataclass fields."""
    keys = []
    for field in dataclasses.fields(cls):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if dataclasses.is_dataclass(default):
            keys += _config_keys(type(default), f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def test_every_topic_has_its_page():
    assert [t for t in TOPICS if not (REPO / "docs" / f"{t}.md").is_file()] == []


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = [f"{page.relative_to(REPO)}: {target}" for page in PAGES for target in _links(page)
              if not (page.parent / target.split("#")[0]).exists()]
    assert broken == []


def test_the_link_check_notices_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](missing.md) [b](https://example.org) ![c](page.md)\n```\n[d](not-a-link.md)\n```\n")
    assert _links(page) == ["missing.md", "page.md"]


def test_every_config_key_has_its_line_in_the_configuration_page():
    rows = [line for line in (REPO / "docs" / "configuration.md").read_text().splitlines() if line.startswith("| `")]
    documented = {key for row in rows for key in re.findall(r"`([\w.]+)`", row.split(" | ")[0])}
    keys = _config_keys(BenchConfig)
    assert "measure.threads" in keys and "problem.batch" in keys and "layers" in keys
    assert [key for key in keys if key not in documented] == []


def test_the_results_schema_page_is_generated_from_the_schema():
    spec = importlib.util.spec_from_file_location("schema_doc", REPO / "scripts" / "schema_doc.py")
    schema_doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(schema_doc)
    current = schema_doc.PAGE.read_text()
    assert current == schema_doc.page(current), "docs/results-schema.md is out of date: run scripts/schema_doc.py"


def test_the_readme_is_a_door_with_a_figure_and_the_two_set_up_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert re.search(r"!\[[^\]]+\]\(results/[^)]+\.png\)", readme)
    assert "make bench" in readme and "make test" in readme
    assert all(f"docs/{t}.md" in readme for t in TOPICS)
