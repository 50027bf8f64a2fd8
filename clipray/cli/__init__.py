"""The ``clipray`` command line (``clipray.cli.main:main``): one thin module per command family."""
