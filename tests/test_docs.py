"""The documentation: README stays the front door, and the docs site builds with --strict.

`mkdocs build --strict` fails on a broken link, a link to a missing anchor, a page left out
of the nav, or an API reference (mkdocstrings) that no longer resolves, so a renamed module
or a moved page fails here rather than on a reader.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250


def _setup_commands(text: str) -> list[str]:
    """The lines of README's setup block, as .ci/run reads them (fences and markers dropped)."""
    match = re.search(r"<!-- setup -->\n(.*?)<!-- /setup -->", text, re.S)
    assert match, "README.md has no <!-- setup --> ... <!-- /setup --> block (.ci/run reads its two commands)"
    return [line for line in match.group(1).splitlines() if line.strip() and not line.startswith("```")]


def test_readme_is_short_and_keeps_the_setup_block():
    text = README.read_text(encoding="utf-8")
    lines = text.count("\n") + (not text.endswith("\n"))
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines, over {MAX_README_LINES}: move the detail into docs/"
    commands = _setup_commands(text)
    assert len(commands) == 2, f"README's setup block must hold two commands (install and run, then the tests); it holds {commands}"
    assert "pip install" in commands[0] and ".[test]" in commands[0], commands[0]
    assert "pytest" in commands[1], commands[1]


def test_readme_links_into_docs_exist():
    # GitHub resolves README's relative links; mkdocs never sees README, so check them here.
    text = README.read_text(encoding="utf-8")
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://", t)}
    missing = sorted(t for t in targets if t and not (ROOT / t).exists())
    assert not missing, f"README.md links to files that do not exist: {missing}"


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    missing = [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python") if not _importable(name)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not importable: the docs build is part of the test extra; pip install -e \".[docs]\" (or \".[test]\")")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "reference" / "index.html").exists()


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _python_imports() -> list[tuple[str, str]]:
    """(page, line) for every `import sam_blocked...` / `from sam_blocked... import` line in a
    ```python block of README.md and docs/: a renamed module breaks these, and mkdocs never runs them."""
    found = []
    for page in [README, *sorted((ROOT / "docs").rglob("*.md"))]:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                if re.match(r"(from sam_blocked[\w.]* import [\w, ]+|import sam_blocked[\w.]*)$", line):
                    found.append((str(page.relative_to(ROOT)), line))
    return found


def test_the_imports_in_the_documentation_run():
    imports = _python_imports()
    assert imports, "no sam_blocked import found in README.md or docs/ code blocks: the scan is broken"
    failed = []
    for page, line in imports:
        try:
            exec(line, {})
        except ImportError as error:
            failed.append(f"{page}: {line} ({error})")
    assert not failed, "imports in the documentation's code that no longer run:\n" + "\n".join(failed)
