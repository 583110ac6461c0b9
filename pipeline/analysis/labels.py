"""Human opinion scores of public IQA datasets (and of your own), as ``uri`` -> ``label`` tables.

Each reader returns ``Labels``: a pyarrow table with ``uri`` (string) and ``label`` (float64) in the file's
order, and whether higher labels mean better quality. A ``uri`` is the dataset's image name joined onto the
images prefix you give (``s3://bucket/koniq/1024x768/``, ``/data/koniq/1024x768``) with exactly one ``/``,
so it names the same object the scoring job read. Label files are read through fsspec, so they may be on S3.

Layouts:

* ``koniq``: KonIQ-10k ``koniq10k_scores_and_distributions.csv`` (``image_name``, ``c1``..``c5``,
  ``c_total``, ``MOS``, ``SD``, ``MOS_zscore``). Default label ``MOS_zscore`` (0-100), or ``MOS`` (1-5).
* ``kadid``: KADID-10k ``dmos.csv`` (``dist_img``, ``ref_img``, ``dmos``, ``var``). Despite its name, the
  ``dmos`` column is a mean 1-5 rating of the distorted image where higher means *better* quality, so the
  labels are higher-is-better like MOS.
* ``live-challenge``: LIVE In the Wild Image Quality Challenge: ``Data/AllImages_release.mat`` (cell array
  ``AllImages_release`` of names) and ``Data/AllMOS_release.mat`` (``AllMOS_release``, MOS 0-100). Give the
  dataset folder, its ``Data`` folder or either ``.mat`` file. The first 7 images (``t1.bmp``..``t7.bmp``)
  are the customary training images and are dropped unless asked; images default to the dataset's
  ``Images/`` folder.
* ``spaq``: SPAQ ``MOS and Image attribute scores.xlsx`` (``Image name``, ``MOS``, attribute columns), or the
  same table saved as CSV. MOS 0-100.
* ``generic``: a CSV, Parquet or JSON Lines file with a uri column (default ``uri``) and a label column
  (default ``mos``); higher is better unless ``lower_is_better``. Relative URIs are joined onto the images
  prefix when one is given.

Where images may be read from: a label file is data, and may name any URI (``file:///etc/passwd``, another
bucket, the metadata service), so ``dgiqa train`` and ``dgiqa evaluate`` read every image through an allowlist
that never comes from the label file's rows: ``--allow-prefix`` if given, else ``default_allow_prefixes`` (the
images prefix, else the label file's own folder). Names are joined as they are (``join_uri`` resolves nothing),
so ``../../etc/passwd`` after an images prefix keeps its ``..`` and the allowlist refuses it.

Groups: images that show the same scene must not be split between training and held-out sets, or the held-out
score measures remembered scenes. ``Labels.groups`` names each row's group for ``dgiqa train``'s split: the
``generic`` layout's optional ``group`` column (any text; an empty cell makes the row a group of its own) and
KADID-10k's ``ref_img`` (the 125 distorted versions of one reference are one scene). The other public layouts
hold one image per scene, so each row is its own group (``groups`` is None).
"""

from __future__ import annotations

import io
import math
import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.analysis.label_layouts import (
    DEFAULT_LABEL_COLUMN,
    GROUP_COLUMN,
    LAYOUTS,
    LIVE_MOS,
    LIVE_NAMES,
    LIVE_TRAINING_IMAGES,
    NAME_COLUMN,
)
from pipeline.batch.allowlist import redact_text, redact_uri

LABELS_SCHEMA = pa.schema([pa.field("uri", pa.string(), nullable=False),
                           pa.field("label", pa.float64(), nullable=False)])


class LabelError(ValueError):
    """A label file cannot be used (missing, empty, a column missing, a label not a number); the message says why."""


@dataclass(frozen=True)
class Labels:
    """Opinion scores of one dataset.

    Attributes:
        table: ``uri`` (string) and ``label`` (float64), in the file's order, URIs unique.
        higher_is_better: True for MOS-like labels, False for DMOS-like ones.
        source: The label file (or dataset folder) as given.
        layout: One of ``LAYOUTS``.
        label_column: The column (or MATLAB variable) the labels came from.
        groups: Each row's group (scene), in the table's order, for splits that keep a scene on one side;
            None (or a None entry) when each row is its own group.
        images_prefix: The prefix image names were joined onto (``--images-prefix``, or live-challenge's
            ``Images/`` folder); None when the names were used as written.
    """

    table: pa.Table
    higher_is_better: bool
    source: str
    layout: str
    label_column: str
    groups: tuple[str | None, ...] | None = None
    images_prefix: str | None = None

    def __len__(self) -> int:
        return self.table.num_rows


def join_uri(prefix: str, name: str) -> str:
    """``prefix`` and ``name`` joined with exactly one ``/``, nothing else resolved or re-encoded."""
    return prefix.rstrip("/") + "/" + name.lstrip("/")


def _is_absolute(uri: str) -> bool:
    return "://" in uri or uri.startswith("/")


def absolute_uri(uri: str) -> str:
    """A relative local path joined onto the working folder, nothing resolved (``..`` stays for the allowlist)."""
    return uri if _is_absolute(uri) else join_uri(os.getcwd(), uri)


def default_allow_prefixes(labels: Labels) -> tuple[str, ...]:
    """Where the images of ``labels`` may be read from when no ``--allow-prefix`` is given.

    The images prefix the names were joined onto, else the label file's own folder (or bucket): what the user
    named on the command line, never a URI taken from the file's rows, which could otherwise allow themselves.
    """
    if labels.images_prefix:
        return (labels.images_prefix,)
    source = labels.source.rstrip("/")
    if "://" in source:
        return (posixpath.dirname(source) + "/",)
    return (os.path.dirname(os.path.abspath(source)),)


def _read_bytes(path: str, storage_options: Mapping | None) -> bytes:
    try:
        with fsspec.open(path, "rb", compression="infer", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise LabelError(f"no label file at {redact_uri(path)}") from None
    except IsADirectoryError:
        raise LabelError(f"{redact_uri(path)} is a folder, not a label file") from None
    except OSError as exc:
        raise LabelError(f"cannot read label file {redact_uri(path)}: {redact_text(str(exc))}") from None
    if not data.strip():
        raise LabelError(f"label file {redact_uri(path)} is empty")
    return data


def _table_kind(path: str) -> str:
    name = path.lower().split("?")[0].removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith((".xlsx", ".xlsm", ".xls")):
        return "excel"
    return "csv"


def _read_frame(path: str, storage_options: Mapping | None, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a CSV, Parquet, JSON Lines or Excel table; column names are stripped of surrounding spaces."""
    data = _read_bytes(path, storage_options)
    kind = _table_kind(path)
    try:
        if kind == "parquet":
            frame = pd.read_parquet(io.BytesIO(data))
        elif kind == "jsonl":
            frame = pd.read_json(io.BytesIO(data), lines=True, dtype=False)
        elif kind == "excel":
            frame = _read_excel(data, path)
        else:
            frame = pd.read_csv(io.BytesIO(data), dtype=dict.fromkeys(text_columns, str), skipinitialspace=True)
    except LabelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser's complaint, reported with the file name
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LabelError(f"cannot read label file {path} as {kind}: {message}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise LabelError(f"label file {path} has no rows")
    return frame


def _read_excel(data: bytes, path: str) -> pd.DataFrame:
    """The first sheet holding an ``Image name`` column (SPAQ's), else the first sheet."""
    sheets = pd.read_excel(io.BytesIO(data), sheet_name=None, engine="openpyxl")
    if not sheets:
        raise LabelError(f"label file {path} has no sheets")
    for frame in sheets.values():
        if NAME_COLUMN["spaq"] in [str(c).strip() for c in frame.columns]:
            return frame
    return next(iter(sheets.values()))


def _require(frame: pd.DataFrame, columns: tuple[str, ...], path: str, layout: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LabelError(f"{layout} label file {path} has no column {', '.join(repr(c) for c in missing)} "
                         f"(columns: {', '.join(map(str, frame.columns)) or 'none'})")


def _build(names: list, values: list, describe: Callable[[int], str], path: str, column: str,
           uri_of: Callable[[str], str]) -> pa.Table:
    """The ``uri``/``label`` table, every name and label checked; ``describe(i)`` names row ``i`` in errors."""
    uris, labels, seen = [], [], {}
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        text = "" if name is None or (isinstance(name, float) and math.isnan(name)) else str(name).strip()
        if not text:
            raise LabelError(f"{path}: {describe(i)} has no image name")
        try:
            label = float(value)
        except (TypeError, ValueError):
            label = math.nan
        if not math.isfinite(label):
            shown = "empty" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(value)
            raise LabelError(f"{path}: {describe(i)} (image {text!r}): label in {column!r} is not a number "
                             f"({shown})")
        uri = uri_of(text)
        if uri in seen:
            raise LabelError(f"{path}: {describe(i)}: image {text!r} is labelled twice (also {describe(seen[uri])})")
        seen[uri] = i
        uris.append(uri)
        labels.append(label)
    return pa.table([pa.array(uris, pa.string()), pa.array(labels, pa.float64())], schema=LABELS_SCHEMA)


def _groups(frame: pd.DataFrame, layout: str) -> tuple[str | None, ...] | None:
    """The rows' groups from the layout's group column, if the file has one; empty cells give None."""
    column = GROUP_COLUMN.get(layout)
    if column not in frame.columns:
        return None
    return tuple(None if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()
                 else str(value).strip() for value in frame[column].tolist())


def _line(i: int) -> str:
    return f"line {i + 2}"  # header on line 1


def _row(i: int) -> str:
    return f"row {i + 1}"


def _sheet_row(i: int) -> str:
    return f"sheet row {i + 2}"  # header on row 1


def _prefix_join(images_prefix: str | None, layout: str) -> Callable[[str], str]:
    if not images_prefix:
        raise LabelError(f"the {layout} layout needs an images prefix (--images-prefix): the folder or URI prefix "
                         "holding the dataset's images")
    return lambda name: join_uri(images_prefix, name)


def _named_table(path: str, layout: str, label_column: str | None, images_prefix: str | None,
                 storage_options: Mapping | None) -> Labels:
    """KonIQ-10k, KADID-10k and SPAQ: a table of image names and label columns."""
    column = label_column or DEFAULT_LABEL_COLUMN[layout]
    name_column = NAME_COLUMN[layout]
    uri_of = _prefix_join(images_prefix, layout)
    frame = _read_frame(path, storage_options, text_columns=(name_column, GROUP_COLUMN.get(layout, name_column)))
    _require(frame, (name_column, column), path, layout)
    describe = _sheet_row if _table_kind(path) == "excel" else _line
    table = _build(frame[name_column].tolist(), frame[column].tolist(), describe, path, column, uri_of)
    return Labels(table, True, path, layout, column, _groups(frame, layout), images_prefix)


def read_koniq(path: str, images_prefix: str, label_column: str = "MOS_zscore",
               storage_options: Mapping | None = None) -> Labels:
    """KonIQ-10k's ``koniq10k_scores_and_distributions.csv``; ``MOS_zscore`` (0-100) or ``MOS`` (1-5)."""
    return _named_table(path, "koniq", label_column, images_prefix, storage_options)


def read_kadid(path: str, images_prefix: str, label_column: str = "dmos",
               storage_options: Mapping | None = None) -> Labels:
    """KADID-10k's ``dmos.csv``: one row per distorted image (``dist_img``).

    Its ``dmos`` is a 1-5 mean rating where higher means better quality (not a difference score), so the
    labels are higher-is-better.
    """
    return _named_table(path, "kadid", label_column, images_prefix, storage_options)


def read_spaq(path: str, images_prefix: str, label_column: str = "MOS",
              storage_options: Mapping | None = None) -> Labels:
    """SPAQ's ``MOS and Image attribute scores.xlsx`` (or the table saved as CSV): ``Image name`` and ``MOS``.

    ``label_column`` may name one of the attribute columns (``Brightness``, ``Sharpness``, ...) instead.
    """
    return _named_table(path, "spaq", label_column, images_prefix, storage_options)


def read_generic(path: str, images_prefix: str | None = None, uri_column: str = "uri", label_column: str = "mos",
                 lower_is_better: bool = False, storage_options: Mapping | None = None) -> Labels:
    """Your own CSV, Parquet or JSON Lines labels: a uri column, a numeric label column and optionally ``group``.

    Args:
        path: The label file.
        images_prefix: Joined onto relative URIs (absolute ones, ``/...`` or ``scheme://...``, are kept).
        uri_column: Column holding the image URIs or names.
        label_column: Column holding the opinion scores.
        lower_is_better: The labels are DMOS-like.
        storage_options: fsspec options for reading the file.
    """
    frame = _read_frame(path, storage_options, text_columns=(uri_column, GROUP_COLUMN["generic"]))
    _require(frame, (uri_column, label_column), path, "generic")

    def uri_of(name: str) -> str:
        return name if _is_absolute(name) or not images_prefix else join_uri(images_prefix, name)

    describe = _line if _table_kind(path) == "csv" else _row
    table = _build(frame[uri_column].tolist(), frame[label_column].tolist(), describe, path, label_column, uri_of)
    return Labels(table, not lower_is_better, path, "generic", label_column, _groups(frame, "generic"),
                  images_prefix or None)


def _mat_variable(data: bytes, name: str, path: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        variables = loadmat(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - scipy raises several types for a file that is not MATLAB's
        raise LabelError(f"cannot read {path} as a MATLAB file: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                         ) from None
    if name not in variables:
        found = [k for k in variables if not k.startswith("__")]
        raise LabelError(f"{path} has no variable {name!r} (variables: {', '.join(found) or 'none'})")
    return np.asarray(variables[name]).ravel()


def _mat_text(value) -> str | None:
    """A MATLAB cell's string: loadmat gives each cell as a small array of one string."""
    while isinstance(value, np.ndarray):
        if value.size == 0:
            return None
        value = value.ravel()[0]
    return None if value is None else str(value)


def _live_files(path: str, storage_options: Mapping | None) -> tuple[str, str]:
    """The ``Data`` folder and the dataset root of a LIVE Challenge path (root, ``Data`` folder or a ``.mat``)."""
    clean = path.rstrip("/")
    if "://" not in clean:
        # A relative local path has no parent in its text ("AllMOS_release.mat" inside Data/): the dataset root
        # is found from the absolute path.
        clean = os.path.abspath(clean)
    if clean.lower().endswith(".mat"):
        data_dir = posixpath.dirname(clean)
    else:
        fs, local = fsspec.core.url_to_fs(clean, **(storage_options or {}))
        nested = posixpath.join(local, "Data", f"{LIVE_MOS}.mat")
        data_dir = join_uri(clean, "Data") if fs.exists(nested) else clean
    return data_dir, posixpath.dirname(data_dir)


def read_live_challenge(path: str, images_prefix: str | None = None, keep_training_images: bool = False,
                        storage_options: Mapping | None = None) -> Labels:
    """LIVE In the Wild Image Quality Challenge labels from its two MATLAB files.

    Args:
        path: The dataset folder (holding ``Data/`` and ``Images/``), its ``Data`` folder, or either ``.mat``.
        images_prefix: Where the images are; default the dataset's ``Images/`` folder.
        keep_training_images: Keep the first 7 images (``t1.bmp``..``t7.bmp``), which are customarily left
            out of evaluation because they were the dataset's training examples.
        storage_options: fsspec options for reading the files.
    """
    data_dir, root = _live_files(path, storage_options)
    names_path, mos_path = join_uri(data_dir, f"{LIVE_NAMES}.mat"), join_uri(data_dir, f"{LIVE_MOS}.mat")
    names = [_mat_text(v) for v in _mat_variable(_read_bytes(names_path, storage_options), LIVE_NAMES, names_path)]
    mos = _mat_variable(_read_bytes(mos_path, storage_options), LIVE_MOS, mos_path)
    if len(names) != len(mos):
        raise LabelError(f"{names_path} names {len(names)} images but {mos_path} has {len(mos)} scores")
    start = 0 if keep_training_images else LIVE_TRAINING_IMAGES
    if len(names) <= start:
        raise LabelError(f"{names_path} names only {len(names)} images, none after the {start} training images")
    prefix = images_prefix or (join_uri(root, "Images") if root else "Images")
    values = [v.item() if isinstance(v, np.generic) else v for v in mos[start:]]
    table = _build(names[start:], values, lambda i: f"entry {start + i + 1}", mos_path, LIVE_MOS,
                   lambda name: join_uri(prefix, name))
    return Labels(table, True, path, "live-challenge", LIVE_MOS, images_prefix=prefix)


def read_labels(path: str, layout: str, images_prefix: str | None = None, *, label_column: str | None = None,
                uri_column: str = "uri", lower_is_better: bool = False, keep_training_images: bool = False,
                storage_options: Mapping | None = None) -> Labels:
    """Read the labels of ``path`` in ``layout`` (see the module docstring for each layout).

    Args:
        path: Label file (or, for ``live-challenge``, the dataset folder), local or any fsspec URI.
        layout: One of ``LAYOUTS``.
        images_prefix: Folder or URI prefix the dataset's image names are joined onto.
        label_column: Another label column than the layout's default (not for ``live-challenge``).
        uri_column: The uri column of a ``generic`` file.
        lower_is_better: ``generic`` labels are DMOS-like; the public layouts know their direction.
        keep_training_images: ``live-challenge``: keep the 7 training images.
        storage_options: fsspec options for reading the files.

    Raises:
        LabelError: Unknown layout, an option the layout does not take, or an unusable file.
    """
    if layout not in LAYOUTS:
        raise LabelError(f"unknown label layout {layout!r}; layouts are {', '.join(LAYOUTS)}")
    if lower_is_better and layout != "generic":
        raise LabelError(f"--lower-is-better applies to the generic layout only; {layout} labels are "
                         "higher-is-better by definition")
    if keep_training_images and layout != "live-challenge":
        raise LabelError("keeping the training images applies to the live-challenge layout only")
    if layout == "live-challenge":
        if label_column:
            raise LabelError(f"the live-challenge layout has one label ({LIVE_MOS}); --label-column does not apply")
        return read_live_challenge(path, images_prefix, keep_training_images, storage_options)
    if layout == "generic":
        return read_generic(path, images_prefix, uri_column, label_column or DEFAULT_LABEL_COLUMN["generic"],
                            lower_is_better, storage_options)
    if uri_column != "uri":
        raise LabelError(f"--uri-column applies to the generic layout only; {layout} names its images in "
                         f"{NAME_COLUMN[layout]!r}")
    return _named_table(path, layout, label_column, images_prefix, storage_options)
