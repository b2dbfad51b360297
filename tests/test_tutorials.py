"""The tutorials stay runnable notebooks in the docs site (cheap checks; `.ci/run` executes them with
`python docs/run_tutorials.py` after the suite, and builds the site with `mkdocs build --strict`)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((REPO / "docs" / "tutorials").glob("[0-9]*.py"))


def runner():
    return load_script(REPO / "docs" / "run_tutorials.py")


def test_tutorials_are_percent_notebooks_in_the_site():
    assert len(TUTORIALS) >= 3
    nav = (REPO / "mkdocs.yml").read_text()
    for path in TUTORIALS:
        text = path.read_text()
        ast.parse(text, filename=str(path))  # a script that Python reads, so it diffs and lints like code
        assert text.startswith("# ---\n# jupyter:\n#   jupytext:\n#     formats: py:percent"), path.name
        assert text.count("\n# %%") >= 4 and "# %% [markdown]" in text, path.name
        assert f"tutorials/{path.name}" in nav, f"{path.name} is not a page of mkdocs.yml"
        assert "import circuitdyn as cd" in text


def test_runner_finds_every_tutorial_and_uses_a_temporary_directory(tmp_path):
    run = runner()
    assert run.tutorials([]) == TUTORIALS
    assert [p.name for p in run.tutorials(["01_quickstart"])] == ["01_quickstart.py"]
    env = run.environment(tmp_path)
    assert env["TMPDIR"] == str(tmp_path) and env["HF_HUB_OFFLINE"] == "1"
    assert str(REPO / "docs" / "tutorials") in env["PYTHONPATH"].split(":")


def test_api_pages_name_modules_that_exist():
    for page in sorted((REPO / "docs" / "api").glob("*.md")):
        for line in page.read_text().splitlines():
            if line.startswith("::: "):
                assert importlib.util.find_spec(line[4:].strip()) is not None, (page.name, line)


def test_measuring_change_page_is_the_readme_section():
    """docs/measuring-change.md copies the README section of that name: edit both, or this fails."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("## How circuitdyn measures change")
    section = readme[start : readme.index("\n## ", start + 3)].strip()
    page = (REPO / "docs" / "measuring-change.md").read_text().strip()
    assert page == section.replace("## ", "# ", 1)
