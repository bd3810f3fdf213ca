"""The built-in ``local`` provider: the embedded default, everything on one machine."""
