"""Generate the values table of airflow-outpost/README.md from values.yaml's ``# --`` comments.

    python images/helm/values_table.py          # rewrite the table in README.md
    python images/helm/values_table.py --check  # exit 1 if README.md is out of date (the tests run this)

A key's description is the ``# -- text`` comment right above it (continued by plain ``#`` lines);
a key with a description is one row, with its default as YAML flow text. Keys without one are
tables whose children are documented.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "airflow-outpost"
BEGIN, END = "<!-- values-table:begin -->", "<!-- values-table:end -->"


def rows(values_text: str) -> list[tuple[str, str, str]]:
    data = yaml.safe_load(values_text) or {}
    out: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in values_text.splitlines():
        comment = re.match(r"^\s*# -- ?(.*)$", line)
        if comment:
            pending = [comment.group(1)]
            continue
        if pending and re.match(r"^\s*#\s?(.*)$", line) and not line.strip().startswith("# --"):
            pending.append(re.sub(r"^\s*#\s?", "", line))
            continue
        key = re.match(r"^(\s*)([A-Za-z0-9_.-]+):", line)
        if not key:
            if not line.strip():
                pending = [] if not pending else pending
            continue
        indent = len(key.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key.group(2)))
        if pending:
            path = ".".join(k for _, k in stack)
            out.append((path, _default(data, path), " ".join(pending).strip()))
            pending = []
    return out


def _default(data: Any, path: str) -> str:
    node = data
    for part in path.split("."):
        node = node[part]
    text = yaml.safe_dump(node, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def table(values_text: str) -> str:
    lines = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for key, default, desc in rows(values_text):
        cells = [c.replace("|", "\\|") for c in (default, desc)]
        lines.append(f"| `{key}` | `{cells[0]}` | {cells[1]} |")
    return "\n".join(lines)


def render_readme(readme: str, values_text: str) -> str:
    head, sep, rest = readme.partition(BEGIN)
    if not sep or END not in rest:
        raise SystemExit(f"README.md needs the markers {BEGIN} and {END}")
    return f"{head}{BEGIN}\n{table(values_text)}\n{END}{rest.partition(END)[2]}"


def main(argv: list[str]) -> int:
    readme_path = CHART / "README.md"
    wanted = render_readme(readme_path.read_text(), (CHART / "values.yaml").read_text())
    if "--check" in argv:
        if readme_path.read_text() != wanted:
            print("images/helm/airflow-outpost/README.md: values table out of date; run "
                  "python images/helm/values_table.py", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
