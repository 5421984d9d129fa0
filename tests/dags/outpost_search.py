"""The shipped example DAG outpost_search (airflow DAG file; the README's DAG-author example), for the tests.

Compiled here under this file's name, like outpost_rag_pipeline.py: the worker refuses DAG files
that resolve outside its DAGs folder.
"""
from pathlib import Path

_EXAMPLE = Path(__file__).resolve().parents[2] / "worker" / "src" / "airflow_outpost" / "worker" / "example_dags" / "outpost_search.py"
exec(compile(_EXAMPLE.read_text(encoding="utf-8"), __file__, "exec"))
