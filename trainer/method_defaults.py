"""Each contrastive method's own defaults, in a table that imports no torch.

``TrainConfig`` reads it to resolve, and to show in ``--help``, every option
whose ``None`` means "the method's" (``clsp --help`` must stay torch-free,
docs/design.md §8); ``methods.py`` registers one class per row in ``METHODS``,
and each class carries its row as its ``defaults``. The names ``--method``
accepts are this table's keys, so a new method is a row here and a registered
class in ``methods.py`` (docs/design.md §1).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple


class MethodDefaults(NamedTuple):
    """A method's own defaults of the options whose ``None`` means "the method's"."""

    temperature: float
    proj_hidden_dim: int
    proj_dim: int
    queue_size: int | None  # None: the method keeps no queue

    def with_given(self, **given: Any) -> MethodDefaults:
        """These defaults with each value given (not None) in its place: the one
        rule by which ``TrainConfig`` and ``MethodConfig`` resolve them."""
        return self._replace(**{name: value for name, value in given.items() if value is not None})


METHOD_DEFAULTS: dict[str, MethodDefaults] = {
    # The CLSP authors' CIFAR configs for SimCLR and MoCo, solo-learn's CIFAR config
    # for NNCLR (docs/training.md, "Defaults and the authors' configs").
    "simclr": MethodDefaults(temperature=0.2, proj_hidden_dim=4096, proj_dim=256, queue_size=None),
    "moco": MethodDefaults(temperature=0.2, proj_hidden_dim=4096, proj_dim=256, queue_size=32768),
    "nnclr": MethodDefaults(temperature=0.2, proj_hidden_dim=2048, proj_dim=256, queue_size=65536),
}
# How ``--help`` and docs/cli.md name each method (its class's name in methods.py).
METHOD_TITLES: dict[str, str] = {"simclr": "SimCLR", "moco": "MoCo", "nnclr": "NNCLR"}

# The names ``--method`` accepts: the table's keys, in its order.
MethodName = Literal[tuple(METHOD_DEFAULTS)]  # type: ignore[valid-type]
