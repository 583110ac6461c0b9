"""The scorer registry: which image-quality models the pipeline can run, and how each is put together.

A scorer is declared by a ``SCORER = ScorerSpec(...)`` constant in its own module in this package
(``pipeline/scorers/<name>.py``); the registry finds those modules itself, so adding a scorer means adding that
module, its model (``pipeline/models/``), its preprocessing, and their tests, and nothing else. A spec names its
parts by ``"module:attribute"`` references, resolved when used: declaring a scorer loads neither torch nor the
model, so every command's ``--help`` lists the scorers and their options at once.

What a spec names:

* ``builder``: the architecture with random weights (``weights=None`` style; nothing is ever downloaded);
* ``filter_fn``: the checkpoint remapping applied before the strict load;
* ``preprocessing``: ``(bytes, PreprocessConfig, **options) -> prepared item``, the CPU-side work done in Ray
  tasks before the GPU actors;
* ``runner``: the class that loads weights and scores prepared items (one per actor);
* ``options``: which of the model-specific options (``SCORER_OPTIONS``: ``--crops``, ``--encoder``, ...) it uses;
* ``output_scale``: what the raw score means, recorded in every run summary.

The code that reads the options declares them too (the ``uses_options`` attribute of the runner class and of the
preprocessing function, which receives them as keyword arguments); a test holds the two declarations equal. An
option a scorer does not use is refused when set (``check_options``), never silently ignored: a run that asked
for 40 crops of a model that takes none would otherwise be recorded as if the request had been honoured.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class ScorerOption:
    """A setting that only some scorers use.

    Attributes:
        name: The field of ``JobConfig`` (and ``ScorerConfig.options()``) that holds it; the flag is its
            dashed form.
        default: The value when it is not set; setting any other value for a scorer that does not use the
            option is an error.
        in_model_id: The ``model_id`` already names its effect (the depth weights, encoder and version), so the
            job's run key need not; the other options change rows without changing ``model_id`` and enter the
            run key.
        choices: The values the flag accepts, where it is a choice.
        keyed_at_default: Whether the run key holds the option at its default value too; False for options added
            after runs were keyed without them, so that those runs resume.
        names_model: Set away from its default, the option makes other scores than the published inference
            (another crop count, depth input, orientation, loader or latent), so ``model_id`` names it
            (``model_id_options``): the incremental skip and "latest per image" key on ``model_id``, and a night
            run with a corrected setting must score again, not keep the scores of the old one. The speed options
            (``--draft-decode``, ``--decode``, like ``--precision``) approximate the same scores and do not.
    """

    name: str
    default: object
    in_model_id: bool = False
    choices: tuple[str, ...] = ()
    keyed_at_default: bool = True
    names_model: bool = False

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--depth-input-size``."""
        return "--" + self.name.replace("_", "-")


# Defaults are PreprocessConfig's and JobConfig's, the choices Depth Anything's and DPAM's presets (tests hold them
# equal).
SCORER_OPTIONS: dict[str, ScorerOption] = {option.name: option for option in (
    ScorerOption("depth_weights", None, in_model_id=True),
    ScorerOption("encoder", "auto", in_model_id=True, choices=("auto", "vits", "vitb", "vitl")),
    ScorerOption("depth_version", "v1", in_model_id=True, choices=("v1", "v2")),
    ScorerOption("crops", 20, names_model=True),
    ScorerOption("depth_input_size", 518, names_model=True),
    ScorerOption("draft_decode", False),
    ScorerOption("exif_transpose", False, names_model=True),
    ScorerOption("decode", "cpu", choices=("cpu", "gpu"), keyed_at_default=False),
    ScorerOption("trained_on", "livec", choices=("livec", "koniq10k", "spaq", "kadid10k", "tid2013", "csiq"),
                 keyed_at_default=False, names_model=True),
    ScorerOption("prompt_embeddings", None, in_model_id=True),
    ScorerOption("clip_text", None, in_model_id=True),
    ScorerOption("latent", "sample", choices=("sample", "mean"), keyed_at_default=False, names_model=True),
)}

PRECISIONS = ("fp32", "bf16", "fp16")
"""Model arithmetic every scorer offers: fp32 (the published numbers) or bf16/fp16 autocast."""

DEVICES = ("auto", "cpu", "cuda")
"""Where a scorer runs; auto picks CUDA when there is one."""


@dataclass(frozen=True)
class ScorerSpec:
    """One scorer's declaration.

    Attributes:
        name: What ``--model`` takes and ``model_id`` starts with.
        title: The model's name in messages (``DGIQA``).
        summary: One line for ``--help``.
        builder: ``module:function`` building the network with random weights.
        filter_fn: ``module:function`` remapping checkpoint keys to the network's.
        preprocessing: ``module:function`` from image bytes and a ``PreprocessConfig`` to a prepared item.
        runner: ``module:Class`` taking a ``ScorerConfig``: loads the weights, scores prepared items.
        options: Names of the ``SCORER_OPTIONS`` it uses.
        output_scale: What the score means (range, direction, the scale it was trained on).
        backbone: Written to the output's ``encoder`` column when the scorer has no depth model.
        to_tensor: ``module:function`` from a batch of prepared uint8 arrays to the network's input tensor,
            for single-pass scorers.
        needs_depth: Whether ``--depth-weights`` is required.
        needs_one_of: Options of which exactly one must be set (DP-IQA's two sources of prompt features).
        requires: Packages of an optional extra that the scorer imports.
        extra: The extra that installs them (``pip install 'dgiqa-pipeline[<extra>]'``).
        trainer: ``module:function`` running ``dgiqa train --model <name>`` from its parsed arguments (returns
            the exit code); empty for a scorer that does not train here.
    """

    name: str
    title: str
    summary: str
    builder: str
    filter_fn: str
    preprocessing: str
    runner: str
    options: frozenset[str]
    output_scale: str
    backbone: str = ""
    to_tensor: str = ""
    needs_depth: bool = False
    needs_one_of: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    extra: str = ""
    trainer: str = ""

    def __post_init__(self):
        # A typo would otherwise make the option look unused and refuse it.
        unknown = (self.options | set(self.needs_one_of)) - SCORER_OPTIONS.keys()
        if unknown:
            raise RuntimeError(f"scorer {self.name!r} declares unknown options {sorted(unknown)}")

    def check_installed(self) -> None:
        """Raise ``ValueError`` (one line: the install command) when a package the scorer needs is missing."""
        missing = [name for name in self.requires if not _installed(name)]
        if missing:
            raise ValueError(f"--model {self.name} needs {' and '.join(missing)}, which are not installed here: "
                             f"pip install 'dgiqa-pipeline[{self.extra}]'")

    @property
    def preprocessing_options(self) -> frozenset[str]:
        """The options its preprocessing function takes as keyword arguments."""
        return frozenset(getattr(resolve(self.preprocessing), "uses_options", ()))


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ImportError:  # an import hook that refuses the package
        return False


def resolve(reference: str):
    """The object a ``module:attribute`` reference names."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@cache
def _specs() -> dict[str, ScorerSpec]:
    import pipeline.scorers as package

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


def check_options(model: str, given: Iterable[str]) -> None:
    """Refuse options that were set but that ``model`` does not use.

    Args:
        model: A registered scorer name.
        given: Names of ``SCORER_OPTIONS`` the user set (on the command line, or to a value other than the
            default in a config).

    Raises:
        ValueError: One line naming the first such option, the model and the options the model does take.
    """
    given = sorted(given, key=list(SCORER_OPTIONS).index)
    used = get_scorer(model).options if given else frozenset()
    for name in given:
        if name not in used:
            own = [option.flag for option in SCORER_OPTIONS.values() if option.name in used]
            takes = f"its own options are {', '.join(own)}" if own else "it has no model-specific options"
            raise ValueError(f"{SCORER_OPTIONS[name].flag} is not used by --model {model} ({takes})")


def changed_options(values: Mapping[str, object]) -> list[str]:
    """The names among ``values`` (option name -> value) whose value is not the option's default."""
    return [name for name, value in values.items() if value != SCORER_OPTIONS[name].default]


def model_id_options(model: str, values: Mapping[str, object]) -> str:
    """The ``model_id`` suffix of the score-changing options ``model`` uses and ``values`` sets away from default.

    ``crops=5,depth-input-size=700`` (flag names, in the registry's order), or empty at the defaults: every
    output written at the defaults keeps the ``model_id`` it had before options were named in it.
    """
    used = get_scorer(model).options
    named = [(option.flag[2:], values[name]) for name, option in SCORER_OPTIONS.items()
             if option.names_model and name in used and values[name] != option.default]
    return ",".join(f"{flag}={str(value).lower() if isinstance(value, bool) else value}" for flag, value in named)


def resolve_options(model: str, given: Mapping[str, object]) -> dict[str, object]:
    """Check the options a command line set and fill in the defaults of the others.

    Command lines give model-specific options a default of ``None``, so that an option given explicitly, even at
    its default value, is told apart from one left out, and refused when ``model`` does not use it.

    Args:
        model: A registered scorer name.
        given: Option name -> parsed value, ``None`` where the option was not given; names the command does
            not offer may be left out.

    Returns:
        Every option of ``SCORER_OPTIONS`` with its value.

    Raises:
        ValueError: An option ``model`` does not use was given (see ``check_options``).
    """
    check_options(model, [name for name, value in given.items() if value is not None])
    return {name: option.default if given.get(name) is None else given[name]
            for name, option in SCORER_OPTIONS.items()}


def trainable_scorers() -> tuple[str, ...]:
    """The scorers ``dgiqa train`` can train: those whose spec names a trainer."""
    return tuple(name for name, spec in _specs().items() if spec.trainer)


def summaries() -> str:
    """One line per scorer, ``name: summary``, for help texts."""
    return "; ".join(f"{name}: {spec.summary}" for name, spec in _specs().items())


def used_by(name: str) -> str:
    """The scorers that use an option, for help texts: ``dgiqa only`` or ``dgiqa, dpiqa-student``."""
    users = [model for model, spec in _specs().items() if name in spec.options]
    return f"{users[0]} only" if len(users) == 1 else ", ".join(users)
