"""Training data for fine-tuning DGIQA: label normalisation, held-out splits, the depth-map cache and crops.

DGIQA ends in a sigmoid, so it is trained on labels in [0, 1]. ``LabelMap`` is the affine map from a dataset's
opinion scores to that range, chosen per layout from the scale the dataset publishes (so two runs on the same
dataset share one map, whatever images each keeps) and recorded with every checkpoint, so a predicted score
can be turned back into the dataset's units:

* ``koniq``: ``MOS_zscore`` / 100 (0-100), or ``(MOS - 1) / 4`` with ``--label-column MOS``;
* ``kadid``: ``(dmos - 1) / 4`` (a 1-5 rating, higher is better despite the name);
* ``live-challenge``: ``MOS / 100``; ``spaq``: ``MOS / 100`` (its attribute columns too);
* ``generic`` or any other column: min-max over the label file's labels, unless ``--label-range LO,HI``.

Lower-is-better labels are flipped (``1 - x``) so a higher prediction always means better quality.

Depth maps: Depth Anything is too slow to run in every training step, and its output does not change, so each
image's map is computed once and stored as a grayscale PNG at ``<cache>/<depth model label>/input<N>-short<S>/
<sha1>.png``. The folder names the depth weights (by SHA-256) and the two sizes that change the map; the file
name is the SHA-1 of the image URI and its version (S3 ETag, else modification time, and size), so a replaced
image gets a new map and a rerun reuses every map it can. The PNG holds exactly what inference crops from: the
map resized bilinearly to the image's 384-short-side size. PNG is lossless and a few tens of KB per image.

Image reads: every image URI comes from a label file, which is data, so each one is checked against an
``ImageAccess`` (an allowlist and a byte limit) before anything is asked about it, the metadata request of the
depth cache included. A refused URI is skipped with status ``rejected`` and its reason, and no request is made;
a local symlink leading out of the allowed folders is refused too, and an HTTP image is read once (redirects
refused) rather than asked for its metadata, which would follow redirects. Messages are redacted
(``pipeline.batch.allowlist.redact_text``) so signed-URL query values never reach a log or a summary.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import posixpath
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import torch
from PIL import Image

from pipeline.analysis.labels import LIVE_MOS, LabelError, Labels, absolute_uri
from pipeline.analysis.metrics import finite_or_none
from pipeline.batch.allowlist import Allowlist, RejectedURI, redact_text, redact_uri
from pipeline.batch.error_reasons import error_reason
from pipeline.batch.objects import ObjectTooLarge
from pipeline.batch.output import atomic_target
from pipeline.batch.stages import read_image_bytes
from pipeline.limits import DEFAULT_MAX_BYTES
from pipeline.scoring.depth import depth_passes
from pipeline.scoring.preprocess import (
    ImageError,
    PreprocessConfig,
    decode_for_scoring,
    normalize_to_tensor,
    prepare_bytes,
    quality_inputs,
    resize_short_side,
)

logger = logging.getLogger(__name__)

# Published scale of each (layout, label column): the affine map sends LO to 0 and HI to 1.
SPAQ_COLUMNS = ("MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness")
LABEL_RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("koniq", "MOS_zscore"): (0.0, 100.0),
    ("koniq", "MOS"): (1.0, 5.0),
    ("kadid", "dmos"): (1.0, 5.0),
    ("live-challenge", LIVE_MOS): (0.0, 100.0),
    **{("spaq", column): (0.0, 100.0) for column in SPAQ_COLUMNS},
}
# A label this far outside [0, 1] after normalisation means the range does not fit the data.
RANGE_SLACK = 1e-9
STATUS_CACHED, STATUS_COMPUTED, STATUS_FAILED, STATUS_REJECTED = "cached", "computed", "failed", "rejected"
UNUSABLE = (STATUS_FAILED, STATUS_REJECTED)


@dataclass(frozen=True)
class ImageAccess:
    """Where training images may be read from, and how large they may be; cheap to pickle to every worker.

    Attributes:
        allowlist: The allowed prefixes (``--allow-prefix``, else ``pipeline.analysis.labels.default_allow_prefixes``).
        max_bytes: The byte limit per image (``--max-bytes``).
    """

    allowlist: Allowlist
    max_bytes: int = DEFAULT_MAX_BYTES

    def check(self, uri: str) -> str:
        """The normalised URI of an allowed image; a local path is resolved and must stay in the allowed folders.

        Raises:
            RejectedURI: Not allowed; nothing was requested.
        """
        target = self.allowlist.check(absolute_uri(uri))
        if target.startswith("file://"):
            path = target[len("file://"):]
            resolved = os.path.realpath(path)
            if resolved != path and not self.allowlist.allows_resolved("file://" + resolved):
                raise RejectedURI(f"{target} is a link that leads outside the allowed prefixes")
        return target

    def read(self, uri: str, storage_options: Mapping | None = None) -> bytes:
        """The image's bytes through ``pipeline.batch.stages.read_image_bytes`` (allowlist, byte limit, retries).

        Raises:
            RejectedURI: Not allowed; nothing was requested.
            ImageError: Missing, over the limit or unreadable, in one redacted line.
        """
        return read_image_bytes(self.check(uri), storage_options, allowlist=self.allowlist,
                                max_bytes=self.max_bytes)


@dataclass(frozen=True)
class LabelMap:
    """The reversible affine map from a dataset's labels to DGIQA's [0, 1] targets.

    ``target = (label - lo) / (hi - lo)``, then ``1 - target`` when lower labels are better.

    Attributes:
        lo: Label value sent to 0 (to 1 when flipped).
        hi: Label value sent to 1 (to 0 when flipped).
        higher_is_better: False for DMOS-like labels, which are flipped.
        rule: How ``lo`` and ``hi`` were chosen, for the logs (``"koniq MOS_zscore: published 0..100"``).
    """

    lo: float
    hi: float
    higher_is_better: bool = True
    rule: str = ""

    def __post_init__(self):
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or self.hi <= self.lo:
            raise LabelError(f"label range must be two finite numbers LO < HI, got {self.lo:g},{self.hi:g}")

    def normalize(self, labels: Sequence[float] | np.ndarray) -> np.ndarray:
        """Dataset labels -> training targets in [0, 1]."""
        target = (np.asarray(labels, dtype=np.float64) - self.lo) / (self.hi - self.lo)
        return target if self.higher_is_better else 1.0 - target

    def denormalize(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """Predicted scores (or targets) in [0, 1] -> the dataset's label scale."""
        target = np.asarray(scores, dtype=np.float64)
        if not self.higher_is_better:
            target = 1.0 - target
        return self.lo + target * (self.hi - self.lo)

    def to_dict(self) -> dict:
        """JSON-ready form, with the formula spelled out for readers of the sidecar files."""
        flip = "" if self.higher_is_better else "1 - "
        return {**asdict(self), "target": f"{flip}(label - {self.lo:g}) / ({self.hi:g} - {self.lo:g})",
                "label": f"{self.lo:g} + ({flip}score) * ({self.hi:g} - {self.lo:g})"}

    @classmethod
    def from_dict(cls, data: Mapping) -> LabelMap:
        """Inverse of ``to_dict`` (extra keys are ignored)."""
        return cls(lo=float(data["lo"]), hi=float(data["hi"]), higher_is_better=bool(data["higher_is_better"]),
                   rule=str(data.get("rule", "")))


def label_map_for(labels: Labels, label_range: tuple[float, float] | None = None) -> LabelMap:
    """The map for a dataset: ``label_range`` if given, else its published scale, else min-max of its labels.

    Raises:
        LabelError: The labels do not fit the range, or are all equal (nothing to learn from).
    """
    values = np.asarray(labels.table.column("label").to_numpy(), dtype=np.float64)
    direction = "" if labels.higher_is_better else ", lower is better (flipped)"
    if label_range is not None:
        lo, hi = label_range
        rule = f"--label-range {lo:g},{hi:g}"
    elif (labels.layout, labels.label_column) in LABEL_RANGES:
        lo, hi = LABEL_RANGES[(labels.layout, labels.label_column)]
        rule = f"{labels.layout} {labels.label_column}: published scale {lo:g}..{hi:g}"
    else:
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            raise LabelError(f"every label in {labels.source} is {lo:g}; there is nothing to learn from")
        rule = f"{labels.layout} {labels.label_column}: min-max of the labels {lo:g}..{hi:g}"
    label_map = LabelMap(lo=float(lo), hi=float(hi), higher_is_better=labels.higher_is_better, rule=rule + direction)
    target = label_map.normalize(values)
    if target.min() < -RANGE_SLACK or target.max() > 1 + RANGE_SLACK:
        raise LabelError(f"labels of {labels.source} run from {values.min():g} to {values.max():g}, outside the "
                         f"range {lo:g}..{hi:g} ({rule}); give the dataset's scale with --label-range LO,HI")
    return label_map


def split_indices(n: int, val_fraction: float, seed: int,
                  groups: Sequence[Hashable | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random ``(train, val)`` split of ``range(n)`` that keeps every group on one side.

    Rows of one group (``Labels.groups``: one scene, e.g. the distorted versions of one reference image) all
    land on the same side, so no held-out image shows a scene the model was trained on. The groups are shuffled
    with ``seed`` and taken into the held-out set until it holds at least ``round(n * val_fraction)`` rows, so it
    may hold up to one group's size more. Rows without a group (``groups`` None, or a None entry) are groups of
    their own; without any groups the split is the plain row shuffle. The same rows, groups and seed give the
    same split.

    The split is drawn over the label file's rows before any image is dropped, so an image that fails to
    decode never moves the others between train and val.

    Raises:
        ValueError: The fraction leaves no training image or fewer than 3 held-out ones.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction:g}")
    if groups is not None and len(groups) != n:
        raise ValueError(f"{len(groups)} groups given for {n} rows")
    members: list[list[int]] = []  # row indices of each group, groups in order of first appearance
    first: dict[Hashable, int] = {}
    for i in range(n):
        group = None if groups is None else groups[i]
        if group is None:
            members.append([i])
        elif group in first:
            members[first[group]].append(i)
        else:
            first[group] = len(members)
            members.append([i])
    wanted = int(round(n * val_fraction))
    val: list[int] = []
    for g in np.random.default_rng(seed).permutation(len(members)):
        if len(val) >= wanted:
            break
        val.extend(members[g])
    n_val = len(val)
    if n_val < 3 or n - n_val < 1:
        grouped = f" ({len(members)} groups)" if first else ""
        raise ValueError(f"{n} labelled images{grouped} with --val-fraction {val_fraction:g} give {n - n_val} "
                         f"training and {n_val} held-out images; at least 1 and 3 are needed")
    held_out = np.zeros(n, bool)
    held_out[val] = True
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


@dataclass(frozen=True)
class DepthCache:
    """Where the depth maps of one depth model and preprocessing live.

    Attributes:
        root: Cache root URI (``--depth-cache``).
        model_label: ``DepthWeights.label`` of the depth model (``depth-anything-v1-vits@<sha256>``).
        preprocess: Sizes that change a map: the depth input's lower bound and the short side.
        storage_options: fsspec options for the cache and the images.
    """

    root: str
    model_label: str
    preprocess: PreprocessConfig
    storage_options: Mapping | None = None

    @property
    def folder(self) -> str:
        """``<root>/<model label>/input<N>-short<S>``."""
        sizes = f"input{self.preprocess.depth_input_size}-short{self.preprocess.short_side}"
        return posixpath.join(self.root.rstrip("/"), self.model_label, sizes)

    def path(self, uri: str, version: str) -> str:
        """The PNG of an image URI at a version (see ``image_version``)."""
        key = hashlib.sha1(f"{uri}\n{version}".encode()).hexdigest()
        return posixpath.join(self.folder, f"{key}.png")


def image_version(info: Mapping) -> str:
    """What identifies an image's content without reading it: S3 ETag, else modification time; and the size."""
    etag = info.get("ETag") or info.get("etag")
    stamp = str(etag).strip('"') if etag else str(info.get("mtime") or info.get("LastModified") or info.get("created")
                                                   or "")
    return f"{stamp}|{info.get('size')}"


def write_png(path: str, gray: np.ndarray, storage_options: Mapping | None = None) -> None:
    """Write a uint8 map as PNG; locally through a temporary name, so a killed run leaves no half file."""
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, "PNG")
    atomic_write(path, buffer.getvalue(), storage_options)


def atomic_write(path: str, data: bytes, storage_options: Mapping | None = None) -> None:
    """Write bytes so that readers see the old file or the new one, never a part.

    Object stores replace an object in one request; on a file system the bytes go to a temporary name first
    (``output.atomic_target``).
    """
    fs, local = fsspec.core.url_to_fs(path, **(storage_options or {}))
    fs.makedirs(posixpath.dirname(local), exist_ok=True)
    with atomic_target(fs, local) as target:
        fs.pipe_file(target, data)


def read_png(path: str, storage_options: Mapping | None = None) -> np.ndarray:
    """A cached depth map as a uint8 ``(H, W)`` array."""
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        return np.asarray(Image.open(io.BytesIO(f.read())).convert("L"))


class DepthMapper:
    """Finds or computes the cached depth map of each image; the depth model is built only if one is missing.

    Runs on the driver or as a Ray actor (one model load, many chunks). A chunk whose maps are all cached never
    builds the model, so a rerun costs one metadata request per image (a read, for HTTP images). Each URI is
    checked against ``access`` before that request.

    Args:
        weights: ``scorer.DepthWeights`` (read and hashed on the driver), or a one-element list holding its Ray
            object reference, fetched only when a map has to be computed.
        cache: Where the maps go.
        device: ``cpu`` or ``cuda``.
        batch: Same-size depth inputs per forward pass.
        access: Where images may be read from and their byte limit.
    """

    def __init__(self, weights, cache: DepthCache, device: str = "cpu", batch: int = 4, *, access: ImageAccess):
        self.weights = weights
        self.cache = cache
        self.access = access
        self.device = torch.device(device)
        self.batch = batch
        self.model = None
        self.forwards = 0  # depth-model forward passes run, for the run summary

    def _model(self):
        if self.model is None:
            weights = self.weights
            if isinstance(weights, list):
                import ray

                weights = ray.get(weights[0])
            self.model = weights.build().to(self.device).eval()
        return self.model

    def run(self, uris: Sequence[str]) -> list[dict]:
        """One result per URI: ``uri``, ``depth_path``, ``status`` (cached/computed/failed/rejected), ``error``."""
        options = self.cache.storage_options
        results: list[dict] = []
        missing: list[tuple[int, str, object]] = []
        for uri in uris:
            row = {"uri": uri, "depth_path": None, "status": STATUS_FAILED, "error": None}
            results.append(row)
            try:
                target = self.access.check(uri)
                data = None
                if target.startswith(("http://", "https://")):  # a HEAD would follow redirects: read once instead
                    data = self.access.read(target, options)
                    version = "sha1:" + hashlib.sha1(data).hexdigest()
                else:
                    fs, path = fsspec.core.url_to_fs(target, **(options or {}))
                    info = fs.info(path)
                    if info.get("size") is not None and info["size"] > self.access.max_bytes:
                        raise ObjectTooLarge(target, info["size"], self.access.max_bytes)
                    version = image_version(info)
                row["depth_path"] = self.cache.path(uri, version)
                if _exists(row["depth_path"], options):
                    row["status"] = STATUS_CACHED
                    continue
                prepared = self._prepare(data if data is not None else self.access.read(target, options))
            except RejectedURI as exc:
                row["status"], row["error"] = STATUS_REJECTED, redact_text(str(exc))
                continue
            except FileNotFoundError:
                row["error"] = f"no such file or object: {redact_uri(uri)}"
                continue
            except (ImageError, ObjectTooLarge) as exc:
                row["error"] = redact_text(str(exc))
                continue
            except OSError as exc:
                row["error"] = redact_text(f"cannot read {uri}: {exc}")
                continue
            missing.append((len(results) - 1, row["depth_path"], prepared))
        self._compute(results, missing)
        return results

    def _prepare(self, data: bytes):
        """The CPU-side input of ``_compute`` for one image's bytes.

        Raises:
            ImageError: The bytes are not a usable image.
        """
        return prepare_bytes(data, self.cache.preprocess)

    @torch.inference_mode()
    def _compute(self, results: list[dict], missing: list[tuple[int, str, object]]) -> None:
        if not missing:
            return
        for done in depth_passes(self._model(), [p for _, _, p in missing], self.device, self.batch):
            self.forwards += 1
            for k, full in done:
                i, path, _ = missing[k]
                write_png(path, resize_short_side(full, self.cache.preprocess), self.cache.storage_options)
                results[i]["status"] = STATUS_COMPUTED

    def forward_count(self) -> int:
        """Depth-model forward passes this mapper ran (0 when every map was cached)."""
        return self.forwards


def _exists(path: str, storage_options: Mapping | None) -> bool:
    fs, local = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs.exists(local)


DEPTH_CHUNK = 32  # images per actor call: enough to amortise a call, small enough to balance the actors


@dataclass(frozen=True)
class DepthWorkers:
    """Who computes missing depth maps.

    Attributes:
        actors: Ray actors (each loads the model once, only if a map is missing); 0 computes on the driver.
        cpus: CPUs per actor.
        gpus: GPUs per actor; 0 runs the depth model on CPUs.
        batch: Same-size depth inputs per forward pass.
    """

    actors: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    batch: int = 4

    @property
    def device(self) -> str:
        """Where the depth model runs."""
        return "cuda" if self.gpus > 0 else "cpu"


def precompute_depth(uris: Sequence[str], weights, cache: DepthCache, workers: DepthWorkers = DepthWorkers(), *,
                     access: ImageAccess, mapper: type = DepthMapper, what: str = "depth maps",
                     ) -> tuple[dict[str, dict], dict]:
    """Find or compute the cached depth map of every image, on Ray actors (or on the driver).

    Args:
        uris: The images.
        weights: ``scorer.DepthWeights`` of the depth model (read and hashed once, on the driver).
        cache: Where the maps are.
        workers: Actors and their resources.
        access: Where images may be read from; a refused image is skipped as ``rejected``, unread.
        mapper: The class that finds or computes one chunk's entries (``DepthMapper``; DPAM-IQA's superpixel
            features use ``pipeline.training.dpam_data.SuperpixelMapper``, which takes the same arguments).
        what: What the entries are, for the log.

    Returns:
        Results by URI (``depth_path``, ``status``, ``error``) and the cache statistics for the summary.
    """
    actors = workers.actors
    parts = list(chunks(list(uris), DEPTH_CHUNK))
    logger.info("%s of %d images in %s (%s)", what, len(uris), redact_uri(cache.folder),
                f"{min(actors, len(parts))} actors" if actors else "on the driver")
    results: list[dict] = []
    if actors == 0:
        local = mapper(weights, cache, workers.device, workers.batch, access=access)
        for part in parts:
            results.extend(local.run(part))
        forwards = local.forwards
    else:
        import ray
        from ray.util import ActorPool

        options = {"num_cpus": workers.cpus}
        if workers.gpus:
            options["num_gpus"] = workers.gpus
        remote = ray.remote(mapper).options(**options)
        weights_ref = ray.put(weights)
        handles = [remote.remote([weights_ref], cache, workers.device, workers.batch, access=access)
                   for _ in range(max(1, min(actors, len(parts))))]
        try:
            for done, part in enumerate(ActorPool(handles).map_unordered(lambda a, c: a.run.remote(c), parts), 1):
                results.extend(part)
                if done % 10 == 0 or done == len(parts):
                    logger.info("%s: %d/%d images", what, len(results), len(uris))
            forwards = sum(ray.get([h.forward_count.remote() for h in handles]))
        finally:
            for handle in handles:
                ray.kill(handle)
    statuses = [r["status"] for r in results]
    stats = {"folder": cache.folder, "computed": statuses.count(STATUS_COMPUTED),
             "reused": statuses.count(STATUS_CACHED), "failed": statuses.count(STATUS_FAILED),
             "rejected": statuses.count(STATUS_REJECTED), "depth_forward_passes": forwards,
             "skipped_reasons": describe_failures(results)}
    logger.info("%s: %d computed, %d reused from the cache, %d images skipped (%d of them refused by the "
                "allowlist)", what, stats["computed"], stats["reused"], stats["failed"] + stats["rejected"],
                stats["rejected"])
    return {r["uri"]: r for r in results}, stats


def load_pair(uri: str, depth_path: str, preprocess: PreprocessConfig, storage_options: Mapping | None = None, *,
              access: ImageAccess) -> tuple[np.ndarray, np.ndarray]:
    """An image at its 384-short-side size and its cached depth map, both uint8, ready to crop.

    Raises:
        RejectedURI: The image is not allowed (the depth step skipped it already; checked again where read).
        ImageError: The image cannot be read, or its map does not match it (the image changed since).
    """
    rgb, height, width = decode_for_scoring(access.read(uri, storage_options), preprocess)
    small = resize_short_side(rgb, preprocess, (height, width))
    depth = read_png(depth_path, storage_options)
    if depth.shape != small.shape[:2]:
        raise ImageError(f"cached depth map {depth_path} is {depth.shape[1]}x{depth.shape[0]} but {redact_uri(uri)} "
                         f"resizes to {small.shape[1]}x{small.shape[0]}; delete the map to recompute it")
    return small, depth


def random_crop_pair(rgb: np.ndarray, depth: np.ndarray, crop_size: int,
                     rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One crop at the same random place in the image and its depth map, both flipped alike at random.

    Returns:
        ImageNet-normalised ``(3, crop, crop)`` tensors of the image and of the map (three equal channels).
    """
    height, width = depth.shape
    y = int(rng.integers(0, height - crop_size + 1))
    x = int(rng.integers(0, width - crop_size + 1))
    image, gray = rgb[y:y + crop_size, x:x + crop_size], depth[y:y + crop_size, x:x + crop_size]
    if rng.random() < 0.5:
        image, gray = image[:, ::-1], gray[:, ::-1]
    if rng.random() < 0.5:
        image, gray = image[::-1], gray[::-1]
    return normalize_to_tensor(np.ascontiguousarray(image)), normalize_to_tensor(np.ascontiguousarray(gray))


class CropDataset(torch.utils.data.Dataset):
    """Random training crops: entry ``k`` is one crop of item ``order[k]``.

    Each entry's randomness comes from ``seed_words`` and ``k`` alone, so the crops do not depend on the
    loader's worker processes, and a resumed epoch draws the crops an uninterrupted one would have.

    Args:
        items: ``(uri, target, depth_path)`` of every training image.
        order: Item indices of this worker's share of the epoch (an image appears once per crop).
        seed_words: Entropy of this epoch and split (seed, split, epoch).
        preprocess: Crop and resize sizes.
        storage_options: fsspec options for images and maps.
        access: Where images may be read from.
    """

    def __init__(self, items: Sequence[tuple[str, float, str]], order: Sequence[int], seed_words: Sequence[int],
                 preprocess: PreprocessConfig, storage_options: Mapping | None = None, *, access: ImageAccess):
        self.items, self.order, self.seed_words = items, list(order), tuple(seed_words)
        self.preprocess, self.storage_options, self.access = preprocess, storage_options, access

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        uri, target, depth_path = self.items[self.order[k]]
        rgb, depth = load_pair(uri, depth_path, self.preprocess, self.storage_options, access=self.access)
        rng = np.random.default_rng([*self.seed_words, self.order[k], k])
        image, gray = random_crop_pair(rgb, depth, self.preprocess.crop_size, rng)
        return image, gray, torch.tensor(target, dtype=torch.float32)


class EvalDataset(torch.utils.data.Dataset):
    """Held-out images as inference sees them: ``num_crops`` crops at the fixed per-image positions.

    Args:
        items: ``(uri, target, depth_path)`` of the held-out images.
        indices: Which of them this worker evaluates.
        preprocess: ``num_crops`` and the crop seed of the inference protocol.
        storage_options: fsspec options for images and maps.
        access: Where images may be read from.
    """

    def __init__(self, items: Sequence[tuple[str, float, str]], indices: Sequence[int], preprocess: PreprocessConfig,
                 storage_options: Mapping | None = None, *, access: ImageAccess):
        self.items, self.indices = items, list(indices)
        self.preprocess, self.storage_options, self.access = preprocess, storage_options, access

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        i = self.indices[k]
        uri, _, depth_path = self.items[i]
        rgb, depth = load_pair(uri, depth_path, self.preprocess, self.storage_options, access=self.access)
        image_crops, map_crops = quality_inputs(rgb, depth, self.preprocess)
        return i, image_crops, map_crops


def epoch_order(n_items: int, crops_per_image: int, seed_words: Sequence[int], rank: int, world: int) -> list[int]:
    """One worker's share of an epoch: a seeded shuffle of every image ``crops_per_image`` times, dealt out.

    Every worker computes the same shuffle and takes every ``world``-th entry from its rank; the shuffle is
    padded by repeating its start so each worker gets as many entries (DDP needs equal step counts).
    """
    entries = np.repeat(np.arange(n_items), crops_per_image)
    shuffled = np.random.default_rng(list(seed_words)).permutation(entries)
    padded = np.concatenate([shuffled, shuffled[:(-len(shuffled)) % world]])
    return padded[rank::world].tolist()


def chunks(values: Sequence, size: int) -> Iterator[list]:
    """``values`` in lists of at most ``size``."""
    for start in range(0, len(values), size):
        yield list(values[start:start + size])


def describe_failures(results: Sequence[Mapping], limit: int = 20) -> dict[str, int]:
    """Log each skipped image with its reason (the first ``limit``), and count the reasons.

    Reasons are ``error_reason``'s causes, as in the job's summary and the report; URIs are logged redacted.
    """
    counts: dict[str, int] = {}
    failed = [r for r in results if r["status"] in UNUSABLE]
    for row in failed[:limit]:
        logger.warning("skipping %s (%s): %s", redact_uri(row["uri"]), row["status"], row["error"])
    if len(failed) > limit:
        logger.warning("... and %d more images skipped", len(failed) - limit)
    for row in failed:
        reason = error_reason(row["error"])
        counts[reason] = counts.get(reason, 0) + 1
    return counts



def dumps(record: Mapping) -> str:
    """One JSON line; NaN becomes null (JSON has no NaN)."""
    return json.dumps(finite_or_none(record))
