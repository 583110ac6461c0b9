"""Evaluation against human opinion scores: ``dgiqa evaluate`` and ``dgiqa separation``.

``evaluate`` joins a dataset's labels (``pipeline.analysis.labels``) with scores on ``uri`` and reports SROCC, PLCC,
KROCC and RMSE with bootstrap intervals (``pipeline.analysis.metrics``). The scores come from a job output (the latest
``ok`` row per image, through ``pipeline.analysis.query``), or from scoring the labelled images now: their URIs become
a manifest for ``pipeline.batch.job.run_job``, so evaluation scores exactly as the nightly job does.

``separation`` asks how well the scores tell a high-quality image set from a low-quality one, for collections
without opinion scores: Gaussian fits, their overlap coefficient and d', and an SVG of both distributions.

URIs are compared in the job's normalised form (``pipeline.batch.allowlist.normalize_uri``; local paths become
``file:///...``), so labels written with plain local paths match the scores the job wrote.

Scoring now reads images the label file names, and a label file is data: the job reads them through an allowlist
of ``--allow-prefix``, or by default the ``--images-prefix`` (else the label file's folder), never one derived
from the file's own URIs (a hostile row would allow itself), with the ``--max-bytes`` limit. A refused URI is a
``rejected`` row of the run, never a request; the result lists every image that got no score with its status and
reason (redacted: no ``user:password@``, no signed-URL query values).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.analysis.labels import (
    Labels,
    absolute_uri,
    default_allow_prefixes,
    read_labels,
)
from pipeline.analysis.metrics import (
    METRIC_LABELS,
    METRICS,
    MIN_PAIRS,
    MetricsResult,
    Separation,
    compute_metrics,
    density_separation,
)
from pipeline.analysis.svg import separation_svg
from pipeline.batch.allowlist import RejectedURI, normalize_uri, redact_text, redact_uri
from pipeline.batch.output import check_writable
from pipeline.limits import DEFAULT_MAX_BYTES

EXIT_USAGE = 2
EXIT_RUN_FAILED = 1
EXAMPLES = 5  # unmatched URIs shown to help find a wrong --images-prefix


class EvaluationError(ValueError):
    """Labels and scores cannot be evaluated together (too few pairs, several models); the message says why."""


@dataclass(frozen=True)
class ScoreSet:
    """One model's scores of images.

    Attributes:
        table: ``uri`` (string) and ``score`` (float64), one row per image.
        model_id: The model that gave them.
        source: Where they were read from (a job output URI).
        failures: The images the scoring run gave no score, each ``{"uri", "status", "error"}`` (redacted);
            empty when the scores were read from an earlier output.
        images: When only some images' scores were read (``read_scores(uris=...)``): how many images of the
            model have an ok score in the whole output; None when ``table`` holds them all.
    """

    table: pa.Table
    model_id: str | None
    source: str | None = None
    failures: tuple[dict, ...] = ()
    images: int | None = None


def join_key(uri: str) -> str:
    """The form a URI is matched in: the job's normalised one; relative local paths made absolute first."""
    text = uri.strip()
    if "://" not in text and not text.startswith("/"):
        text = os.path.abspath(text)
    try:
        return normalize_uri(text)
    except RejectedURI:
        return text


def read_scores(output: str, model_id: str | None = None, storage_options: Mapping | None = None,
                uris: Sequence[str] | None = None) -> ScoreSet:
    """The latest ``ok`` score of every image in a job output, or of the images ``uris`` names, for one model.

    With ``uris`` (a labelled set's images) the other images' scores stay in DuckDB: a history of 10^8 images
    evaluated against 10^4 labels brings 10^4 rows into Python, and ``ScoreSet.images`` counts the rest.

    Args:
        output: The job's output root URI.
        model_id: The model whose scores to use; may be left out when the output holds only one model's.
        storage_options: fsspec options.
        uris: Only these images (matched as ``join_key`` matches them); None for all.

    Raises:
        EvaluationError: Several models' scores and no ``model_id``, or none of the given model.
        QueryError: No scores there.
    """
    from pipeline.analysis import query

    dataset = query.open_scores(output, storage_options)
    flt = query.ScoreFilter(statuses=("ok",), model_id=model_id)
    if model_id is None:
        models = query.model_ids(dataset, flt)
        if len(models) > 1:
            raise EvaluationError(f"the scores at {output} come from {len(models)} models; choose one with "
                                  f"--model-id: {', '.join(models)}")
        flt = replace(flt, model_id=models[0] if models else None)
    keys = None if uris is None else pa.array(sorted({join_key(u) for u in uris if u}), pa.string())
    table, stats = query.select(dataset, flt, columns=["uri", "score"], uris=keys)
    if not (stats.rows_before_uris if keys is not None else table.num_rows):
        which = f" of model {model_id}" if model_id else ""
        raise EvaluationError(f"no ok scores{which} at {output}")
    scores = table.column("score").cast(pa.float64())
    return ScoreSet(pa.table({"uri": table.column("uri"), "score": scores}), flt.model_id, output,
                    images=stats.rows_before_uris)


def _run_failures(output: str, run_id: str, storage_options: Mapping | None) -> tuple[dict, ...]:
    """The rows of one run that have no score (``error``, ``rejected``), URIs and messages redacted."""
    from pipeline.analysis import query

    dataset = query.open_scores(output, storage_options)
    table = dataset.to_table(columns=["uri", "status", "error"],
                             filter=(pc.field("run_id") == run_id) & (pc.field("status") != "ok"))
    rows = sorted(table.to_pylist(), key=lambda r: (r["uri"] or ""))
    return tuple({"uri": redact_uri(r["uri"] or ""), "status": r["status"], "error": redact_text(r["error"] or "")}
                 for r in rows)


def score_labels(labels: Labels, weights: str, depth_weights: str, *, output: str | None = None, crops: int = 20,
                 depth_input_size: int = 518, storage_options: Mapping | None = None,
                 allow_prefixes: Sequence[str] = (), max_bytes: int = DEFAULT_MAX_BYTES, **job_options) -> ScoreSet:
    """Score the labelled images with a model, through the same job as the nightly runs, and read them back.

    The labelled URIs are written to a CSV manifest in a temporary folder (relative local paths made absolute,
    nothing resolved, so ``..`` reaches the allowlist and is refused). The run may read only below
    ``allow_prefixes``, by default ``pipeline.analysis.labels.default_allow_prefixes``: what the user named, never the
    label file's own URIs. Without ``output`` the scores go to a temporary folder removed afterwards; with one
    they are kept, and a rerun with the same weights scores only images not scored ``ok`` before.

    Args:
        labels: The labelled images.
        weights: URI of the DGIQA checkpoint.
        depth_weights: URI of the Depth Anything checkpoint.
        output: Job output root to keep the scores in.
        crops: Random 224x224 crops per image.
        depth_input_size: Lower bound of the depth model's input side (518 as published).
        storage_options: fsspec options for images, weights and output.
        allow_prefixes: Where images may be read from (``--allow-prefix``).
        max_bytes: The byte limit per image (``--max-bytes``).
        **job_options: Further ``pipeline.batch.job.JobConfig`` fields (``actors``, ``batch_size``, ``run_date``...).

    Raises:
        JobError: The run did not complete.
    """
    from pipeline.batch.job import JobConfig, run_job

    uris = [absolute_uri(u.strip()) for u in labels.table.column("uri").to_pylist()]
    prefixes = tuple(allow_prefixes) or default_allow_prefixes(labels)
    with tempfile.TemporaryDirectory(prefix="dgiqa-evaluate-") as folder:
        manifest = os.path.join(folder, "manifest.csv")
        pacsv.write_csv(pa.table({"uri": pa.array(uris, pa.string())}), manifest)
        target = output or os.path.join(folder, "scores")
        summary = run_job(JobConfig(manifest=manifest, output=target, weights=weights, depth_weights=depth_weights,
                                    crops=crops, depth_input_size=depth_input_size,
                                    allow_prefixes=prefixes, max_bytes=max_bytes,
                                    storage_options=dict(storage_options or {}), **job_options))
        failures = _run_failures(target, summary["run_id"], storage_options)
        try:
            scores = read_scores(target, summary["model_id"], storage_options, uris=uris)
        except EvaluationError:  # no ok score at all: the failures say why
            scores = ScoreSet(pa.table({"uri": pa.array([], pa.string()), "score": pa.array([], pa.float64())}),
                              summary["model_id"])
        return replace(scores, source=output, failures=failures)


@dataclass(frozen=True)
class EvaluationResult:
    """Metrics of one model on one labelled dataset, and how the two were matched.

    Attributes:
        metrics: SROCC, PLCC, KROCC, RMSE and their intervals.
        labels_source: The label file.
        layout: The label layout.
        label_column: The label column used.
        scores_source: The job output the scores came from (None when scored into a temporary folder).
        model_id: The model evaluated.
        labelled: Images with a label.
        scored: Images with an ok score.
        labels_without_score: Labelled images with no ok score (left out).
        scores_without_label: Scored images with no label (left out).
        examples_without_score: A few labelled URIs that had no score.
        failures: With ``--weights``: every image the run gave no score, with its status (``error``,
            ``rejected``) and reason.
    """

    metrics: MetricsResult
    labels_source: str
    layout: str
    label_column: str
    scores_source: str | None
    model_id: str | None
    labelled: int
    scored: int
    labels_without_score: int
    scores_without_label: int
    examples_without_score: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)

    @property
    def matched(self) -> int:
        """Pairs the metrics were computed on."""
        return self.metrics.n

    def to_dict(self) -> dict:
        """Plain JSON-ready values."""
        out = {k: v for k, v in asdict(self).items() if k != "metrics"}
        out["matched"] = self.matched
        out["metrics"] = self.metrics.to_dict()
        return out


def _keyed(uris: Sequence[str], what: str) -> dict[str, int]:
    keyed: dict[str, int] = {}
    for i, uri in enumerate(uris):
        key = join_key(uri)
        if key in keyed:
            raise EvaluationError(f"{what}: {uri!r} appears twice (as {uris[keyed[key]]!r} too)")
        keyed[key] = i
    return keyed


def evaluate(labels: Labels, scores: ScoreSet | pa.Table, *, bootstrap: int = 1000, confidence: float = 0.95,
             seed: int | None = 0) -> EvaluationResult:
    """Join labels and scores on URI and compute the metrics on the pairs.

    Args:
        labels: From ``pipeline.analysis.labels.read_labels``.
        scores: From ``read_scores``/``score_labels``, or a table with ``uri`` and ``score`` (and, if it holds
            several models' scores, ``model_id``: then it is refused, since one model is evaluated at a time).
        bootstrap: Resamples for the confidence intervals (0: none).
        confidence: Interval coverage.
        seed: Resampling seed.

    Raises:
        EvaluationError: Fewer than 3 labelled images with a score, or scores of several models.
        MetricsError: The pairs cannot be evaluated (all scores equal, ...).
    """
    if isinstance(scores, pa.Table):
        model_id = None
        if "model_id" in scores.column_names:
            models = sorted(set(scores.column("model_id").to_pylist()))
            if len(models) > 1:
                raise EvaluationError(f"the scores come from {len(models)} models; evaluate one at a time: "
                                      f"{', '.join(map(str, models))}")
            model_id = models[0] if models else None
        scores = ScoreSet(scores.select(["uri", "score"]), model_id)
    failures = list(scores.failures)
    score_values = scores.table.column("score").cast(pa.float64()).to_numpy(zero_copy_only=False)
    score_uris = scores.table.column("uri").to_pylist()
    usable = [i for i, v in enumerate(score_values) if v is not None and np.isfinite(v)]
    score_at = _keyed([score_uris[i] for i in usable], "scores")
    label_uris = labels.table.column("uri").to_pylist()
    label_values = labels.table.column("label").to_numpy()
    label_at = _keyed(label_uris, "labels")

    pairs = [(label_at[k], usable[i]) for k, i in score_at.items() if k in label_at]
    pairs.sort()
    missing = [label_uris[i] for k, i in label_at.items() if k not in score_at]
    if len(pairs) < MIN_PAIRS:
        hint = ""
        if missing and score_at:
            hint = (f"; labelled images look like {join_key(missing[0])!r}, scored ones like "
                    f"{next(iter(score_at))!r}: check --images-prefix")
        if failures:
            hint += "; not scored: " + "; ".join(f"{f['uri']} ({f['status']}: {f['error']})"
                                                  for f in failures[:EXAMPLES])
        raise EvaluationError(f"only {len(pairs)} of {len(label_at)} labelled images have an ok score (at least "
                              f"{MIN_PAIRS} are needed){redact_text(hint)}")
    scored = len(score_at) if scores.images is None else scores.images
    label_idx = np.array([p[0] for p in pairs])
    score_idx = np.array([p[1] for p in pairs])
    metrics = compute_metrics(score_values[score_idx], label_values[label_idx],
                              higher_is_better=labels.higher_is_better, bootstrap=bootstrap, confidence=confidence,
                              seed=seed)
    return EvaluationResult(metrics=metrics, labels_source=labels.source, layout=labels.layout,
                            label_column=labels.label_column, scores_source=scores.source, model_id=scores.model_id,
                            labelled=len(label_at), scored=scored, labels_without_score=len(missing),
                            scores_without_label=scored - len(pairs),
                            examples_without_score=[redact_uri(u) for u in missing[:EXAMPLES]], failures=failures)


@dataclass(frozen=True)
class SeparationResult:
    """Separation of two image sets by one model's scores.

    Attributes:
        separation: Gaussian fits, overlap coefficient and d'.
        high_scores: Scores of the high-quality set's images that had one.
        low_scores: The same for the low-quality set.
        high_without_score: Images of the high set with no ok score (left out).
        low_without_score: The same for the low set.
        model_id: The model.
        scores_source: The job output.
    """

    separation: Separation
    high_scores: np.ndarray
    low_scores: np.ndarray
    high_without_score: int
    low_without_score: int
    model_id: str | None
    scores_source: str | None

    def to_dict(self) -> dict:
        """Plain JSON-ready values (the scores themselves left out)."""
        return {"separation": self.separation.to_dict(), "high_without_score": self.high_without_score,
                "low_without_score": self.low_without_score, "model_id": self.model_id,
                "scores_source": self.scores_source}


def separate(scores: ScoreSet, high_uris: Sequence[str], low_uris: Sequence[str]) -> SeparationResult:
    """Look up both sets' scores and measure their separation (``pipeline.analysis.metrics.density_separation``).

    Raises:
        MetricsError: A set has fewer than two scored images, or all its scores are equal.
    """
    values = scores.table.column("score").cast(pa.float64()).to_numpy(zero_copy_only=False)
    by_key = {join_key(u): v for u, v in zip(scores.table.column("uri").to_pylist(), values, strict=True)
              if v is not None and np.isfinite(v)}
    found = {}
    for name, uris in (("high", high_uris), ("low", low_uris)):
        keys = dict.fromkeys(join_key(u) for u in uris if u)
        found[name] = (np.array([by_key[k] for k in keys if k in by_key], dtype=float),
                       sum(k not in by_key for k in keys))
    separation = density_separation(found["high"][0], found["low"][0])
    return SeparationResult(separation, found["high"][0], found["low"][0], found["high"][1], found["low"][1],
                            scores.model_id, scores.source)


def _write_text(uri: str, text: str, storage_options: Mapping) -> None:
    with fsspec.open(uri, "w", **storage_options) as f:
        f.write(text)


def format_result(result: EvaluationResult) -> str:
    """The human-readable report: where labels and scores came from, how they matched, and a metrics table."""
    m = result.metrics
    direction = "higher is better" if m.higher_is_better else "lower is better; correlations use negated labels"
    lines = [
        f"labels   {result.layout}: {redact_uri(result.labels_source)} ({result.label_column}, {direction})",
        f"scores   {redact_uri(result.scores_source or '') or 'scored now (temporary output)'}; model "
        f"{result.model_id}",
        f"pairs    {m.n} matched; {result.labels_without_score} labelled images without an ok score, "
        f"{result.scores_without_label} scores without a label",
    ]
    if result.examples_without_score:
        lines.append(f"         e.g. no score for {', '.join(result.examples_without_score[:3])}")
    if result.failures:
        by_status = Counter(f["status"] for f in result.failures)
        lines.append("not scored " + ", ".join(f"{n} {status}" for status, n in sorted(by_status.items())) + ":")
        lines += [f"         {f['status']:<8} {f['uri']}: {f['error']}" for f in result.failures[:EXAMPLES]]
        if len(result.failures) > EXAMPLES:
            lines.append(f"         ... and {len(result.failures) - EXAMPLES} more (all in --json)")
    if not m.mapping.converged:
        lines.append(f"note     {m.mapping.message}: PLCC (logistic) and RMSE use a straight line instead")
    ci = f"{m.confidence:.0%} CI" if m.bootstrap else "CI"
    lines += ["", f"{'metric':<16} {'value':>9}  {ci}"]
    for name in METRICS:
        est = getattr(m, name)
        interval = f"[{est.low:.4f}, {est.high:.4f}]" if est.low is not None else "-"
        lines.append(f"{METRIC_LABELS[name]:<16} {est.value:>9.4f}  {interval}")
    if m.bootstrap:
        lines.append(f"({m.bootstrap} bootstrap resamples, seed {m.seed})")
    return "\n".join(lines)


def format_separation(result: SeparationResult) -> str:
    """The human-readable separation report."""
    s = result.separation
    lines = [f"scores   {result.scores_source}; model {result.model_id}", "",
             f"{'set':<6} {'n':>7} {'mean':>8} {'std':>8}  without score"]
    for name, fit, missing in (("high", s.high, result.high_without_score), ("low", s.low, result.low_without_score)):
        lines.append(f"{name:<6} {fit.n:>7} {fit.mean:>8.4f} {fit.std:>8.4f}  {missing}")
    lines += ["", f"overlap coefficient  {s.overlap:.4f}", f"d'                   {s.d_prime:.4f}"]
    return "\n".join(lines)


def _fail(prog: str, exc: BaseException, code: int = EXIT_USAGE) -> int:
    """Print ``exc`` as ``dgiqa``'s one error line (``allowlist.error_line``) and return the exit code."""
    from pipeline.batch.allowlist import error_line

    print(f"{prog}: error: {error_line(exc)}", file=sys.stderr)
    return code


def evaluate_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``dgiqa evaluate`` from its parsed options; returns the exit code (errors are one line)."""
    if args.weights and not args.depth_weights:
        parser.error("--weights needs --depth-weights")
    if args.scores:
        given = [f"--{name.replace('_', '-')}" for name in ("depth_weights", "output") if getattr(args, name)]
        if given:
            parser.error(f"{' and '.join(given)} apply only when scoring with --weights")
    elif args.model_id:
        parser.error("--model-id applies to --scores; with --weights the model is the one given")
    if args.scores and args.allow_prefix:
        parser.error("--allow-prefix applies only when scoring with --weights")
    try:
        # Outputs first: a typo in --out must not cost a scoring run, or minutes of reading labels and scores.
        if args.out:
            check_writable(args.out, args.storage_options, flag="--out", folder=False)
        if args.output:
            check_writable(args.output, args.storage_options, flag="--output")
        labels = read_labels(args.labels, args.layout, args.images_prefix, label_column=args.label_column,
                             uri_column=args.uri_column, lower_is_better=args.lower_is_better,
                             keep_training_images=args.keep_training_images, storage_options=args.storage_options)
        if args.scores:
            scores = read_scores(args.scores, args.model_id, args.storage_options,
                                 uris=labels.table.column("uri").to_pylist())
        else:
            from pipeline.batch.job import JobError

            try:
                scores = score_labels(labels, args.weights, args.depth_weights, output=args.output, crops=args.crops,
                                      depth_input_size=args.depth_input_size, storage_options=args.storage_options,
                                      allow_prefixes=args.allow_prefix, max_bytes=args.max_bytes)
            except JobError as exc:
                return _fail(parser.prog, exc, EXIT_RUN_FAILED)
        result = evaluate(labels, scores, bootstrap=args.bootstrap, confidence=args.confidence, seed=args.seed)
        document = json.dumps(result.to_dict(), indent=2, sort_keys=True)
        if args.out:
            _write_text(args.out, document + "\n", args.storage_options)
    except (ValueError, OSError) as exc:
        return _fail(parser.prog, exc)
    print(document if args.json else format_result(result))
    return 0


def separation_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``dgiqa separation`` from its parsed options; returns the exit code (errors are one line)."""
    from pipeline.batch.manifest import read_manifest

    try:
        if args.plot:  # before the scores and manifests are read
            check_writable(args.plot, args.storage_options, flag="--plot", folder=False)
        sets = [read_manifest(m, args.storage_options).table.column("uri").to_pylist() for m in (args.high, args.low)]
        scores = read_scores(args.scores, args.model_id, args.storage_options, uris=sets[0] + sets[1])
        result = separate(scores, *sets)
        if args.plot:
            svg = separation_svg(result.high_scores, result.low_scores, result.separation, bins=args.bins)
            _write_text(args.plot, svg, args.storage_options)
    except (ValueError, OSError) as exc:
        return _fail(parser.prog, exc)
    print(json.dumps(result.to_dict(), indent=2, sort_keys=True) if args.json else format_separation(result))
    return 0
