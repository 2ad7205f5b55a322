"""The `moekit` command line: one module per command (`add_parser` declares its flags, `run`
calls the library and prints), `common` for what commands share and `format` for how they
print. The only package that imports argparse or builds rich tables."""

from moekit.cli.commands import main

__all__ = ["main"]
