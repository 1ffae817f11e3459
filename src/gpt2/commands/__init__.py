"""Subcommands of the ``gpt2`` command line, one module each (see `gpt2.cli`)."""
