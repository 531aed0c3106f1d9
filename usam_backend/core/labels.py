"""Label names: how a project's labels are compared with a head's class names."""

from __future__ import annotations


def normalise(name: str) -> str:
    """Case and runs of spaces do not matter: ``" Traffic  Light"`` -> ``"traffic light"``."""
    return " ".join(name.split()).casefold()
