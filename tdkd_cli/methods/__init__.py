"""The distillation methods: loss formulas (``losses``, ``method_losses``), loss terms as data
(``loss_terms``), the method registry that recipes and plug-ins name (``registry``), forward hooks
that read intermediate features (``features``), and the training schemes that are not "one student,
one fixed teacher" (``schemes``: DML, ONE, Theseus).

May import: ``tdkd_cli.io``, ``tdkd_cli.tensor``, ``tdkd_cli.core``.
"""
