"""The scorer registry: which image-quality models the pipeline can run, and how each is put together.

A scorer is declared by a ``SCORER = ScorerSpec(...)`` constant in its own module under ``pipeline/models/``;
the registry finds those modules itself, so adding a scorer means adding its model module (with the spec),
its preprocessing, and their tests, and nothing else. A spec names its parts by ``"module:attribute"``
references, resolved when used, so a spec can name pipeline code (its preprocessing, its runner) without the
model module importing the pipeline.

What a spec names:

* ``builder``: the architecture with random weights (``weights=None`` style; nothing is ever downloaded);
* ``filter_fn``: the checkpoint remapping applied before the strict load;
* ``preprocessing``: ``(bytes, PreprocessConfig) -> prepared item``, the CPU-side work done in Ray tasks
  before the GPU actors;
* ``runner``: the class that loads weights and scores prepared items (one per actor);
* ``output_scale``: what the raw score means, recorded in every run summary.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class ScorerSpec:
    """One scorer's declaration.

    Attributes:
        name: What ``--model`` takes and ``model_id`` starts with.
        summary: One line for ``--help``.
        builder: ``module:function`` building the network with random weights.
        filter_fn: ``module:function`` remapping checkpoint keys to the network's.
        preprocessing: ``module:function`` from image bytes and a ``PreprocessConfig`` to a prepared item.
        runner: ``module:Class`` taking a ``ScorerConfig``: loads the weights, scores prepared items.
        output_scale: What the score means (range, direction, the scale it was trained on).
        backbone: Written to the output's ``encoder`` column when the scorer has no depth model.
        to_tensor: ``module:function`` from a batch of prepared uint8 arrays to the network's input tensor,
            for single-pass scorers.
        needs_depth: Whether ``--depth-weights`` is required.
    """

    name: str
    summary: str
    builder: str
    filter_fn: str
    preprocessing: str
    runner: str
    output_scale: str
    backbone: str = ""
    to_tensor: str = ""
    needs_depth: bool = False


def resolve(reference: str):
    """The object a ``module:attribute`` reference names."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@cache
def _specs() -> dict[str, ScorerSpec]:
    import pipeline.models as package

    found: dict[str, ScorerSpec] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name == "registry":
            continue
        spec = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "SCORER", None)
        if isinstance(spec, ScorerSpec):
            if spec.name in found:
                raise RuntimeError(f"two scorers are named {spec.name!r}")
            found[spec.name] = spec
    return dict(sorted(found.items(), key=lambda item: (item[0] != "dgiqa", item[0])))  # the default first


def scorer_names() -> tuple[str, ...]:
    """Registered scorer names, DGIQA (the default) first."""
    return tuple(_specs())


def get_scorer(name: str) -> ScorerSpec:
    """The spec of a registered scorer.

    Raises:
        ValueError: No scorer has that name (the message lists the ones there are).
    """
    specs = _specs()
    if name not in specs:
        raise ValueError(f"unknown model {name!r}; models are {', '.join(specs)}")
    return specs[name]
