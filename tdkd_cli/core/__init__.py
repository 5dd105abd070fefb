"""The ground floor: tdkd's error types, the typed recipe (every setting of a run), the version
and the reporter interface the engine talks through.

May import: nothing of tdkd (only the standard library and PyYAML). Everything else may import it.
"""
