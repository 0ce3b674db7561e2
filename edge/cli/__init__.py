"""The ``edge`` command line (operator-facing). Entry point: :func:`edge.cli.main.main`."""
