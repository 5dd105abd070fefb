"""Models, checkpoints and data: loading and saving them, their formats.

``checkpoint`` (the on-disk format: manifests, safetensors checks, atomic writes, write failures
as one-line errors), ``caches`` (derived data under $TDKD_CACHE, checked before use), ``models``
(presets, Hugging Face and timm models, tokenizers, probe inputs), ``model_files`` (tdkd
checkpoints as models), ``layers`` (a model's layer stack: counting, cutting, pairing with a
teacher's), ``data`` and ``hf_data`` (task files, image folders, built-in sets, Hugging Face
datasets), ``pair`` (a run's teacher and student: loaded, checked, cut, over-parameterized, aligned).

May import: ``tdkd_cli.tensor``, ``tdkd_cli.core``.
"""
