"""What a report is asked for (``ReportConfig``), checked when built, and the one error a bad request raises."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.batch.run_dates import check_run_date
from pipeline.limits import DEFAULT_MAX_BYTES
from pipeline.models import depth_anything as da
from pipeline.scoring.preprocess import PreprocessConfig
from pipeline.scoring.scorer import DEVICE_CHOICES, ENCODER_CHOICES


class ReportError(ValueError):
    """The report cannot be made as asked (nothing selected, bad dates); the message says why in one line."""


@dataclass(frozen=True)
class ReportConfig:
    """What to report on and what to show; cheap to build.

    Attributes:
        output: Output root URI of the scoring job (holds ``run_date=YYYY-MM-DD/`` partitions).
        run_date: Report on this one partition.
        date_from: First partition of a range (inclusive); alone, the range runs to the newest partition.
        date_to: Last partition of a range (inclusive); alone, the range starts at the oldest partition.
            With no date at all, the newest partition (holding rows of ``model_id``, if given) is reported.
        model_id: Only rows of this model; default all, and the page says when there are several.
        thumbnails: Lowest- and highest-scoring ``ok`` images shown, each; 0 reads no image at all. With fewer
            than twice as many ``ok`` rows, each is shown once in one grid (two would repeat the same images).
        depth_weights: Depth Anything checkpoint URI; when given, each thumbnail has its depth map beside it.
        encoder: Depth Anything encoder, or ``auto`` to read it from the checkpoint.
        depth_version: ``v1`` or ``v2``, as the scores were made with.
        device: Where the depth model runs: ``auto``, ``cpu`` or ``cuda``.
        preprocess: Decode limits and depth-input size; the scoring defaults, so the depth map is the one
            DGIQA saw.
        storage_options: fsspec options for the output, the images and the weights.
        allow_prefixes: Where thumbnails may be read from; empty for the ``allowed_prefixes`` the selected runs
            recorded in their summaries (rows of runs that recorded none are then not read).
        max_bytes: The byte limit per image read for a thumbnail.
    """

    output: str
    run_date: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    model_id: str | None = None
    thumbnails: int = 12
    depth_weights: str | None = None
    encoder: str = "auto"
    depth_version: str = "v1"
    device: str = "auto"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    storage_options: Mapping | None = None
    allow_prefixes: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self):
        for name in ("run_date", "date_from", "date_to"):
            value = getattr(self, name)
            if value is not None:
                check_run_date(value, name, ReportError)
        if self.run_date is not None and (self.date_from is not None or self.date_to is not None):
            raise ReportError("give either a run date or a range (from/to), not both")
        if self.date_from is not None and self.date_to is not None and self.date_from > self.date_to:
            raise ReportError(f"the range starts after it ends: from {self.date_from} to {self.date_to}")
        if self.thumbnails < 0:
            raise ReportError(f"thumbnails must be 0 or more, got {self.thumbnails}")
        if self.encoder not in ENCODER_CHOICES:
            raise ReportError(f"encoder must be one of {', '.join(ENCODER_CHOICES)}, got {self.encoder!r}")
        if self.device not in DEVICE_CHOICES:
            raise ReportError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        if self.depth_version not in da.VERSIONS:
            raise ReportError(f"depth_version must be one of {', '.join(da.VERSIONS)}, got {self.depth_version!r}")
        if self.max_bytes < 1:
            raise ReportError(f"max_bytes must be at least 1, got {self.max_bytes}")
