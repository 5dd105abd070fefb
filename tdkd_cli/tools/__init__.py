"""The tools around training: decompose / merge / eval / bench as library calls (``ops``), latency
measurement (``bench``), ONNX export (``export``) and figures of runs (``runs``, ``report``,
``report_figures``).

May import: ``tdkd_cli.engine`` and everything below it.
"""
