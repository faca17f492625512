"""What each nemoq command does, as library functions: options (small dataclasses) in, results out.

`nemoq/cli.py` parses the command line into these options, calls one function here and renders
what comes back. Nothing here prints: messages and progress go through hooks the caller hands
in, so every command can be run and tested without the CLI.
"""
