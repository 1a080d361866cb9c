"""CLSP positives: synthetic positives for contrastive learning, served on demand.

The sub-packages live in the top-level folders ``proto/``, ``service/`` and
``trainer/`` and are mapped here by pyproject.toml; always import them through
``clsp_positives``.
"""

__version__ = "0.1.0"
