"""Training schemes: how a run trains when it is not one student taught by a fixed teacher.

``base`` (the ``Scheme`` interface, module swapping), ``online`` (picks the run's scheme), ``mutual``
(DML peers), ``branches`` (ONE), ``theseus`` (module replacement). Part of ``tdkd_cli.methods``
and bound by its import rule.
"""
