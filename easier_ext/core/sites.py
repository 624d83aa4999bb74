"""The site registry: a converted model's entropy-tracking modules, by qualified name."""

from __future__ import annotations

import difflib

from torch import nn

from easier_ext.core.modules import EntropyActivation

__all__ = ["sites", "site"]


def sites(model: nn.Module) -> dict[str, EntropyActivation]:
    """The entropy-tracking sites of a converted model, in forward-execution order.

    Args:
        model: a model returned by :func:`convert` (or any model holding easier_ext sites).

    Returns:
        ``{name: module}``; names are the modules' qualified names (stable across runs and
        processes), e.g. ``"layer1.0.relu"``, ``"layer1.0.relu_1"``.
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, EntropyActivation)}


def site(model: nn.Module, name: str) -> EntropyActivation:
    """One site by name.

    Raises:
        KeyError: naming the closest known sites when ``name`` is not one.
    """
    found = sites(model)
    if name in found:
        return found[name]
    close = difflib.get_close_matches(name, list(found), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; the model has {len(found)} sites: {', '.join(found) or 'none (call easier_ext.convert first)'}"
    raise KeyError(f"unknown site {name!r}{hint}")
