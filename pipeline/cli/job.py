"""The nightly scoring job's command line (``jobs/score_bucket.py``): its options, its config, its exit codes.

Exit codes: 0 every row written (some images may have failed: see the summary), 1 the run failed and
nothing was committed, 2 unusable arguments, manifest or weights. The parser is built from light modules;
Ray, Arrow and the models are imported once the arguments are parsed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.batch.allowlist import redact_text, redact_uri
from pipeline.cli.argtypes import int_range, positive_int
from pipeline.cli.scorer_args import add_scorer_arguments
from pipeline.limits import DEFAULT_PLAN_MEMORY_MB
from pipeline.scorers.registry import SCORER_OPTIONS, get_scorer, resolve_options

if TYPE_CHECKING:
    from pipeline.batch.job import JobConfig

PROG = "score_bucket.py"
DESCRIPTION = "Nightly scoring job: ``ray job submit --working-dir . -- python jobs/score_bucket.py --manifest ... ``."

logger = logging.getLogger("score_bucket")


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the job."""
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    p.add_argument("--manifest", help="manifest URI: CSV/Parquet/JSON Lines file or folder, S3 Inventory "
                                      "manifest.json, or a prefix of images")
    p.add_argument("--output", help="output root URI; results go to <output>/run_date=YYYY-MM-DD/")
    p.add_argument("--weights", help="URI of the scorer's checkpoint (DGIQA by default)")
    add_scorer_arguments(p, allow_prefix_default="the manifest's bucket or folder", depth_input_size=True)
    p.add_argument("--actors", type=int_range, help="scoring actors: N, or MIN,MAX to autoscale "
                                                   "(default: 1 to the number of GPUs; 1 on CPU)")
    p.add_argument("--gpus-per-actor", type=float, help="default: 1 when the Ray cluster has GPUs, else 0")
    p.add_argument("--cpus-per-actor", type=float, help="default: 1 with GPUs, else half the cluster's CPUs")
    p.add_argument("--batch-size", type=positive_int,
                   help="images per batch in every stage (16 with GPU actors, 8 on CPU)")
    p.add_argument("--run-date", help="partition value YYYY-MM-DD (default: today, UTC)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--incremental", dest="incremental", action="store_true", default=True,
                      help="skip images already scored ok by the same weights (default)")
    mode.add_argument("--full", dest="incremental", action="store_false", help="score every manifest row")
    p.add_argument("--limit", type=positive_int, help="score only the first N manifest rows (trial runs)")
    p.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines (30)")
    p.add_argument("--shard-rows", type=positive_int, default=1000,
                   help="rows per staged shard: the unit a killed run resumes from (1000)")
    p.add_argument("--plan-memory-mb", type=positive_int, default=DEFAULT_PLAN_MEMORY_MB,
                   help="memory the driver's planner and commit may use before spilling to disk (%(default)s)")
    p.add_argument("--spill-dir", help="local folder for the planner's database and spill files (default: the "
                                       "system's temporary folder); needs about 100 bytes per manifest row")
    p.add_argument("--demo", nargs="?", const="sample-bucket", metavar="FOLDER",
                   help="run on generated images and RANDOM weights written to FOLDER (default: sample-bucket)")
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> JobConfig:
    """The run's config from the arguments.

    Raises:
        ValueError: A model-specific option was given that ``--model`` does not use (checked before ``--demo``
            writes anything); ``main`` prints it as one line.
    """
    from pipeline.batch.job import JobConfig

    options = resolve_options(args.model, {name: getattr(args, name) for name in SCORER_OPTIONS})
    fields = {"manifest": args.manifest, "output": args.output, "weights": args.weights}
    if get_scorer(args.model).needs_depth:
        fields["depth_weights"] = options["depth_weights"]
    if args.demo:
        from pipeline.scoring.sample import write_demo_bucket

        demo = write_demo_bucket(Path(args.demo).resolve())
        logger.warning("demo run in %s with RANDOM weights: the scores mean nothing. Pass --weights and "
                       "--depth-weights with the published checkpoints for real scores.", args.demo)
        fields = {k: v or str(demo[k]) for k, v in fields.items()}
    missing = [f"--{k.replace('_', '-')}" for k, v in fields.items() if not v]
    if missing:
        parser.error(f"missing {', '.join(missing)} (or use --demo)")
    return JobConfig(
        **fields, encoder=options["encoder"], depth_version=options["depth_version"], crops=options["crops"],
        depth_input_size=options["depth_input_size"], exif_transpose=options["exif_transpose"],
        decode=options["decode"], trained_on=options["trained_on"],
        prompt_embeddings=options["prompt_embeddings"], clip_text=options["clip_text"], latent=options["latent"],
        actors=args.actors, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size, run_date=args.run_date,
        incremental=args.incremental, allow_prefixes=tuple(args.allow_prefix),
        storage_options=args.storage_options, limit=args.limit, log_every_s=args.log_every,
        max_pixels=args.max_pixels, max_bytes=args.max_bytes, shard_rows=args.shard_rows,
        precision=args.precision, compile=args.compile,
        attention=args.attention, draft_decode=options["draft_decode"], model=args.model,
        plan_memory_mb=args.plan_memory_mb, spill_dir=args.spill_dir)


def main(argv: list[str] | None = None) -> int:
    """Run the job; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.batch.job import JobError, run_job
    from pipeline.batch.manifest import ManifestError
    from pipeline.batch.output import HistoryUnreadable
    from pipeline.scoring.weights import WeightsError

    try:
        config = config_from_args(args, parser)
        logger.info("manifest %s -> output %s", redact_uri(config.manifest), redact_uri(config.output))
        summary = run_job(config)
    except (ManifestError, WeightsError, ValueError) as exc:
        print(f"{PROG}: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except (JobError, HistoryUnreadable) as exc:
        print(f"{PROG}: run failed: {redact_text(str(exc))}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0

