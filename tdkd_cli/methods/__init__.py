"""The distillation methods: loss formulas (``losses``, ``method_losses``), loss terms as data
(``loss_terms``), the method registry that recipes name (``registry``) and the plug-ins that add to
it (``plugins``), contrastive distillation with its memory banks (``contrastive``), connectors
between features of different layouts (``connectors``), forward hooks that read intermediate
features (``features``), and the training schemes that are not "one student, one fixed teacher"
(``schemes``: DML, ONE, Theseus).

May import: ``tdkd_cli.io``, ``tdkd_cli.tensor``, ``tdkd_cli.core``.
"""
