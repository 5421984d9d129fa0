"""The ``outpost`` command line: ``worker``, ``status``, ``demo``, ``egress`` and ``bench``.

:mod:`.main` builds the parser and installs the signal handlers (the only place that does);
:mod:`.egress`, :mod:`.bench` and :mod:`.demo` hold their subcommands.
"""
