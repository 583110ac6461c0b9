"""Ray Data stages of the scoring job: fetch bytes, decode and prepare, score on an actor pool.

Every stage takes and returns ``pyarrow`` tables with the same rows it was given, in the same order: a row
that fails gets ``status="error"`` and an ``error`` message and is passed on untouched by later stages. No
per-image failure ever raises, because in Ray Data one exception fails the whole dataset.

Columns travelling between stages: ``row_index`` and ``uri`` from the manifest, ``status``/``error``, then
``data`` (encoded bytes) and ``read_retries`` after fetching, then the prepared arrays after decoding, then the
scores. Any other column (the plan's shard, the manifest's ETag, size and extra columns) passes through every
stage as it is, so the rows that come out of the pool are whole output rows and the driver joins nothing back.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.batch.allowlist import Allowlist, RejectedURI, redact_text, redact_uri
from pipeline.batch.objects import ObjectTooLarge, read_object
from pipeline.batch.output import STATUS_ERROR, STATUS_OK, STATUS_REJECTED
from pipeline.limits import DEFAULT_MAX_BYTES
from pipeline.scoring.device_decode import EncodedImage
from pipeline.scoring.preprocess import ImageError
from pipeline.scoring.scorer import ScorerConfig, make_scorer, non_finite, prepare_item
from pipeline.scoring.weights import WeightsError

logger = logging.getLogger(__name__)

PREPARED_COLUMNS = ("prepared", "height", "width")
SCORE_COLUMNS = {
    "row_index": pa.int64(), "status": pa.string(), "error": pa.string(), "score": pa.float32(),
    "score_std": pa.float32(), "num_crops": pa.int32(), "width": pa.int32(), "height": pa.int32(),
}


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"


def read_image_bytes(uri: str, storage_options: Mapping | None = None, *, allowlist: Allowlist,
                     max_bytes: int = DEFAULT_MAX_BYTES, attempts: int = 4) -> bytes:
    """``read_object`` for one image outside the job (CLI, training, report): failures become ``ImageError``.

    Raises:
        RejectedURI: Not allowed (no request was made).
        ImageError: Missing, a folder, over the byte limit or unreadable after the retries, in one line.
    """
    try:
        return read_object(uri, storage_options, allowlist=allowlist, max_bytes=max_bytes, attempts=attempts)
    except FileNotFoundError:
        raise ImageError(f"no such file or object: {redact_uri(uri)}") from None
    except IsADirectoryError:
        raise ImageError(f"{redact_uri(uri)} is a folder, not an image") from None
    except ObjectTooLarge as exc:
        raise ImageError(str(exc)) from None
    except OSError as exc:
        raise ImageError(f"cannot read {redact_uri(uri)}: {redact_text(str(exc))}") from None


def fetch_batch(batch: pa.Table, storage_options: Mapping | None = None, attempts: int = 4, *,
                allowlist: Allowlist, max_bytes: int = DEFAULT_MAX_BYTES) -> pa.Table:
    """Read each row's object into a ``data`` column; a failed read is an error row, a refused one ``rejected``.

    The driver's plan has already refused URIs outside the allowlist; the check is made again here, where a
    local path can be resolved (a symlink leading out of the allowed folders is refused on the worker that
    would follow it). A ``size_bytes`` column (from the manifest) over ``max_bytes`` is refused unread.

    A ``read_retries`` column counts the transient errors each row's read recovered from (retries that ended in
    a successful read); it travels with the row to the driver, which sums it into the run summary.

    Args:
        batch: Rows with ``row_index``, ``uri``, ``status``, ``error``.
        storage_options: fsspec options; credentials come from the worker's environment.
        attempts: Tries per object for transient errors (throttling, 5xx, timeouts, resets).
        allowlist: Where reads may go.
        max_bytes: The byte limit per object.
    """
    statuses, errors = batch.column("status").to_pylist(), batch.column("error").to_pylist()
    sizes = (batch.column("size_bytes").to_pylist() if "size_bytes" in batch.column_names
             else [None] * batch.num_rows)
    data: list[bytes | None] = []
    recovered = [0] * batch.num_rows
    for i, uri in enumerate(batch.column("uri").to_pylist()):
        payload = None
        if statuses[i] == STATUS_OK:
            retried: list[BaseException] = []
            try:
                payload = read_object(uri, storage_options, allowlist=allowlist, max_bytes=max_bytes,
                                      known_size=sizes[i], attempts=attempts, on_retry=retried.append)
                recovered[i] = len(retried)
            except RejectedURI as exc:
                statuses[i], errors[i] = STATUS_REJECTED, str(exc)
            except ObjectTooLarge as exc:
                statuses[i], errors[i] = STATUS_ERROR, str(exc)
            except FileNotFoundError:
                statuses[i], errors[i] = STATUS_ERROR, f"object not found: {redact_uri(uri)}"
            except Exception as exc:  # noqa: BLE001 - storage errors of any backend become this row's error
                notes = " ".join(getattr(exc, "__notes__", []))
                reason = redact_text(f"cannot read {uri}: {_describe(exc)} {notes}".strip())
                statuses[i], errors[i] = STATUS_ERROR, reason
        data.append(payload)
    return (batch.set_column(batch.schema.get_field_index("status"), "status", pa.array(statuses, pa.string()))
            .set_column(batch.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
            .append_column("data", pa.array(data, pa.large_binary()))
            .append_column("read_retries", pa.array(recovered, pa.int32())))


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays as one ``.npz`` blob (no pickling): how prepared images travel between Ray stages."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    """The arrays ``pack_arrays`` stored; object arrays are refused (``allow_pickle=False``)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def prepare_batch(batch: pa.Table, config: ScorerConfig) -> pa.Table:
    """Decode each fetched image and do the scorer's model-independent preprocessing (CPU work, off the GPUs).

    What preprocessing means comes from ``config.model``'s registry entry; its result is shipped as one
    ``prepared`` blob of named arrays plus the decoded image's size.
    """
    statuses, errors = batch.column("status").to_pylist(), batch.column("error").to_pylist()
    columns: dict[str, list] = {name: [] for name in PREPARED_COLUMNS}
    for i, data in enumerate(batch.column("data").to_pylist()):
        prepared = None
        if statuses[i] == STATUS_OK:
            try:
                prepared = prepare_item(data, config)
            except ImageError as exc:
                statuses[i], errors[i] = STATUS_ERROR, str(exc)
            except Exception as exc:  # noqa: BLE001 - one image's failure stays with that image
                statuses[i], errors[i] = STATUS_ERROR, _describe(exc)
        columns["prepared"].append(pack_arrays(prepared.to_arrays()) if prepared else None)
        columns["height"].append(prepared.height if prepared else None)
        columns["width"].append(prepared.width if prepared else None)
    out = {"row_index": batch.column("row_index"), "status": pa.array(statuses, pa.string()),
           "error": pa.array(errors, pa.string()), "prepared": pa.array(columns["prepared"], pa.large_binary()),
           "height": pa.array(columns["height"], pa.int32()), "width": pa.array(columns["width"], pa.int32())}
    return with_passthrough(pa.table(out), batch, drop=("data",))


def with_passthrough(out: pa.Table, batch: pa.Table, drop: tuple[str, ...]) -> pa.Table:
    """``out`` followed by the columns of ``batch`` that it lacks, but ``drop``."""
    for name in batch.column_names:
        if name not in out.column_names and name not in drop:
            out = out.append_column(batch.schema.field(name), batch.column(name))
    return out


def fetch_and_prepare_batch(batch: pa.Table, config: ScorerConfig, storage_options: Mapping | None = None, *,
                            allowlist: Allowlist, max_bytes: int = DEFAULT_MAX_BYTES) -> pa.Table:
    """``fetch_batch`` then ``prepare_batch`` in one task: an image's bytes never leave the task that read them."""
    return prepare_batch(fetch_batch(batch, storage_options, allowlist=allowlist, max_bytes=max_bytes), config)


def prepare_plan_files(batch: pa.Table, config: ScorerConfig, fs: fsspec.AbstractFileSystem, batch_size: int,
                       storage_options: Mapping | None = None, *, allowlist: Allowlist,
                       max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[pa.Table]:
    """Read the job's plan files named in ``batch`` (a ``path`` column); yield their rows fetched and prepared.

    ``batch_size`` rows at a time, each batch as ``fetch_and_prepare_batch`` returns it.

    The plan files are read here, in the decode task, rather than by a Ray read operator: a task per file
    whatever its size, and prepared rows that stream to the scoring actors as each batch is done.
    """
    for path in batch.column("path").to_pylist():
        with fs.open(path, "rb") as f:
            for rows in pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=batch_size):
                yield fetch_and_prepare_batch(pa.Table.from_batches([rows]), config, storage_options,
                                              allowlist=allowlist, max_bytes=max_bytes)


WEIGHTS_CHANGED = "weights changed since the job started"


class WeightsChanged(WeightsError):
    """An actor read other weights than the driver checked: the job stops rather than mix two models in a run."""


def _unpack(row: dict, prepared_type: type):
    arrays = unpack_arrays(row["prepared"])
    kind = EncodedImage if "encoded" in arrays else prepared_type  # --decode gpu: decoded in the actor
    return kind.from_arrays(arrays, row["height"], row["width"])


class ScoreActor:
    """One actor of the scoring pool: both models loaded once in ``__init__``, batches of images scored.

    Args:
        config: What to load (a small picklable dataclass).
        expected_model_id: The model id the driver computed; an actor that reads other weights (a file
            replaced mid-run) refuses its first batch rather than mixing two models in one run.
    """

    def __init__(self, config: ScorerConfig, expected_model_id: str, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.scorer = make_scorer(config)
        # Refused at the first batch, not here: an exception in a batch ends the run at once, while an actor
        # that dies in __init__ is replaced (Ray Data's max_consecutive_actor_init_deaths) and would load the
        # changed weights again, several times over, before the run gave up.
        self.refusal = None
        if self.scorer.model_id != expected_model_id:
            self.refusal = (f"{WEIGHTS_CHANGED}: the driver checked {expected_model_id}, this actor read "
                            f"{self.scorer.model_id}")
            logger.error("%s", self.refusal)
        else:
            logger.info("scoring actor ready on %s with %s", self.scorer.device, self.scorer.model_id)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score the ``ok`` rows of a batch; returns ``SCORE_COLUMNS`` (then the passed-through columns)."""
        if self.refusal:
            raise WeightsChanged(self.refusal)
        rows = batch.select([n for n in batch.column_names if n in SCORE_COLUMNS or n == "prepared"]).to_pylist()
        out = {name: [row.get(name) if name in ("row_index", "status", "error", "width", "height") else None
                      for row in rows] for name in SCORE_COLUMNS}
        todo = [i for i, row in enumerate(rows) if row["status"] == STATUS_OK]
        prepared = [_unpack(rows[i], self.scorer.prepared_type) for i in todo]
        try:
            results = self.scorer.score_prepared(prepared)
        except Exception:  # noqa: BLE001 - find the image that fails; the others keep their scores
            logger.warning("a batch of %d images failed; scoring them one by one", len(todo), exc_info=True)
            results = []
            for item in prepared:
                try:
                    results.append(self.scorer.score_prepared([item])[0])
                except Exception as exc:  # noqa: BLE001 - this image's error row
                    results.append(exc)
        for i, result in zip(todo, results, strict=True):
            if isinstance(result, Exception):
                out["status"][i], out["error"][i] = STATUS_ERROR, f"scoring failed: {_describe(result)}"
                continue
            if reason := non_finite(result):
                out["status"][i], out["error"][i] = STATUS_ERROR, f"scoring failed: {reason}"
                continue
            out["score"][i], out["score_std"][i] = result.score, result.score_std
            out["num_crops"][i] = result.num_crops
        scored = pa.table({name: pa.array(values, SCORE_COLUMNS[name]) for name, values in out.items()})
        return with_passthrough(scored, batch, drop=("prepared",))
