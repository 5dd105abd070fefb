"""Pure tensor math of over-parameterized students: MPO decomposition and contraction (``mpo``),
MPO cores as a parametrization of a Linear's or Conv2d's weight and the merge back (``tensorize``),
factor shapes planned against a teacher and the OPDF tensor constraint (``constraint``).

May import: ``tdkd_cli.core``. Knows nothing of model families, files, recipes or training.
"""
