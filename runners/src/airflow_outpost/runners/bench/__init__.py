"""``outpost bench``: the runners measured on this machine, each figure a ratio against a same-run baseline.

:mod:`.run` measures; :mod:`.report` writes ``report.md``, ``report.json`` and PNG charts.
"""
