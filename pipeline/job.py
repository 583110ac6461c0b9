"""The nightly scoring job: manifest in, one partition of Parquet out.

On the driver: read the manifest, reject URIs outside the allowed prefixes, hash and check the weights (a bad
checkpoint stops the job here, before any work), drop images already scored by the same weights, and write
the results. On the cluster (Ray Data, streaming): fetch bytes and decode in CPU tasks, score on an actor pool
that holds both models (GPU when the cluster has GPUs). Every manifest row that is not skipped becomes exactly
one output row; failures are rows with ``status`` ``error`` or ``rejected``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.allowlist import Allowlist, RejectedURI, redact_uri
from pipeline.manifest import Manifest, read_manifest
from pipeline.output import (
    PARTITION,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_REJECTED,
    STATUSES,
    RunOutput,
    done_keys,
    extra_column_names,
    output_schema,
)
from pipeline.preprocess import PreprocessConfig
from pipeline.resources import peak_rss_bytes
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
    depth_weights: str | None = None
    encoder: str = "auto"
    depth_version: str = "v1"
    crops: int = 20
    depth_input_size: int = 518
    actors: tuple[int, int] | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    batch_size: int | None = None  # images per batch; None -> 16 on GPU actors, 8 on CPU
    run_date: str | None = None
    incremental: bool = True
    allow_prefixes: tuple[str, ...] = ()
    storage_options: Mapping = field(default_factory=dict)
    limit: int | None = None
    log_every_s: float = 30.0
    max_pixels: int = PreprocessConfig.max_pixels
    shard_rows: int = 1000
    precision: str = "fp32"
    compile: bool = False
    attention: str = "sdpa"  # rounding-level like compile, so neither enters the run key
    draft_decode: bool = False
    model: str = "dgiqa"
    actor_class: type | None = None  # the scoring actor; None -> pipeline.stages.ScoreActor (tests swap it)

    def __post_init__(self):
        if self.run_date is not None:
            try:
                dt.date.fromisoformat(self.run_date)
            except ValueError:
                raise ValueError(f"--run-date must be YYYY-MM-DD, got {self.run_date!r}") from None
        if self.actors is not None and not 1 <= self.actors[0] <= self.actors[1]:
            raise ValueError(f"--actors must be N or MIN,MAX with 1 <= MIN <= MAX, got {self.actors}")
        if (self.batch_size is not None and self.batch_size < 1) or self.crops < 1 or self.shard_rows < 1:
            raise ValueError("--batch-size, --crops and --shard-rows must be at least 1")
        if self.limit is not None and self.limit < 0:
            raise ValueError("--limit must not be negative")

    def scorer_config(self) -> ScorerConfig:
        """The scorer's config: the same on the driver's check and in every actor."""
        return ScorerConfig(
            weights=self.weights, depth_weights=self.depth_weights, encoder=self.encoder,
            depth_version=self.depth_version, device="auto", storage_options=dict(self.storage_options),
            precision=self.precision, compile=self.compile, attention=self.attention, model=self.model,
            preprocess=PreprocessConfig(num_crops=self.crops, depth_lower_bound=self.depth_input_size,
                                        max_pixels=self.max_pixels, draft=self.draft_decode))


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
            uris.append(uri or "")
            errors.append(str(exc))
    return uris, errors


def _row_keys(uris: pa.Array | pa.ChunkedArray, table: pa.Table) -> pa.ChunkedArray:
    """One string per row identifying the object version: normalised URI, ETag and size."""
    etag = pc.fill_null(table.column("etag"), "")
    size = pc.fill_null(table.column("size_bytes").cast(pa.string()), "")
    return pc.binary_join_element_wise(uris, etag, size, "\x00")


def _done(keys: pa.ChunkedArray, config: JobConfig, model_id: str, run_date: str) -> np.ndarray:
    """Boolean mask of manifest rows already done by the same weights (see ``output.done_keys``).

    ``--full`` still skips rows already in this run date's partition, so a rerun never duplicates them.
    """
    done = done_keys(config.output, model_id, run_date, config.storage_options)
    if not config.incremental:
        done = done.filter(pc.equal(done.column(PARTITION), run_date))
    if not len(done):
        return np.zeros(len(keys), bool)
    theirs = _row_keys(done.column("uri"), done).combine_chunks()
    return pc.is_in(keys, value_set=theirs).to_numpy(zero_copy_only=False)


def _duplicates(keys: pa.ChunkedArray) -> dict[int, int]:
    """Later manifest rows naming the same object version as an earlier row: row -> first row."""
    first: dict[str, int] = {}
    dupes = {}
    for i, key in enumerate(keys.to_pylist()):
        if key in first:
            dupes[i] = first[key]
        else:
            first[key] = i
    return dupes


def _run_key(config: JobConfig, manifest: Manifest, model_id: str, run_date: str, pending: np.ndarray) -> str:
    """``<job>-<rows>``: the job part names manifest, model and options; the rows part the work left to do."""
    job = {"manifest": manifest.source, "run_date": run_date, "model_id": model_id, "crops": config.crops,
           "depth_input_size": config.depth_input_size, "max_pixels": config.max_pixels,
           "allow": sorted(config.allow_prefixes), "incremental": config.incremental,
           "shard_rows": config.shard_rows, "precision": config.precision, "draft_decode": config.draft_decode}
    job_key = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:12]
    rows_key = hashlib.sha256(np.asarray(pending, np.int64).tobytes()).hexdigest()[:12]
    return f"{job_key}-{rows_key}"


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
    """Output rows (plus ``row_index``) for scored rows: results joined with their manifest rows."""
    indices = scored.column("row_index")
    source = manifest.table.take(indices)
    now = dt.datetime.now(dt.UTC)
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
    return pa.table(columns).cast(schema).add_column(0, "row_index", indices)


_URI = re.compile(r"\S+://\S*")


def _error_reason(message: str) -> str:
    """A message's kind, for counting: URIs masked, the part before the first ': '."""
    return _URI.sub("<uri>", message).split(": ", 1)[0][:80]


def _scored_stream(config: JobConfig, uris: list, pending: np.ndarray, info: ModelInfo):
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.stages import ScoreActor, fetch_batch, prepare_batch

    gpus, cpus, actors = _cluster_plan(config)
    logger.info("actor pool: %d-%d actors, %g GPU and %g CPU each; %d images a batch", actors[0], actors[1], gpus,
                cpus, config.batch_size or (16 if gpus else 8))
    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = 1800 if gpus else 600
    # Small manifests: blocks of one batch, so every CPU gets work. Large ones: at most 256 rows a block, so a
    # million rows are a few thousand blocks rather than a hundred thousand.
    batch = config.batch_size or (16 if gpus else 8)  # 16 x 20 crops = 320 crops a GPU pass
    block = min(max(256, batch), max(batch, -(-len(pending) // 64)))
    rows = pa.table({
        "row_index": pa.array(pending, pa.int64()),
        "uri": pa.array([uris[i] for i in pending], pa.string()),
        "status": pa.array([STATUS_OK] * len(pending), pa.string()),
        "error": pa.nulls(len(pending), pa.string()),
    })
    blocks = [rows.slice(i, block) for i in range(0, len(rows), block)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(fetch_batch, batch_format="pyarrow", batch_size=batch,
                        fn_kwargs={"storage_options": dict(config.storage_options)})
    ds = ds.map_batches(prepare_batch, batch_format="pyarrow", batch_size=batch,
                        fn_kwargs={"config": config.scorer_config()})
    ds = ds.map_batches(
        config.actor_class or ScoreActor, batch_format="pyarrow", batch_size=batch,
        fn_constructor_kwargs={"config": config.scorer_config(), "expected_model_id": info.model_id,
                               "num_threads": None if gpus else int(cpus)},
        # Ray Data restarts a dead actor and retries its batch by default (max_restarts / max_task_retries -1);
        # tests/test_faults.py kills one to keep that true.
        compute=ActorPoolStrategy(min_size=actors[0], max_size=actors[1]), num_gpus=gpus, num_cpus=cpus)
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def _pre_pipeline_rows(indices: list[int], statuses: list[str], errors: list[str]) -> pa.Table:
    """Result rows for rows decided on the driver (rejected, duplicate, unreadable manifest row)."""
    n = len(indices)
    return pa.table({"row_index": pa.array(indices, pa.int64()), "status": pa.array(statuses, pa.string()),
                     "error": pa.array(errors, pa.string()),
                     **{name: pa.nulls(n, kind) for name, kind in (
                         ("score", pa.float32()), ("score_std", pa.float32()), ("num_crops", pa.int32()),
                         ("width", pa.int32()), ("height", pa.int32()))}})


def run_job(config: JobConfig) -> dict:
    """Score a manifest into one ``run_date`` partition of the output, exactly once; returns the run summary.

    Started again with the same arguments after being killed, it resumes from the shards the killed attempt
    finished and still writes each row once (see ``pipeline.output``).

    Raises:
        ManifestError: The manifest cannot be used.
        WeightsError: The weights cannot be used (checked before any work).
        JobError: The run did not produce every row; nothing was committed.
    """
    import ray

    started = time.monotonic()
    run_date = config.run_date or dt.datetime.now(dt.UTC).date().isoformat()
    manifest = read_manifest(config.manifest, config.storage_options, config.limit)
    allowlist = Allowlist(config.allow_prefixes or (manifest.home,))
    info = check_models(config.scorer_config())
    n = len(manifest.table)

    uris, rejections = _rejections(manifest, allowlist)
    keys = _row_keys(pa.array(uris, pa.string()), manifest.table)
    done = _done(keys, config, info.model_id, run_date)
    duplicates = _duplicates(keys)
    expected = np.flatnonzero(~done)  # rows this run must write
    pre_errors: dict[int, tuple[str, str]] = {}
    for i in expected:
        if manifest.row_errors and manifest.row_errors[i]:
            pre_errors[int(i)] = (STATUS_ERROR, manifest.row_errors[i])
        elif rejections[i] is not None:
            pre_errors[int(i)] = (STATUS_REJECTED, rejections[i])
        elif i in duplicates:
            pre_errors[int(i)] = (STATUS_ERROR, f"duplicate of manifest row {duplicates[i]} "
                                                "(same URI, ETag and size): scored once, there")
    run_key = _run_key(config, manifest, info.model_id, run_date, expected)
    run_id = f"{run_date}-{run_key}"
    logger.info("run %s: %d manifest rows (%s) from %s; model %s; allowed prefixes %s", run_id, n, manifest.kind,
                redact_uri(manifest.source), info.model_id, ", ".join(allowlist.prefixes))

    schema = output_schema(manifest.table.select(manifest.extra_columns).schema)
    out = RunOutput(config.output, run_date, run_key, schema, config.storage_options)
    # Shard 0 holds the rows decided on the driver; shards 1.. the rows to score, in manifest order.
    to_score = np.array([i for i in expected if int(i) not in pre_errors], np.int64)
    shards = {0: set(pre_errors)}
    shard_of = dict.fromkeys(pre_errors, 0)
    for k, start in enumerate(range(0, len(to_score), config.shard_rows), start=1):
        shards[k] = {int(i) for i in to_score[start:start + config.shard_rows]}
        shard_of.update(dict.fromkeys(shards[k], k))
    finished = out.finished_shards(shards)
    if finished:
        logger.info("resuming: %d of %d shards (%d rows) were finished by an earlier attempt", len(finished),
                    len(shards), sum(sum(c.values()) for c in finished.values()))
    statuses: Counter = Counter()
    reasons: Counter = Counter()
    buffers: dict[int, list[pa.Table]] = {}
    seen = np.zeros(n, bool)

    def emit(scored: pa.Table) -> None:
        indices = scored.column("row_index").to_numpy()
        fresh = ~seen[indices]
        if not fresh.all():
            logger.warning("dropping %d duplicate result rows (retried work)", int((~fresh).sum()))
            scored = scored.filter(pa.array(fresh))
        seen[scored.column("row_index").to_numpy()] = True
        table = _result_rows(manifest, uris, scored, info, run_id, schema)
        statuses.update(table.column("status").to_pylist())
        reasons.update(_error_reason(e) for e in table.column("error").to_pylist() if e)
        shard_ids = np.array([shard_of[int(i)] for i in table.column("row_index").to_pylist()])
        for k in np.unique(shard_ids):
            part = table.filter(pa.array(shard_ids == k))
            buffered = buffers.setdefault(int(k), [])
            buffered.append(part)
            if sum(t.num_rows for t in buffered) == len(shards[int(k)]):
                out.write_shard(int(k), pa.concat_tables(buffers.pop(int(k))))

    for k, counts in finished.items():
        seen[list(shards[k])] = True
        statuses.update(counts)
    if 0 not in finished and shards[0]:
        rows = sorted(shards[0])
        emit(_pre_pipeline_rows(rows, [pre_errors[i][0] for i in rows], [pre_errors[i][1] for i in rows]))
    pending = np.array(sorted(i for k, rows in shards.items() if k and k not in finished for i in rows), np.int64)
    logger.info("%d to score now, %d done before by this model (skipped), %d rejected or refused on the driver",
                len(pending), int(done.sum()), len(pre_errors))

    if len(pending):
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True)
        progress = _Progress(len(pending), config.log_every_s)
        for batch in _scored_stream(config, uris, pending, info):
            before, errors_before = sum(statuses.values()), statuses[STATUS_ERROR]
            emit(batch)
            progress.update(sum(statuses.values()) - before, statuses[STATUS_ERROR] - errors_before)

    missing = np.flatnonzero(~seen[expected])
    if len(missing) or buffers:
        raise JobError(f"run {run_id} produced no row for {len(missing)} manifest rows (first: "
                       f"{[uris[expected[i]] for i in missing[:5]]}); nothing was committed, rerun to resume")
    wall = time.monotonic() - started
    summary = {
        "run_id": run_id,
        "run_date": run_date,
        "manifest": redact_uri(manifest.source),
        "manifest_rows": n,
        "skipped_done_before": int(done.sum()),
        "rows_written": len(expected),
        "resumed_rows": sum(sum(c.values()) for c in finished.values()),
        "status_counts": {s: statuses.get(s, 0) for s in STATUSES},
        "error_reasons": dict(reasons.most_common(20)),
        "model": config.model,
        "model_id": info.model_id,
        "encoder": info.encoder,
        "score_scale": info.output_scale,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(len(pending) / wall, 4) if wall > 0 else None,
        "driver_peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
    }
    summary["summary_path"] = out.commit(summary)
    logger.info("run %s done: %s", run_id, {k: summary[k] for k in ("status_counts", "rows_written",
                                                                        "skipped_done_before", "wall_time_s")})
    return summary
