"""effx's local lm-evaluation-harness tasks (point lm-eval at this directory with ``--include_path``).

They build their documents from data that effx already reads offline, so they run where the hub is out of
reach: the ACLSum papers of the ``aclsum`` wheel and the help pages that ship with Python
(``pydoc_data``). See ``docs/lm-eval.md``.
"""
