"""The report's thumbnails: which images may be read, reading and shrinking them on a few threads, one tile each.

Only ``ok`` rows' objects are read, and each is checked again before any request: a part file is data, and whoever
can write one under the output could otherwise make the report's host fetch any URI (another bucket,
``file:///etc/passwd``, the metadata service). The allowlist is ``--allow-prefix``, else the union of the
``allowed_prefixes`` that the selected runs recorded in their summaries; a row of a run that recorded none is not
read unless ``--allow-prefix`` is given. ``rejected`` rows are never read. Reads go through
``pipeline.batch.stages.read_image_bytes`` (no ``..``, no ``::`` chaining, no redirects, ``--max-bytes``). An image
that is refused or can no longer be read gets a tile saying why; the report never fails for one image.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

from pipeline.analysis.report.config import ReportConfig
from pipeline.analysis.report.depth import DepthMaps
from pipeline.batch.allowlist import Allowlist, RejectedURI, redact_text, redact_uri
from pipeline.batch.output import PARTITION
from pipeline.batch.resources import available_memory_bytes
from pipeline.batch.stages import read_image_bytes
from pipeline.limits import DEFAULT_MAX_BYTES
from pipeline.scoring.preprocess import PreparedImage, decode_image, prepare_image, preprocess_peak_bytes

THUMBNAIL_PX = 192
FETCH_THREADS = 8  # at most: object reads wait on the network; decoding releases the GIL


@dataclass(frozen=True)
class Tile:
    """One thumbnail of a grid (lowest, highest, or all), or the reason there is none.

    Attributes:
        uri: The image's URI.
        score: Its score.
        run_date: Partition of the row.
        model_id: Model that scored it.
        image: ``data:`` URI of the JPEG thumbnail; ``None`` when the image could not be shown.
        depth: ``data:`` URI of the grayscale depth-map thumbnail, when depth maps were asked for.
        problem: Why the image (or its depth map) is not shown.
    """

    uri: str
    score: float
    run_date: str
    model_id: str
    image: str | None = None
    depth: str | None = None
    problem: str | None = None


def _data_uri(image: Image.Image) -> str:
    image = image.copy()
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _describe(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file or object"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not an image"
    if isinstance(exc, ValueError):  # ImageError: the reader's or the decoder's own one-line reason
        return redact_text(str(exc))
    return redact_text(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class ThumbnailAccess:
    """Which thumbnails may be read: an allowlist, the runs it covers, and the byte limit.

    Attributes:
        allowlist: ``--allow-prefix``, else the union of the selected runs' recorded ``allowed_prefixes``;
            None when neither exists (nothing is read).
        runs: The ``run_id`` of every run whose rows the allowlist covers; None: every row (``--allow-prefix``).
        max_bytes: The byte limit per image.
    """

    allowlist: Allowlist | None
    runs: frozenset[str] | None
    max_bytes: int = DEFAULT_MAX_BYTES

    def refusal(self, run_id: str | None) -> str | None:
        """Why a row of ``run_id`` is not read at all, or None when its URI may be checked and read."""
        if self.allowlist is not None and (self.runs is None or run_id in self.runs):
            return None
        return (f"not read: run {run_id or '(unnamed)'} recorded no allowed prefixes in its summary; give "
                "--allow-prefix to show its images")


def thumbnail_access(config: ReportConfig, summaries: Sequence[Mapping]) -> ThumbnailAccess:
    """The allowlist of the report's reads, from ``--allow-prefix`` or from the runs' own summaries.

    Never from the rows themselves: a part file written by anyone would allow its own URIs. A summary's prefixes
    that are not plain prefixes are ignored, and a run with none usable counts as one that recorded none.
    """
    if config.allow_prefixes:
        return ThumbnailAccess(Allowlist(config.allow_prefixes), None, config.max_bytes)
    prefixes, runs = set(), set()
    for summary in summaries:
        recorded = summary.get("allowed_prefixes")
        usable = []
        for prefix in recorded if isinstance(recorded, list) else []:
            try:
                usable.append(Allowlist([prefix]).prefixes[0])
            except (RejectedURI, TypeError, ValueError):
                continue
        if usable and isinstance(summary.get("run_id"), str):
            prefixes.update(usable)
            runs.add(summary["run_id"])
    return ThumbnailAccess(Allowlist(prefixes) if prefixes else None, frozenset(runs), config.max_bytes)


def _fetch(uri: str, config: ReportConfig, access: ThumbnailAccess,
           keep_depth_input: bool) -> tuple[str | None, PreparedImage | None, str]:
    """Check, read, decode and shrink one image: ``(thumbnail, depth input or None, problem)``; never raises."""
    try:
        data = read_image_bytes(uri, config.storage_options, allowlist=access.allowlist, max_bytes=access.max_bytes)
        rgb = decode_image(data, config.preprocess)
        thumbnail = _data_uri(Image.fromarray(rgb))
        prepared = prepare_image(rgb, config.preprocess) if keep_depth_input else None
        return thumbnail, prepared, ""
    except RejectedURI as exc:
        return None, None, f"not read: {redact_text(str(exc))}"
    except Exception as exc:  # noqa: BLE001 - one unreadable image is a placeholder tile, never a failed report
        return None, None, f"cannot show this image: {_describe(exc)}"


def fetch_threads(config: ReportConfig, max_bytes: int, available: int | None = None) -> int:
    """Threads that read and decode thumbnails: up to ``FETCH_THREADS``, as many as half the free memory holds.

    Each thread may hold one image at ``--max-pixels`` being decoded (``preprocess_peak_bytes``) and its encoded
    bytes (at most ``--max-bytes``), so a report over 100-megapixel photos on a small machine decodes fewer at
    once rather than running out of memory.
    """
    available = available_memory_bytes() if available is None else available
    if available is None:
        return FETCH_THREADS
    per_image = preprocess_peak_bytes(config.preprocess.max_pixels, config.preprocess) + max_bytes
    return max(1, min(FETCH_THREADS, available // 2 // per_image))


def make_tiles(rows: list[dict], config: ReportConfig, access: ThumbnailAccess, depth: DepthMaps | None) -> list[Tile]:
    """A tile per row, in order; each image is read (and its depth map computed) once however often it is shown.

    A row of a run the allowlist does not cover gets a placeholder and its URI is not read for it.
    """
    refusals = [access.refusal(row.get("run_id")) for row in rows]
    uris = sorted({row["uri"] for row, refusal in zip(rows, refusals, strict=True) if refusal is None})
    with concurrent.futures.ThreadPoolExecutor(fetch_threads(config, access.max_bytes)) as pool:
        fetched = dict(zip(uris, pool.map(lambda u: _fetch(u, config, access, depth is not None), uris),
                           strict=True))
    shown: dict[str, tuple[str | None, str | None, str]] = {}
    for uri, (thumbnail, prepared, problem) in fetched.items():
        depth_uri = None
        if prepared is not None and depth is not None:
            try:
                depth_uri = _data_uri(Image.fromarray(depth.gray(prepared)))  # uint8 (H, W): gray
            except Exception as exc:  # noqa: BLE001 - the photo is still shown
                problem = f"no depth map: {redact_text(f'{type(exc).__name__}: {exc}')}"
        shown[uri] = (thumbnail, depth_uri, problem)
    tiles = []
    for row, refusal in zip(rows, refusals, strict=True):
        image, depth_map, problem = (None, None, refusal) if refusal is not None else shown[row["uri"]]
        tiles.append(Tile(uri=redact_uri(row["uri"]), score=row["score"], run_date=row[PARTITION],
                          model_id=row["model_id"], image=image, depth=depth_map, problem=problem or None))
    return tiles
