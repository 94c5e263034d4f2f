"""The operators' console: one module per noun, each adding its subcommands to the parser.

cli.py is the thin entry that assembles them and turns errors into exit codes; every module here
reads its settings from the Env that cli.py read once.
"""
