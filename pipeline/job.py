"""The nightly scoring job: manifest in, one partition of Parquet out.

On the driver: read the manifest, reject URIs outside the allowed prefixes, hash and check the weights (a bad
checkpoint stops the job here, before any work), drop images already scored by the same weights, and write
the results. On the cluster (Ray Data, streaming): fetch bytes and decode in CPU tasks, score on an actor pool
that holds both models (GPU when the cluster has GPUs). Every manifest row that is not skipped becomes exactly
one output row; failures are rows with ``status`` ``error`` or ``rejected``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.allowlist import Allowlist, RejectedURI
from pipeline.manifest import Manifest, read_manifest
from pipeline.output import (
    RESULT_SCHEMA,
    STATUS_OK,
    STATUS_REJECTED,
    STATUSES,
    PartitionWriter,
    extra_column_names,
    output_schema,
    scored_keys,
)
from pipeline.preprocess import PreprocessConfig
from pipeline.scorer import ModelInfo, ScorerConfig, check_models

logger = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The run cannot complete; nothing of it was committed to the output."""


@dataclass(frozen=True)
class JobConfig:
    """Arguments of one run (see ``jobs/score_bucket.py --help`` for their meaning)."""

    manifest: str
    output: str
    weights: str
    depth_weights: str
    encoder: str = "auto"
    depth_version: str = "v1"
    crops: int = 20
    depth_input_size: int = 518
    actors: tuple[int, int] | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    batch_size: int = 8
    run_date: str | None = None
    incremental: bool = True
    allow_prefixes: tuple[str, ...] = ()
    storage_options: Mapping = field(default_factory=dict)
    limit: int | None = None
    log_every_s: float = 30.0
    max_pixels: int = PreprocessConfig.max_pixels

    def __post_init__(self):
        if self.run_date is not None:
            try:
                dt.date.fromisoformat(self.run_date)
            except ValueError:
                raise ValueError(f"--run-date must be YYYY-MM-DD, got {self.run_date!r}") from None
        if self.actors is not None and not 1 <= self.actors[0] <= self.actors[1]:
            raise ValueError(f"--actors must be N or MIN,MAX with 1 <= MIN <= MAX, got {self.actors}")
        if self.batch_size < 1 or self.crops < 1:
            raise ValueError("--batch-size and --crops must be at least 1")
        if self.limit is not None and self.limit < 0:
            raise ValueError("--limit must not be negative")

    def scorer_config(self) -> ScorerConfig:
        """The scorer's config: the same on the driver's check and in every actor."""
        return ScorerConfig(
            weights=self.weights, depth_weights=self.depth_weights, encoder=self.encoder,
            depth_version=self.depth_version, device="auto", storage_options=dict(self.storage_options),
            preprocess=PreprocessConfig(num_crops=self.crops, depth_lower_bound=self.depth_input_size,
                                        max_pixels=self.max_pixels))


def _cluster_plan(config: JobConfig) -> tuple[float, float, tuple[int, int]]:
    import ray

    resources = ray.cluster_resources()
    cluster_gpus, cluster_cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster_gpus else 0.0
        if not cluster_gpus:
            logger.warning("the Ray cluster has no GPUs: scoring on CPU actors (slow). On an autoscaling cluster "
                           "whose GPU nodes are not up yet, pass --gpus-per-actor 1.")
    cpus = config.cpus_per_actor
    if cpus is None:
        cpus = 1.0 if gpus else float(max(1, cluster_cpus // 2))
    if config.actors is not None:
        actors = config.actors
    elif gpus:
        actors = (1, max(1, int(cluster_gpus / gpus)))
    else:
        actors = (1, 1)
    return gpus, cpus, actors


def _rejections(manifest: Manifest, allowlist: Allowlist) -> tuple[list[str | None], list[str | None]]:
    uris, errors = [], []
    for uri in manifest.table.column("uri").to_pylist():
        try:
            uris.append(allowlist.check(uri))
            errors.append(None)
        except RejectedURI as exc:
            uris.append(uri)
            errors.append(str(exc))
    return uris, errors


def _already_scored(manifest: Manifest, uris: list[str], config: JobConfig, model_id: str) -> np.ndarray:
    """Boolean mask of manifest rows scored ``ok`` before, by the same weights, for the same object version.

    Rows are matched on the normalised URI (as written to the output), the ETag and the size.
    """
    done = scored_keys(config.output, model_id, config.storage_options)
    if not len(done):
        return np.zeros(len(uris), bool)

    def key(uri: pa.Array | pa.ChunkedArray, table: pa.Table) -> pa.ChunkedArray:
        etag = pc.fill_null(table.column("etag"), "")
        size = pc.fill_null(table.column("size_bytes").cast(pa.string()), "")
        return pc.binary_join_element_wise(uri, etag, size, "\x00")

    ours = key(pa.array(uris, pa.string()), manifest.table)
    theirs = key(done.column("uri"), done).combine_chunks()
    return pc.is_in(ours, value_set=theirs).to_numpy(zero_copy_only=False)


class _Progress:
    def __init__(self, total: int, every_s: float):
        self.total, self.every_s = total, every_s
        self.start = self.last = time.monotonic()
        self.done = self.errors = 0

    def update(self, done: int, errors: int) -> None:
        self.done += done
        self.errors += errors
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            logger.info("scored %d/%d images (%.0f%%), %.2f images/s, %d errors", self.done, self.total,
                        100 * self.done / max(self.total, 1), rate, self.errors)


def _result_rows(manifest: Manifest, uris: list, scored: pa.Table, info: ModelInfo, run_id: str,
                 schema: pa.Schema) -> pa.Table:
    indices = scored.column("row_index")
    source = manifest.table.take(indices)
    now = dt.datetime.now(dt.timezone.utc)
    columns = {
        "uri": pa.array([uris[i] for i in indices.to_pylist()], pa.string()),
        "etag": source.column("etag"),
        "size_bytes": source.column("size_bytes"),
        "width": scored.column("width"),
        "height": scored.column("height"),
        "score": scored.column("score"),
        "score_std": scored.column("score_std"),
        "num_crops": scored.column("num_crops"),
        "status": scored.column("status"),
        "error": scored.column("error"),
        "model_id": pa.array([info.model_id] * len(scored), pa.string()),
        "encoder": pa.array([info.encoder] * len(scored), pa.string()),
        "scored_at": pa.array([now] * len(scored), pa.timestamp("us", tz="UTC")),
        "run_id": pa.array([run_id] * len(scored), pa.string()),
    }
    extras = extra_column_names(source.select(manifest.extra_columns).schema)
    columns.update({out_name: source.column(name) for name, out_name in extras.items()})
    return pa.table(columns).cast(schema)


def _error_reason(message: str) -> str:
    return message.split(":", 1)[0][:80]


def _scored_stream(config: JobConfig, manifest: Manifest, uris: list, pending: np.ndarray, info: ModelInfo):
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.stages import ScoreActor, fetch_batch, prepare_batch

    gpus, cpus, actors = _cluster_plan(config)
    logger.info("actor pool: %d-%d actors, %g GPU and %g CPU each", actors[0], actors[1], gpus, cpus)
    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = 1800 if gpus else 600
    block = max(config.batch_size, 1)
    rows = pa.table({
        "row_index": pa.array(pending, pa.int64()),
        "uri": pa.array([uris[i] for i in pending], pa.string()),
        "status": pa.array([STATUS_OK] * len(pending), pa.string()),
        "error": pa.nulls(len(pending), pa.string()),
    })
    blocks = [rows.slice(i, block) for i in range(0, len(rows), block)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(fetch_batch, batch_format="pyarrow", batch_size=config.batch_size,
                        fn_kwargs={"storage_options": dict(config.storage_options)})
    ds = ds.map_batches(prepare_batch, batch_format="pyarrow", batch_size=config.batch_size,
                        fn_kwargs={"config": config.scorer_config().preprocess})
    ds = ds.map_batches(
        ScoreActor, batch_format="pyarrow", batch_size=config.batch_size,
        fn_constructor_kwargs={"config": config.scorer_config(), "expected_model_id": info.model_id,
                               "num_threads": None if gpus else int(cpus)},
        compute=ActorPoolStrategy(min_size=actors[0], max_size=actors[1]), num_gpus=gpus, num_cpus=cpus)
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def run_job(config: JobConfig) -> dict:
    """Score a manifest into one ``run_date`` partition of the output; returns the run summary.

    Raises:
        ManifestError: The manifest cannot be used.
        WeightsError: The weights cannot be used (checked before any work).
        JobError: The run did not produce every row; nothing was committed.
    """
    import ray

    started = time.monotonic()
    run_date = config.run_date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    manifest = read_manifest(config.manifest, config.storage_options, config.limit)
    allowlist = Allowlist(config.allow_prefixes or (manifest.home,))
    info = check_models(config.scorer_config())
    logger.info("run %s: %d manifest rows (%s) from %s; model %s; allowed prefixes %s", run_id,
                len(manifest.table), manifest.kind, manifest.source, info.model_id, ", ".join(allowlist.prefixes))

    uris, rejections = _rejections(manifest, allowlist)
    skipped = _already_scored(manifest, uris, config, info.model_id) if config.incremental else np.zeros(
        len(manifest.table), bool)
    rejected = np.array([e is not None for e in rejections], bool)
    pending = np.flatnonzero(~skipped & ~rejected)
    expected = np.flatnonzero(~skipped)
    logger.info("%d to score, %d already scored by this model (skipped), %d rejected", len(pending),
                int(skipped.sum()), int((rejected & ~skipped).sum()))

    schema = output_schema(manifest.table.select(manifest.extra_columns).schema)
    writer = PartitionWriter(config.output, run_date, run_id, schema, config.storage_options)
    seen = np.zeros(len(manifest.table), bool)
    statuses: Counter = Counter()
    reasons: Counter = Counter()

    def emit(scored: pa.Table) -> None:
        indices = scored.column("row_index").to_numpy()
        fresh = ~seen[indices]
        if not fresh.all():
            logger.warning("dropping %d duplicate result rows (retried work)", int((~fresh).sum()))
            scored = scored.filter(pa.array(fresh))
        seen[scored.column("row_index").to_numpy()] = True
        table = _result_rows(manifest, uris, scored, info, run_id, schema)
        writer.write(table)
        statuses.update(table.column("status").to_pylist())
        reasons.update(_error_reason(e) for e in table.column("error").to_pylist() if e)

    rejected_rows = np.flatnonzero(rejected & ~skipped)
    if len(rejected_rows):
        emit(pa.table({"row_index": pa.array(rejected_rows, pa.int64()),
                       "status": pa.array([STATUS_REJECTED] * len(rejected_rows), pa.string()),
                       "error": pa.array([rejections[i] for i in rejected_rows], pa.string()),
                       **{n: pa.nulls(len(rejected_rows), t) for n, t in
                          (("score", pa.float32()), ("score_std", pa.float32()), ("num_crops", pa.int32()),
                           ("width", pa.int32()), ("height", pa.int32()))}}))

    if len(pending):
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)
        progress = _Progress(len(pending), config.log_every_s)
        for batch in _scored_stream(config, manifest, uris, pending, info):
            before = sum(statuses.values())
            errors_before = sum(statuses[s] for s in STATUSES if s != STATUS_OK)
            emit(batch)
            progress.update(sum(statuses.values()) - before,
                            sum(statuses[s] for s in STATUSES if s != STATUS_OK) - errors_before)

    missing = np.flatnonzero(~seen[expected])
    if len(missing):
        raise JobError(f"run {run_id} produced no row for {len(missing)} manifest rows (first: "
                       f"{[uris[expected[i]] for i in missing[:5]]}); nothing was committed")
    writer.flush()
    wall = time.monotonic() - started
    summary = {
        "run_id": run_id,
        "run_date": run_date,
        "manifest": manifest.source,
        "manifest_rows": len(manifest.table),
        "skipped_already_scored": int(skipped.sum()),
        "rows_written": writer.rows_written,
        "status_counts": {s: statuses.get(s, 0) for s in STATUSES},
        "error_reasons": dict(reasons.most_common(20)),
        "model_id": info.model_id,
        "encoder": info.encoder,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(len(pending) / wall, 4) if wall > 0 else None,
        "output_columns": list(RESULT_SCHEMA.names) + [n for n in schema.names if n not in RESULT_SCHEMA.names],
    }
    summary["summary_path"] = writer.commit(summary)
    logger.info("run %s done: %s", run_id, {k: summary[k] for k in ("status_counts", "rows_written",
                                                                        "skipped_already_scored", "wall_time_s")})
    return summary
