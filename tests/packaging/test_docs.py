"""The docs site: README is the short front page, the site builds with --strict, the configuration
reference is what the code says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import DOCS, REPO

MKDOCS = Path(sys.executable).with_name("mkdocs")


def test_configuration_reference_is_generated_from_the_settings_and_the_flags() -> None:
    out = subprocess.run([sys.executable, "-m", "airflow_outpost.worker.cli.reference", "--check",
                          str(DOCS / "reference" / "configuration.md")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_reference_check_fails_on_drift(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text((DOCS / "reference" / "configuration.md").read_text().replace("`--concurrency`", "`--slots`"))
    out = subprocess.run([sys.executable, "-m", "airflow_outpost.worker.cli.reference", "--check", str(stale)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "out of date" in out.stderr


def test_site_builds_strictly(tmp_path: Path) -> None:
    assert MKDOCS.exists(), "mkdocs is not installed (the dev extra installs it)"
    out = subprocess.run([str(MKDOCS), "build", "--strict", "-f", str(REPO / "docs" / "mkdocs.yml"), "--site-dir",
                          str(tmp_path / "site")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WARNING" not in out.stderr, out.stderr
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()


def test_readme_is_a_short_front_page_whose_links_exist() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    assert "make demo" in readme and "make test" in readme
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links
    for link in links:
        if not link.startswith("http"):
            assert (REPO / link).exists(), link
    # Every page of the site is on the front page's map.
    for page in DOCS.rglob("*.md"):
        if page.name != "index.md":
            assert f"docs/pages/{page.relative_to(DOCS).as_posix()}" in readme, page
