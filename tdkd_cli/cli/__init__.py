"""The command line: the Typer app (``app``) and everything it prints (``render``).

May import: every other subpackage. Nothing imports it. Importing ``cli.app`` must not import
torch: each command imports what it runs when it runs (``tdkd --help`` stays instant).
"""
