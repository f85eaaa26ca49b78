"""The README and the manual (docs/, MkDocs): the front door's promises, and reference pages
that cannot drift from the code. (The strict build itself runs in `make test`.)"""

from __future__ import annotations

import importlib.util
import re

import pyarrow as pa
import pytest

from pneumo_ray import cli
from pneumo_ray.scoring.ledger import OUTPUT_SCHEMA

from .conftest import REPO

DOCS = REPO / "docs"
JOBS = ("train", "score", "evaluate", "adapt")


def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert lines[0] == "# pneumo_ray"
    commands = [line.split("#")[0].strip() for line in lines[2:6] if line.startswith("make ")]
    assert commands == ["make demo", "make test"]
    assert len(lines) <= 160
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)


def test_every_link_of_the_readme_and_the_manual_names_a_file_that_exists():
    for page in [REPO / "README.md", *DOCS.rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_the_manual_lists_every_page_it_has():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    listed = set(re.findall(r":\s+(\S+\.md)\s*$", nav, re.M))
    assert pages == listed


ARROW_WORDS = {
    pa.string(): "string",
    pa.float32(): "float",
    pa.bool_(): "bool",
    pa.int64(): "int",
    pa.list_(pa.string()): "list of string",
    pa.list_(pa.float32()): "list of float",
    pa.timestamp("us", tz="UTC"): "timestamp (UTC)",
}


def test_the_parquet_page_names_every_column_with_its_type():
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", (DOCS / "outputs.md").read_text(), re.M)
    documented = {name: kind.strip() for name, kind in rows}
    assert set(documented) == set(OUTPUT_SCHEMA.names)
    for field in OUTPUT_SCHEMA:
        assert documented[field.name] == ARROW_WORDS[field.type], field.name


@pytest.mark.parametrize("job", JOBS)
def test_each_jobs_options_page_is_generated_from_its_parser(job):
    page = (DOCS / "reference" / f"{job}.md").read_text()
    assert f"<!-- flags: {job} -->" in page
    table = hooks().on_page_markdown(page)
    parser = getattr(cli, f"{job}_parser")()
    for action in parser._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}`" in table, flag  # a new or renamed flag reaches the manual
    assert "<!-- flags" not in table


def test_the_getting_started_commands_are_the_readmes():
    readme = (REPO / "README.md").read_text().splitlines()[2:6]
    started = (DOCS / "getting-started.md").read_text()
    for line in readme:
        if line.startswith("make "):
            assert line.split("#")[0].strip() in started
