"""The shipped example DAGs outpost_rag_pipeline and outpost_rag_consumer (airflow DAG file), for the tests.

The worker refuses DAG files that resolve outside its DAGs folder (a symlink would), so the
example's source is compiled here under this file's name instead of being copied.
"""
from pathlib import Path

_EXAMPLES = Path(__file__).resolve().parents[2] / "worker" / "src" / "airflow_outpost" / "worker" / "example_dags"
_EXAMPLE = _EXAMPLES / "outpost_rag_pipeline.py"
exec(compile(_EXAMPLE.read_text(encoding="utf-8"), __file__, "exec"))
