"""hosting edge: the core every proxy stands on (directory, relay, limits, process model).

Nothing in this package imports ``sshproxy``, ``ftpproxy`` or ``httpproxy``; the proxies are
found at run time through :mod:`edge.registry`.
"""

__version__ = "0.1.0"
