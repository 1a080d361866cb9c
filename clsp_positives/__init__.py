"""CLSP positives: synthetic positives for contrastive learning, served on demand.

The sub-packages live in the top-level folders ``proto/``, ``service/`` and
``trainer/`` and are mapped here by pyproject.toml; always import them through
``clsp_positives``.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    """``Client`` and ``AsyncClient`` on first use: importing the package stays cheap
    and needs no httpx (the service image has none)."""
    if name in ("Client", "AsyncClient"):
        from clsp_positives import client

        return getattr(client, name)
    raise AttributeError(f"module 'clsp_positives' has no attribute {name!r}")
