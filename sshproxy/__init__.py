"""sshproxy: the SSH proxy (asyncssh) — routing by username, auth, upstream login, session bridge.

``server.py`` (listener, per-connection auth and routing), ``auth.py``, ``upstream.py``
(upstream login and pinned host keys), ``hostkeys.py`` (proxy keys made by ``edge init``),
``bridge.py`` (channels relayed to the upstream), ``tuning.py`` (algorithms both legs use).
"""
