"""The nightly scoring job: manifest in, one partition of Parquet out.

On the driver, whose memory does not grow with the manifest or the history: hash and check the weights (a bad
checkpoint stops the job here, before any work), then plan the night out of core (``pipeline.batch.plan``: the
manifest streamed through the allowlist into DuckDB, anti-joined with the history, de-duplicated, cut into
shards), and commit. On the cluster (Ray Data, streaming): read the plan files, fetch bytes and decode in
CPU tasks, score on an actor pool that holds both models (GPU when the cluster has GPUs). Every manifest row
that is not skipped becomes exactly one output row; failures are rows with ``status`` ``error`` or
``rejected``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.batch.allowlist import Allowlist, redact_uri
from pipeline.batch.manifest import ManifestReader, open_manifest
from pipeline.batch.output import STATUS_ERROR, STATUSES, RunOutput, check_writable, output_schema
from pipeline.batch.plan import Plan, PlannerConfig, make_plan
from pipeline.batch.resources import PeakRss, peak_rss_bytes, rss_bytes
from pipeline.batch.run_dates import check_run_date
from pipeline.batch.stages import WEIGHTS_CHANGED
from pipeline.limits import DEFAULT_MAX_BYTES
from pipeline.scorers.registry import SCORER_OPTIONS, changed_options, check_options, get_scorer
from pipeline.scoring.preprocess import PreprocessConfig, preprocess_peak_bytes
from pipeline.scoring.scorer import ModelInfo, ScorerConfig, check_models
from pipeline.scoring.weights import WeightsError

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
    max_bytes: int = DEFAULT_MAX_BYTES
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
    exif_transpose: bool = False  # the DP-IQA student's option; see ScorerConfig
    decode: str = "cpu"  # DGIQA's: cpu (OpenCV, as published) or gpu (JPEGs decoded in the actors)
    trained_on: str = "livec"  # DPAM-IQA's preprocessing preset; see ScorerConfig
    prompt_embeddings: str | None = None  # DP-IQA's prompt features: a tensor file, or
    clip_text: str | None = None  # a CLIP ViT-L/14 folder to compute them from
    latent: str = "sample"  # DP-IQA's latent: a seeded draw or the mean; see ScorerConfig
    plan_memory_mb: int = PlannerConfig.memory_mb
    spill_dir: str | None = None
    actor_class: type | None = None  # the scoring actor; None -> pipeline.batch.stages.ScoreActor (tests swap it)

    def __post_init__(self):
        if self.run_date is not None:
            check_run_date(self.run_date, "--run-date")
        if self.actors is not None and not 1 <= self.actors[0] <= self.actors[1]:
            raise ValueError(f"--actors must be N or MIN,MAX with 1 <= MIN <= MAX, got {self.actors}")
        if (self.batch_size is not None and self.batch_size < 1) or self.crops < 1 or self.shard_rows < 1:
            raise ValueError("--batch-size, --crops and --shard-rows must be at least 1")
        if self.limit is not None and self.limit < 0:
            raise ValueError("--limit must not be negative")
        if self.max_bytes < 1:
            raise ValueError("--max-bytes must be at least 1")
        if self.plan_memory_mb < 64:
            raise ValueError("--plan-memory-mb must be at least 64")
        if self.spill_dir is not None and not os.path.isdir(self.spill_dir):  # found now, not after the weights
            raise ValueError(f"--spill-dir {self.spill_dir} is not a folder on this machine")
        if self.spill_dir is not None and not os.access(self.spill_dir, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write to --spill-dir {self.spill_dir}")
        # A model-specific option set for a scorer that ignores it would still enter the run key: refused here.
        check_options(self.model, changed_options({name: getattr(self, name) for name in SCORER_OPTIONS}))

    def scorer_config(self) -> ScorerConfig:
        """The scorer's config: the same on the driver's check and in every actor."""
        return ScorerConfig(
            weights=self.weights, depth_weights=self.depth_weights, encoder=self.encoder,
            depth_version=self.depth_version, device="auto", storage_options=dict(self.storage_options),
            precision=self.precision, compile=self.compile, attention=self.attention, model=self.model,
            exif_transpose=self.exif_transpose, decode=self.decode, trained_on=self.trained_on,
            prompt_embeddings=self.prompt_embeddings, clip_text=self.clip_text, latent=self.latent,
            preprocess=PreprocessConfig(num_crops=self.crops, depth_input_size=self.depth_input_size,
                                        max_pixels=self.max_pixels, draft=self.draft_decode))


class ClusterPlan(NamedTuple):
    """Resources of the two Ray stages: the scoring actors' (GPUs and CPUs each, pool size) and each decode task's."""

    gpus: float
    cpus: float
    actors: tuple[int, int]
    decode_cpus: float = 1.0


def _cluster_plan(config: JobConfig) -> ClusterPlan:
    """The actor pool and decode tasks for the cluster Ray reports.

    On a CPU cluster the one actor takes half the CPUs and the decode tasks the rest. A single-CPU cluster
    (a small VM, a container limited to one core) splits its CPU in halves: an actor holding the only CPU left
    the decode tasks that feed it unscheduled, and the run waited for ever.
    """
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
        cpus = 1.0 if gpus else (float(cluster_cpus // 2) if cluster_cpus >= 2 else 0.5)
    if config.actors is not None:
        actors = config.actors
    elif gpus:
        actors = (1, max(1, int(cluster_gpus / gpus)))
    else:
        actors = (1, 1)
    decode_cpus = 0.5 if not gpus and cluster_cpus < 2 else 1.0
    return ClusterPlan(gpus, cpus, actors, decode_cpus)


class _Progress:
    """Progress lines; the rate counts from the run's start, as the summary's ``images_per_s`` does."""

    def __init__(self, total: int, every_s: float, started: float):
        self.total, self.every_s = total, every_s
        self.start, self.last = started, time.monotonic()
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


def _scored_stream(config: JobConfig, plan_files: list[str], fs, info: ModelInfo, cluster: ClusterPlan,
                   allowlist: Allowlist, operators: list[str]) -> Iterator[pa.Table]:
    """The scored rows, streamed from the cluster; ``operators`` gets Ray Data's operator names at the end."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.batch.stages import ScoreActor, prepare_plan_files

    gpus, cpus, actors, decode_cpus = cluster
    logger.info("actor pool: %d-%d actors, %g GPU and %g CPU each; %d images a batch", actors[0], actors[1], gpus,
                cpus, _batch_size(config, gpus))
    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = 1800 if gpus else 600
    # Ray Data's progress bars on a terminal; in a log (a Ray job, a CronJob) the job's own progress lines say
    # the same every --log-every seconds, where Ray Data would add a ten-line block every ten seconds.
    ctx.enable_progress_bars = sys.stderr.isatty()
    # An actor that dies in __init__ is replaced up to ten times in a row, then the run fails (Ray re-raises the
    # actor's error): a node lost while loading, or a pending actor the pool cancelled on a busy machine (Ray
    # reports that as an init death too), is survived; a load that always fails still ends the run. Weights
    # changed since the driver checked them end it at the first batch instead (ScoreActor.refusal).
    ctx.max_consecutive_actor_init_deaths = 10
    batch = _batch_size(config, gpus)
    # One decode task per plan file (see _write_plan_files); Ray's Parquet reader would merge small files.
    ds = ray.data.from_items([{"path": p} for p in plan_files], override_num_blocks=len(plan_files))
    # Reading and decoding run in CPU tasks, never fused into the scoring actor: on a GPU node the GPU must not
    # wait for a decode, nor the next decode for the GPU, and on CPU nodes the decode tasks use the CPUs the
    # actors leave free. Each decode task reserves the memory one image at --max-pixels may take while it is
    # prepared (``preprocess_peak_bytes``), so Ray never starts more decodes on a node than its memory holds;
    # that reservation also keeps Ray from fusing the task into the actor (it fuses operators only when their
    # resources match, as one CPU each would on a 2-core machine). The job reports the operators Ray ran
    # (``ray_operators`` in the summary).
    ds = ds.map_batches(prepare_plan_files, batch_format="pyarrow", batch_size=1,
                        fn_kwargs={"config": config.scorer_config(), "fs": fs, "batch_size": batch,
                                   "storage_options": dict(config.storage_options), "allowlist": allowlist,
                                   "max_bytes": config.max_bytes},
                        num_cpus=decode_cpus, memory=_decode_task_memory(config))
    ds = ds.map_batches(
        config.actor_class or ScoreActor, batch_format="pyarrow", batch_size=batch,
        fn_constructor_kwargs={"config": config.scorer_config(), "expected_model_id": info.model_id,
                               "num_threads": None if gpus else max(1, int(cpus))},
        # Ray Data restarts a dead actor and retries its batch by default (max_restarts / max_task_retries -1);
        # tests/test_faults.py kills one to keep that true.
        compute=ActorPoolStrategy(min_size=actors[0], max_size=actors[1]), num_gpus=gpus, num_cpus=cpus)
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    operators.extend(_operator_names(ds.stats()))


def _batch_size(config: JobConfig, gpus: float) -> int:
    """Images per batch in every stage: 16 on GPU actors (16 x 20 crops = 320 crops a GPU pass), else 8."""
    return config.batch_size or (16 if gpus else 8)


def _quiet_ray_logs() -> None:
    """Turn down Ray's lines that ask nothing of the user; Ray's errors and other warnings still show.

    The token-authentication notice (a local Ray started by the job keeps token authentication on, as Ray's
    default) and Ray Data's "progress bars disabled" notice (the job turns them off outside a terminal).
    """
    for name in ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _decode_task_memory(config: JobConfig) -> int:
    """Bytes a decode task reserves: one image at ``max_pixels`` being prepared, plus its encoded bytes."""
    return preprocess_peak_bytes(config.max_pixels) + min(config.max_bytes, 2 * config.max_pixels)


def _operator_names(stats: str) -> list[str]:
    """Ray Data's operators as its stats name them (``MapBatches(fetch_batch)->MapBatches(prepare_batch)``)."""
    names = re.findall(r"^Operator \d+ (.+?): ", stats, flags=re.M)
    return list(dict.fromkeys(names))




def _run_key(config: JobConfig, reader: ManifestReader, model_id: str, run_date: str, plan: Plan) -> str:
    """``<job>-<rows>``: the job part names manifest, model and options; the rows part the work itself.

    Of the model-specific options only those the scorer uses enter the job part (and of those, only those
    whose weights ``model_id`` does not already name; the score-changing ones it names when set stay in too):
    a student run is the same run whatever DGIQA's ``--crops`` says, so a resume never misses its staged shards
    over an option nothing read. DGIQA's keys hold the same fields as before the options were declared per
    scorer, so DGIQA runs resume across that change.

    The rows part hashes the manifest files' versions (ETags, or sizes and modification times) and the
    fingerprint of every row to write, so a manifest replaced at the same URI after a killed attempt starts
    staging afresh instead of reusing shards of the old one (which the commit then removes, as the same job's).
    """
    job = {"manifest": reader.source, "run_date": run_date, "model_id": model_id, "max_pixels": config.max_pixels,
           "max_bytes": config.max_bytes,
           "allow": sorted(config.allow_prefixes), "incremental": config.incremental,
           "shard_rows": config.shard_rows, "precision": config.precision, "limit": config.limit}
    for name in get_scorer(config.model).options:
        option, value = SCORER_OPTIONS[name], getattr(config, name)
        if not option.in_model_id and (option.keyed_at_default or value != option.default):
            job[name] = value
    job_key = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:12]
    rows = {"files": [list(f) for f in reader.files], "plan": plan.fingerprint}
    rows_key = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:12]
    return f"{job_key}-{rows_key}"


def _result_rows(batch: pa.Table, info: ModelInfo, run_id: str, scored_at: dt.datetime,
                 schema: pa.Schema) -> pa.Table:
    """Output rows (plus ``row_index``, ``shard``, ``read_retries``) from a batch of the plan or the scoring pool.

    Columns the batch lacks (scores of rows decided on the driver) are nulls; the run's constants are filled in.
    """
    n = batch.num_rows
    constants = {"model_id": info.model_id, "scorer": info.scorer, "weights_sha256": info.weights_sha256,
                 "aux_model": info.aux_model or None, "run_id": run_id, "scored_at": scored_at}
    columns = {}
    for f in schema:
        if f.name in constants:
            columns[f.name] = pa.repeat(pa.scalar(constants[f.name], f.type), n)
        elif f.name in batch.column_names:
            columns[f.name] = batch.column(f.name).cast(f.type)
        else:
            columns[f.name] = pa.nulls(n, f.type)
    table = pa.Table.from_pydict(columns, schema=schema)
    retries = batch.column("read_retries") if "read_retries" in batch.column_names else pa.nulls(n, pa.int32())
    return (table.add_column(0, "shard", batch.column("shard")).add_column(0, "row_index", batch.column("row_index"))
            .append_column("read_retries", retries))


class _ShardWriter:
    """Collects result rows by shard and stages each shard once all its rows are in.

    Holds only the shards in flight (rows of the batches the pool is working on), never the night.
    """

    def __init__(self, out: RunOutput, shard_rows: np.ndarray, done: Mapping[int, int]):
        self.out, self.shard_rows = out, shard_rows
        self.buffers: dict[int, list[pa.Table]] = {}
        self.buffered: dict[int, int] = {}
        self.written = np.zeros(len(shard_rows), bool)
        self.written[list(done)] = True
        self.dropped = 0  # result rows of retried work that were already in
        self.read_retries = 0  # transient read errors the written rows' reads recovered from

    def add(self, table: pa.Table) -> None:
        shards = table.column("shard")
        keys = pc.unique(shards).to_pylist()
        for k in keys:
            part = table if len(keys) == 1 else table.filter(pc.equal(shards, k))
            if self.written[k]:
                self.dropped += part.num_rows
                logger.warning("dropping %d result rows of shard %d, already written (retried work)",
                               part.num_rows, k)
                continue
            self.buffers.setdefault(k, []).append(part)
            self.buffered[k] = self.buffered.get(k, 0) + part.num_rows
            if self.buffered[k] >= self.shard_rows[k]:
                self._flush(k)

    def _flush(self, k: int) -> None:
        rows = pa.concat_tables(self.buffers.pop(k)).sort_by("row_index")
        index = rows.column("row_index").to_numpy()
        fresh = np.ones(len(index), bool)
        fresh[1:] = index[1:] != index[:-1]
        if not fresh.all():
            logger.warning("dropping %d duplicate result rows (retried work)", int((~fresh).sum()))
            self.dropped += int((~fresh).sum())
            rows = rows.filter(pa.array(fresh))
        if rows.num_rows < self.shard_rows[k]:
            self.buffers[k], self.buffered[k] = [rows], rows.num_rows
            return
        del self.buffered[k]
        self.read_retries += int(pc.sum(rows.column("read_retries")).as_py() or 0)
        self.out.write_shard(k, rows.drop_columns(["shard", "read_retries"]))
        self.written[k] = True

    def missing(self) -> int:
        """Rows of shards not yet written."""
        return int(self.shard_rows[~self.written].sum())


def _block_rows(rows: int, batch: int) -> int:
    """Rows per Ray block (one plan file each): 64 blocks or more, so every CPU gets work, of 8,192 rows at most.

    A block is the unit Ray reads and hands to one decode task, so small nights get blocks of one batch and
    results that stream back from the first minutes; 10^8 rows become about 12,000 files.
    """
    return max(batch, min(8192, -(-rows // 64)))


def _write_plan_files(out: RunOutput, rows: pa.RecordBatchReader, rows_per_file: int) -> list[str]:
    """The plan's rows to score as Parquet files in the run's staging: one file per Ray block.

    Each file is one decode task's work (``stages.prepare_plan_files``), so files of ``rows_per_file`` rows
    spread the night over the CPUs while each task streams its rows on a batch at a time. (Ray's Parquet
    reader merges small files into one block; a repartitioning task after it would hold a CPU for the whole
    night, which on a small node starves the decode tasks.)
    """
    folder = posixpath.join(out.staging, "plan")
    if out.fs.exists(folder):
        out.fs.rm(folder, recursive=True)
    out.fs.makedirs(folder, exist_ok=True)
    paths: list[str] = []
    pending: list[pa.RecordBatch] = []
    buffered = 0

    def flush(upto: int) -> None:
        nonlocal pending, buffered
        table = pa.Table.from_batches(pending, rows.schema)
        head, pending = table.slice(0, upto), table.slice(upto).to_batches()
        buffered -= head.num_rows
        paths.append(posixpath.join(folder, f"plan-{len(paths):06d}.parquet"))
        with out.fs.open(paths[-1], "wb") as f:
            pq.write_table(head, f, compression="zstd")

    for batch in rows:
        pending.append(batch)
        buffered += batch.num_rows
        while buffered >= rows_per_file:
            flush(rows_per_file)
    if buffered:
        flush(buffered)
    return paths


def run_job(config: JobConfig) -> dict:
    """Score a manifest into one ``run_date`` partition of the output, exactly once; returns the run summary.

    Started again with the same arguments after being killed, it resumes from the shards the killed attempt
    finished and still writes each row once (see ``pipeline.batch.output``).

    Raises:
        OutputError: The output cannot be written (checked first, before the manifest and the weights).
        ManifestError: The manifest cannot be used.
        WeightsError: The weights cannot be used (checked before any work), or they changed under the scoring
            actors during the run (nothing was committed).
        JobError: The run did not produce every row; nothing was committed.
    """
    started = time.monotonic()
    run_date = config.run_date or dt.datetime.now(dt.UTC).date().isoformat()
    check_writable(config.output, config.storage_options)  # before the weights: seconds, not minutes
    reader = open_manifest(config.manifest, config.storage_options)
    allowlist = Allowlist(config.allow_prefixes or (reader.home,))
    info = check_models(config.scorer_config())
    out_fs, out_root = fsspec.core.url_to_fs(config.output, **dict(config.storage_options))
    planner = PlannerConfig(memory_mb=config.plan_memory_mb, spill_dir=config.spill_dir)
    before = rss_bytes()
    with PeakRss() as planning:
        plan = make_plan(reader, allowlist, out_fs, out_root.rstrip("/"), info.model_id, run_date,
                         config.incremental, config.shard_rows, config.limit, planner)
    memory = {"before_planning": round(before / 2**20, 1), "planning_peak": round(planning.peak / 2**20, 1)}
    try:
        return _run_plan(config, reader, allowlist, info, plan, run_date, started, memory)
    finally:
        plan.close()


def _run_plan(config: JobConfig, reader: ManifestReader, allowlist: Allowlist, info: ModelInfo, plan: Plan,
              run_date: str, started: float, memory: dict) -> dict:
    run_key = _run_key(config, reader, info.model_id, run_date, plan)
    run_id = f"{run_date}-{run_key}"
    planned_s = time.monotonic() - started
    logger.info("run %s: %d manifest rows (%s) from %s planned in %.1fs; model %s; allowed prefixes %s", run_id,
                plan.manifest_rows, reader.kind, redact_uri(reader.source), planned_s, info.model_id,
                ", ".join(allowlist.prefixes))
    schema = output_schema(plan.extras)
    out = RunOutput(config.output, run_date, run_key, schema, config.storage_options)
    finished = out.finished_shards(dict(enumerate(plan.shard_rows.tolist())))
    if finished:
        logger.info("resuming: %d of %d shards (%d rows) were finished by an earlier attempt", len(finished),
                    len(plan.shard_rows), sum(finished.values()))
    scored_at = dt.datetime.now(dt.UTC)
    writer = _ShardWriter(out, plan.shard_rows, finished)
    for batch in plan.rows(scored=False, skip_shards=finished):
        writer.add(_result_rows(pa.Table.from_batches([batch]), info, run_id, scored_at, schema))
    to_score = int(plan.shard_rows[plan.decided_shards:][~writer.written[plan.decided_shards:]].sum())
    logger.info("%d to score now, %d done before by this model (skipped), %d rejected or refused on the driver",
                to_score, plan.done_before, plan.decided_rows)

    operators: list[str] = []
    if to_score:
        import ray

        if not ray.is_initialized():
            _quiet_ray_logs()
            ray.init(ignore_reinit_error=True)
        cluster = _cluster_plan(config)
        block = _block_rows(to_score, _batch_size(config, cluster[0]))
        plan_files = _write_plan_files(out, plan.rows(scored=True, skip_shards=finished), block)
        progress = _Progress(to_score, config.log_every_s, started)
        try:
            for batch in _scored_stream(config, plan_files, out.fs, info, cluster, allowlist, operators):
                rows = _result_rows(batch, info, run_id, scored_at, schema)
                writer.add(rows)
                progress.update(rows.num_rows,
                                int(pc.sum(pc.equal(rows.column("status"), STATUS_ERROR)).as_py() or 0))
        except Exception as exc:
            # Ray wraps the actor's own error in its actor-death errors; the message is what survives.
            reason = re.search(rf"{WEIGHTS_CHANGED}[^\n]*", str(exc))
            if reason:
                raise WeightsError(f"{reason.group(0)}; nothing was committed (rerun once the weights at "
                                   f"{redact_uri(config.weights)} are final)") from None
            raise
        logger.info("Ray Data operators: %s", " | ".join(operators))

    if writer.missing():
        raise JobError(f"run {run_id} produced no row for {writer.missing()} manifest rows; nothing was "
                       "committed, rerun to resume")
    statuses, reasons = out.staged_counts(config.plan_memory_mb)
    wall = time.monotonic() - started
    summary = {
        "run_id": run_id,
        "run_date": run_date,
        "manifest": redact_uri(reader.source),
        "manifest_rows": plan.manifest_rows,
        "allowed_prefixes": list(allowlist.prefixes),
        "max_bytes": config.max_bytes,
        "skipped_done_before": plan.done_before,
        "rows_written": plan.rows_to_write,
        "resumed_rows": sum(finished.values()),
        "duplicate_results_dropped": writer.dropped,
        "read_retries": writer.read_retries,
        "status_counts": {s: statuses.get(s, 0) for s in STATUSES},
        "error_reasons": reasons,
        "model": config.model,
        "model_id": info.model_id,
        "encoder": info.encoder,
        "score_scale": info.output_scale,
        "planning_s": round(planned_s, 3),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(to_score / wall, 4) if wall > 0 else None,
        "ray_operators": operators,
        "driver_peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
        "driver_rss_mib": memory,
    }
    summary["summary_path"] = out.commit(summary, config.plan_memory_mb)
    logger.info("run %s done: %s", run_id, {k: summary[k] for k in ("status_counts", "rows_written",
                                                                        "skipped_done_before", "wall_time_s")})
    return summary
