"""The training engine: a run's setup (``train``), the loop (``loop``), the run directory and its
checkpoints (``run_dir``), the optimizer and schedule (``optim``), precision, the teacher-output
cache, distributed training, the batches of a run (``training_data``) and evaluation on a split
(``evaluate``).

May import: ``tdkd_cli.methods``, ``tdkd_cli.io``, ``tdkd_cli.tensor``, ``tdkd_cli.core``.
"""
