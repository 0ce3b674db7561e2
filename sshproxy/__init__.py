"""sshproxy: not built yet — see the issue tracker. The core (edge/) runs without it."""
