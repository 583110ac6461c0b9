"""Training data for DPAM-IQA: the superpixel-feature cache, and the training and held-out inputs.

Superpixel features: SLIC does not change from one epoch to the next, so, like the authors' loaders (which keep a
``.npy`` per image in their working folder) and like DGIQA's depth maps here, each image's features are computed
once and cached, at ``<cache>/dpam-superpixels/<preset>-seed<S>/<sha1>.npy`` (uint8 ``(nodes, pixels, 3)``). The
folder names the preset (its SLIC sizes) and the draw seed; the file name is the SHA-1 of the image URI and its
version, as for depth maps (``train_data.DepthCache``), so a replaced image gets new features. They are computed
by ``train_data.precompute_depth`` with ``SuperpixelMapper``: on Ray actors, the images checked against the
allowlist and the byte limit first, failures skipped and counted.

Training inputs follow the authors' loaders: the image (for the synthetic sets' presets a random 224x224 crop of
it) is flipped horizontally with probability ``flip_prob``, then made into the ViT input and the texture image
exactly as at inference; the superpixel features are the cached ones, never flipped (as in the authors' code,
where the features come from the unflipped image). Every draw comes from (seed, split, epoch, entry), so a resumed
epoch draws what an uninterrupted one would have. Held-out images are prepared exactly as ``dgiqa score --model
dpam`` prepares them (five-point crops for the synthetic presets), with the cached features.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import torch

from pipeline.models.dpam import CROP_SIZE
from pipeline.scoring.dpam_preprocess import (
    PRESETS,
    SLIC_SEED,
    PreparedDpam,
    decode_bgr,
    prepare_dpam,
    superpixel_features,
    texture_image,
    to_tensors,
    vit_input,
)
from pipeline.scoring.preprocess import ImageError
from pipeline.training.train_data import STATUS_COMPUTED, DepthMapper, ImageAccess, atomic_write


@dataclass(frozen=True)
class SuperpixelCache:
    """Where the superpixel features of one preset live (the ``DepthCache`` of DPAM-IQA).

    Attributes:
        root: Cache root URI (``--superpixel-cache``).
        preset: ``--trained-on`` preset name.
        storage_options: fsspec options for the cache and the images.
    """

    root: str
    preset: str
    storage_options: Mapping | None = None

    @property
    def folder(self) -> str:
        """``<root>/dpam-superpixels/<preset>-seed<S>``."""
        return posixpath.join(self.root.rstrip("/"), "dpam-superpixels", f"{self.preset}-seed{SLIC_SEED}")

    def path(self, uri: str, version: str) -> str:
        """The ``.npy`` of an image URI at a version."""
        key = hashlib.sha1(f"{uri}\n{version}".encode()).hexdigest()
        return posixpath.join(self.folder, f"{key}.npy")


def read_features(path: str, storage_options: Mapping | None = None) -> np.ndarray:
    """Cached superpixel features: uint8 ``(nodes, pixels, 3)``."""
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


class SuperpixelMapper(DepthMapper):
    """``DepthMapper`` for superpixel features: the same checks, versions and cache look-ups, no model.

    Takes ``DepthMapper``'s arguments so that ``precompute_depth`` drives it; ``weights`` is unused (None).
    """

    def _prepare(self, data: bytes) -> np.ndarray:
        return superpixel_features(decode_bgr(data), PRESETS[self.cache.preset])

    def _compute(self, results: list[dict], missing: list[tuple[int, str, object]]) -> None:
        for i, path, features in missing:
            buffer = io.BytesIO()
            np.save(buffer, features, allow_pickle=False)
            atomic_write(path, buffer.getvalue(), self.cache.storage_options)
            results[i]["status"] = STATUS_COMPUTED


class DpamTrainDataset(torch.utils.data.Dataset):
    """Training inputs: entry ``k`` is item ``order[k]``, flipped and (synthetic presets) cropped at random.

    Args:
        items: ``(uri, target, features_path)`` of every training image.
        order: Item indices of this worker's share of the epoch.
        seed_words: Entropy of this epoch and split (seed, split, epoch).
        preset: ``--trained-on`` preset name.
        flip_prob: Probability of the horizontal flip.
        storage_options: fsspec options for images and features.
        access: Where images may be read from.
    """

    def __init__(self, items: Sequence[tuple[str, float, str]], order: Sequence[int], seed_words: Sequence[int],
                 preset: str, flip_prob: float, storage_options: Mapping | None = None, *, access: ImageAccess):
        self.items, self.order, self.seed_words = items, list(order), tuple(seed_words)
        self.preset, self.flip_prob = PRESETS[preset], flip_prob
        self.storage_options, self.access = storage_options, access

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        uri, target, features_path = self.items[self.order[k]]
        bgr = decode_bgr(self.access.read(uri, self.storage_options))
        rng = np.random.default_rng([*self.seed_words, self.order[k], k])
        if rng.random() < self.flip_prob:
            bgr = np.ascontiguousarray(bgr[:, ::-1])
        if self.preset.five_crops:
            height, width = bgr.shape[:2]
            if min(height, width) < CROP_SIZE:
                raise ImageError(f"image is {width}x{height}; this preset trains on 224x224 crops")
            top, left = int(rng.integers(0, height - CROP_SIZE + 1)), int(rng.integers(0, width - CROP_SIZE + 1))
            bgr = bgr[top:top + CROP_SIZE, left:left + CROP_SIZE]
        item = PreparedDpam(rgb=vit_input(bgr)[None], texture=texture_image(bgr)[None],
                            superpixels=read_features(features_path, self.storage_options), height=bgr.shape[0],
                            width=bgr.shape[1])
        rgb, texture, features = (tensor[0] for tensor in to_tensors([item]))  # scaled as at inference
        return rgb, texture, features, torch.tensor(target, dtype=torch.float32)


class DpamEvalDataset(torch.utils.data.Dataset):
    """Held-out images prepared as ``dgiqa score --model dpam`` prepares them, with the cached features.

    Entry ``k`` is ``(index, PreparedDpam)`` of item ``indices[k]``.
    """

    def __init__(self, items: Sequence[tuple[str, float, str]], indices: Sequence[int], preset: str,
                 storage_options: Mapping | None = None, *, access: ImageAccess):
        self.items, self.indices, self.preset = items, list(indices), preset
        self.storage_options, self.access = storage_options, access

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, PreparedDpam]:
        i = self.indices[k]
        uri, _, features_path = self.items[i]
        prepared = prepare_dpam(self.access.read(uri, self.storage_options), trained_on=self.preset,
                                superpixels=read_features(features_path, self.storage_options))
        return i, prepared
