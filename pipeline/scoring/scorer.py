"""The scorer: both models loaded once, images in, crop-averaged DGIQA scores out.

The same ``Scorer`` serves the ``dgiqa score`` command and the Ray actor pool, so a score does not depend on
how it was asked for. It is deliberately heavy to construct (weights are read, hashed and loaded) and cheap to
call; its config is a small picklable dataclass that can be shipped to workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from pipeline.models import depth_anything as da
from pipeline.models.attention import ATTENTION_MODES, set_attention
from pipeline.scorers.registry import (
    DEVICES,
    SCORER_OPTIONS,
    changed_options,
    check_options,
    get_scorer,
    model_id_options,
    resolve,
)
from pipeline.scoring.depth import depth_passes
from pipeline.scoring.device_decode import decode_on_device
from pipeline.scoring.precision import PRECISIONS, autocast
from pipeline.scoring.preprocess import (
    PreparedImage,
    PreprocessConfig,
    prepare_image,
    quality_inputs,
)
from pipeline.scoring.weights import WeightsError, check_fits, load_strict, read_checkpoint

ENCODER_CHOICES = SCORER_OPTIONS["encoder"].choices
DEVICE_CHOICES = DEVICES


@dataclass(frozen=True)
class ScorerConfig:
    """What to load and how to score; cheap to build and to pickle.

    Attributes:
        weights: URI of the scorer's checkpoint (DGIQA by default).
        depth_weights: URI of the Depth Anything checkpoint (scorers that need depth: DGIQA).
        encoder: Depth Anything encoder, or ``auto`` to read it from the checkpoint's shapes.
        depth_version: ``v1`` (the published DGIQA pairing) or ``v2``.
        device: ``auto`` (CUDA when this process sees a GPU), ``cpu`` or ``cuda``.
        forward_batch: Items per forward pass of the scorer's network: crops for DGIQA (crops of several images
            share one pass; default 256 on a GPU, where a whole batch of images in one pass keeps it busy, and 20
            on a CPU: on 2 EPYC cores 40 crops a pass ran about 15 % slower per crop than 8 or 20, its
            activations no longer staying in cache), whole images for one-pass scorers (64 on a GPU, 4 on a CPU).
        depth_batch: Same-size images per Depth Anything forward pass.
        precision: ``fp32`` (the published numerics), or ``bf16``/``fp16`` autocast for speed on GPUs; the
            benchmark records how far each moves the scores.
        compile: Wrap both models in ``torch.compile`` (slow first batches; worth it for long runs on GPUs).
        attention: ``sdpa`` (fused ``scaled_dot_product_attention``, the default: 1.7x faster Depth Anything on
            a CPU) or ``math`` (the published explicit products); they differ in rounding only, see
            ``pipeline.models.attention``.
        preprocess: Resize, crop and safety limits.
        storage_options: fsspec options for reading the weights.
        model: Registered scorer name (``pipeline.scorers.registry``): ``dgiqa`` or ``dpiqa-student``.
        exif_transpose: Rotate images upright by their EXIF orientation before the DP-IQA student's resize (off
            as in the authors' code; see ``pipeline.scoring.dpiqa_preprocess``). DGIQA always applies the
            orientation, as ``cv2.imread`` does, and refuses the option.
        decode: ``cpu`` (OpenCV's pixels, as published) or ``gpu``: JPEGs decoded and resized on the scorer's
            device (``pipeline.scoring.device_decode``; scores move slightly).
        trained_on: DPAM-IQA's preprocessing preset: the training set whose authors' data loader the
            checkpoint was trained with (``pipeline.scoring.dpam_preprocess.PRESETS``).
        prompt_embeddings: DP-IQA's prompt features: URI of the tensor file the authors' script saves.
        clip_text: DP-IQA's prompt features computed from this CLIP ViT-L/14 folder instead
            (``pipeline.scoring.prompt_embeddings``).
        latent: DP-IQA's VAE latent: ``sample`` (a seeded draw, as the authors sample it) or ``mean``
            (``pipeline.scoring.diffusion_prior``).

    Model-specific settings (``options()``) that ``model`` does not use must keep their defaults: a config that
    asks for something its scorer would ignore is refused rather than recorded as if honoured.
    """

    weights: str
    depth_weights: str | None = None
    encoder: str = "auto"
    depth_version: str = "v1"
    device: str = "auto"
    forward_batch: int | None = None
    depth_batch: int = 8
    precision: str = "fp32"
    compile: bool = False
    attention: str = "sdpa"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    storage_options: Mapping | None = None
    model: str = "dgiqa"
    exif_transpose: bool = False
    decode: str = "cpu"
    trained_on: str = "livec"
    prompt_embeddings: str | None = None
    clip_text: str | None = None
    latent: str = "sample"

    def __post_init__(self):
        spec = get_scorer(self.model)
        spec.check_installed()
        options = self.options()
        check_options(self.model, changed_options(options))
        if spec.needs_depth and not self.depth_weights:
            raise ValueError(f"--depth-weights is required for --model {self.model}")
        if spec.needs_one_of and sum(bool(options[name]) for name in spec.needs_one_of) != 1:
            flags = " or ".join(SCORER_OPTIONS[name].flag for name in spec.needs_one_of)
            raise ValueError(f"--model {self.model} needs exactly one of {flags}")
        for name, option in SCORER_OPTIONS.items():
            if option.choices and options[name] not in option.choices:
                raise ValueError(f"{name} must be one of {', '.join(option.choices)}, got {options[name]!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        if self.decode == "gpu" and self.preprocess.draft:
            raise ValueError("--draft-decode and --decode gpu exclude each other (draft decoding is a CPU decode)")
        if (self.forward_batch is not None and self.forward_batch < 1) or self.depth_batch < 1:
            raise ValueError(f"forward_batch and depth_batch must be at least 1, got {self.forward_batch}, "
                             f"{self.depth_batch}")

    def options(self) -> dict[str, object]:
        """The model-specific settings by their ``SCORER_OPTIONS`` name (the job's field names)."""
        return {"depth_weights": self.depth_weights, "encoder": self.encoder, "depth_version": self.depth_version,
                "crops": self.preprocess.num_crops, "depth_input_size": self.preprocess.depth_input_size,
                "draft_decode": self.preprocess.draft, "exif_transpose": self.exif_transpose, "decode": self.decode,
                "trained_on": self.trained_on, "prompt_embeddings": self.prompt_embeddings,
                "clip_text": self.clip_text, "latent": self.latent}


@dataclass(frozen=True)
class ImageScore:
    """One image's result.

    Attributes:
        score: Mean of the crop scores, in [0, 1] (DGIQA); the raw output for single-pass scorers.
        score_std: Population standard deviation of the crop scores (how much the crops disagree); ``None``
            for scorers that make one pass over the whole image.
        num_crops: Crops averaged (1 for single-pass scorers).
        width: Width of the decoded, EXIF-oriented image.
        height: Height of the decoded, EXIF-oriented image.
    """

    score: float
    score_std: float | None
    num_crops: int
    width: int
    height: int


def non_finite(result: ImageScore) -> str | None:
    """Why ``result`` is no score (a NaN or infinite mean), else ``None``.

    Weights holding a NaN or an fp16 overflow give such means. The job and ``dgiqa score`` make the image an
    error row: a NaN counted as a score would sort above every real one and break each ranking and quantile
    read from the output.
    """
    if np.isfinite(result.score):
        return None
    return f"the model gave a non-finite score ({result.score})"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when this process can see a GPU, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but this process sees no CUDA device")
    return torch.device(name)


@dataclass(frozen=True)
class ModelInfo:
    """Which weights a scorer runs: what ``model_id`` in every output row identifies.

    Attributes:
        model_id: ``dgiqa@<sha256>+depth-anything-<version>-<encoder>@<sha256>`` for DGIQA,
            ``<scorer>@<sha256>`` for scorers without a depth model.
        scorer: The registered scorer's name (``--model``).
        encoder: The Depth Anything encoder found in the checkpoint (or the scorer's backbone).
        weights_sha256: SHA-256 of the scorer's weights file.
        depth_sha256: SHA-256 of the Depth Anything weights file (empty without one).
        aux_model: The auxiliary model's ``name@sha256`` (the depth model), empty without one.
        output_scale: What the scores mean (from the scorer's registry entry).
    """

    model_id: str
    scorer: str
    encoder: str
    weights_sha256: str
    depth_sha256: str = ""
    aux_model: str = ""
    output_scale: str = ""


@dataclass(frozen=True)
class DepthWeights:
    """A Depth Anything checkpoint read, remapped and identified; the model is built from it on demand.

    Attributes:
        encoder: The encoder found in the checkpoint's shapes.
        version: Depth Anything version (``v1`` or ``v2``).
        sha256: SHA-256 of the weights file.
        path: Where the weights came from (for messages).
        state_dict: The remapped state dict.
    """

    encoder: str
    version: str
    sha256: str
    path: str
    state_dict: Mapping[str, torch.Tensor]

    @property
    def label(self) -> str:
        """``depth-anything-<version>-<encoder>@<sha256>``: the depth half of a ``model_id``."""
        return f"depth-anything-{self.version}-{self.encoder}@{self.sha256}"

    def build(self, materialize: bool = True) -> nn.Module:
        """The architecture with these weights loaded strictly (``materialize``), or only checked on meta."""
        with contextlib.nullcontext() if materialize else torch.device("meta"):
            model = da.build_depth_anything(self.encoder, self.version)
        check = load_strict if materialize else check_fits
        check(model, self.state_dict, f"Depth Anything {self.encoder} (--depth-weights {self.path})")
        return model


def read_depth_weights(uri: str, encoder: str = "auto", version: str = "v1",
                       storage_options: Mapping | None = None) -> DepthWeights:
    """Read a Depth Anything checkpoint and find its encoder; an explicit ``encoder`` must agree with it.

    Raises:
        WeightsError: The checkpoint cannot be read, is no Depth Anything, or holds another encoder.
    """
    ckpt = read_checkpoint(uri, storage_options)
    state = da.checkpoint_filter_fn(ckpt.state_dict)
    try:
        found = da.encoder_of(state)
    except KeyError as exc:
        raise WeightsError(f"--depth-weights {ckpt.path}: {exc.args[0]}") from None
    if encoder not in ("auto", found):
        raise WeightsError(f"--encoder {encoder} was given, but --depth-weights {ckpt.path} holds a {found} model")
    return DepthWeights(encoder=found, version=version, sha256=ckpt.sha256, path=ckpt.path, state_dict=state)


def _load_models(config: ScorerConfig, materialize: bool) -> tuple[ModelInfo, nn.Module, nn.Module]:
    """A depth-guided scorer's network and depth model, checked against their checkpoints.

    Both are built from the scorer's spec, on the meta device unless ``materialize`` (checking reads shapes only).
    """
    spec = get_scorer(config.model)
    ckpt = read_checkpoint(config.weights, config.storage_options)
    depth = read_depth_weights(config.depth_weights, config.encoder, config.depth_version, config.storage_options)
    with contextlib.nullcontext() if materialize else torch.device("meta"):
        network = resolve(spec.builder)()
    check = load_strict if materialize else check_fits
    check(network, ckpt.state_dict, f"{spec.title} (--weights {ckpt.path})", resolve(spec.filter_fn))
    depth_model = depth.build(materialize)
    info = ModelInfo(model_id=f"{spec.name}@{ckpt.sha256}+{depth.label}", scorer=spec.name, aux_model=depth.label,
                     encoder=depth.encoder,
                     weights_sha256=ckpt.sha256, depth_sha256=depth.sha256, output_scale=spec.output_scale)
    return info, network, depth_model


def check_models(config: ScorerConfig) -> ModelInfo:
    """Read and hash the checkpoints and check them against the architectures, without building the models.

    A job calls this on its driver to fail before any work when weights are unusable, and to know the
    ``model_id`` it skips already-scored images by.

    Raises:
        WeightsError: A checkpoint cannot be read or does not fit its model.
    """
    return _with_options(resolve(get_scorer(config.model).runner).check(config), config)


def make_scorer(config: ScorerConfig):
    """The runner the registry names for ``config.model``, weights loaded."""
    runner = resolve(get_scorer(config.model).runner)(config)
    runner.info = _with_options(runner.info, config)
    runner.model_id = runner.info.model_id
    return runner


def _with_options(info: ModelInfo, config: ScorerConfig) -> ModelInfo:
    """``info`` whose ``model_id`` ends in ``+<options>`` when score-changing options are set (``model_id_options``).

    Done here, on the one road from a config to a runner, so that the driver's ``model_id`` (which the plan skips
    by) and every actor's (which it checks against the driver's) are named alike for every scorer.
    """
    named = model_id_options(config.model, config.options())
    return replace(info, model_id=f"{info.model_id}+{named}") if named else info


def prepare_item(data: bytes, config: ScorerConfig):
    """The CPU-side preprocessing of ``config.model`` for one encoded image.

    The preprocessing gets ``config.preprocess`` and, as keyword arguments, the options it declares it uses
    (the DP-IQA student's ``exif_transpose``).

    Raises:
        ImageError: The bytes are not a scorable image.
    """
    spec = get_scorer(config.model)
    values = config.options()
    options = {name: values[name] for name in spec.preprocessing_options}
    return resolve(spec.preprocessing)(data, config.preprocess, **options)


class Scorer:
    """DGIQA and Depth Anything, loaded once, scoring images the way the published inference does.

    Args:
        config: What to load.

    Raises:
        WeightsError: A checkpoint cannot be read or does not fit its model.
        ValueError: The device cannot be used.
    """

    prepared_type = PreparedImage
    # The options of the depth model, and of the DGIQA preprocessing this runner feeds its PreprocessConfig to.
    uses_options = frozenset({"depth_weights", "encoder", "depth_version", "crops", "depth_input_size", "decode",
                              "draft_decode"})

    @staticmethod
    def check(config: ScorerConfig) -> ModelInfo:
        """Read and hash both checkpoints and check them against the architectures built on the meta device."""
        return _load_models(config, materialize=False)[0]

    def __init__(self, config: ScorerConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.info, self.dgiqa, self.depth_model = _load_models(config, materialize=True)
        self.dgiqa.to(self.device)
        self.depth_model.to(self.device)
        self.model_id = self.info.model_id
        self.encoder = self.info.encoder
        self.forward_batch = config.forward_batch or (256 if self.device.type == "cuda" else 20)
        set_attention(self.dgiqa, config.attention)
        set_attention(self.depth_model, config.attention)
        if config.compile:
            self.dgiqa = torch.compile(self.dgiqa)
            self.depth_model = torch.compile(self.depth_model, dynamic=True)  # depth inputs vary in size

    @torch.inference_mode()
    def depth_maps(self, prepared: Sequence[PreparedImage]) -> list[np.ndarray]:
        """The uint8 ``(H, W)`` depth map DGIQA sees for each image (its three channels are equal).

        Images whose depth inputs have the same size share one forward pass (photos from one camera do).
        """
        maps: list[np.ndarray | None] = [None] * len(prepared)
        for done in depth_passes(self.depth_model, prepared, self.device, self.config.depth_batch,
                                 self.config.precision):
            for i, depth_map in done:
                maps[i] = depth_map
        return maps

    def depth_map(self, rgb: np.ndarray) -> np.ndarray:
        """The uint8 ``(H, W, 3)`` depth map DGIQA sees for an ``(H, W, 3)`` uint8 RGB image."""
        gray = self.depth_maps([prepare_image(rgb, self.config.preprocess)])[0]
        return np.repeat(gray[..., None], 3, axis=2)

    @torch.inference_mode()
    def score_prepared(self, prepared: Sequence[PreparedImage]) -> list[ImageScore]:
        """Score prepared images (``EncodedImage`` ones decoded on the device first); crops share forward passes."""
        if not prepared:
            return []
        cfg = self.config.preprocess
        if self.config.decode == "gpu":
            prepared = decode_on_device(prepared, cfg, self.device)
        rgb_crops, depth_crops = [], []
        for item, depth_map in zip(prepared, self.depth_maps(prepared), strict=True):
            image_crops, map_crops = quality_inputs(item.rgb_small, depth_map, cfg)
            rgb_crops.append(image_crops)
            depth_crops.append(map_crops)
        all_rgb, all_depth = torch.cat(rgb_crops), torch.cat(depth_crops)
        if self.device.type == "cuda":  # page-locked host memory: the copies below overlap with compute
            all_rgb, all_depth = all_rgb.pin_memory(), all_depth.pin_memory()
        step = self.forward_batch
        with autocast(self.device, self.config.precision):
            crop_scores = torch.cat([
                self.dgiqa(all_rgb[i:i + step].to(self.device, non_blocking=True),
                           all_depth[i:i + step].to(self.device, non_blocking=True)).float().cpu()
                for i in range(0, all_rgb.shape[0], step)
            ])
        results = []
        for i, item in enumerate(prepared):
            per_crop = crop_scores[i * cfg.num_crops:(i + 1) * cfg.num_crops]
            results.append(ImageScore(score=per_crop.mean().item(), score_std=per_crop.std(correction=0).item(),
                                      num_crops=cfg.num_crops, width=item.width, height=item.height))
        return results

    def score_images(self, images: Sequence[np.ndarray]) -> list[ImageScore]:
        """Score decoded ``(H, W, 3)`` uint8 RGB images."""
        return self.score_prepared([prepare_image(rgb, self.config.preprocess) for rgb in images])

    def score_bytes(self, data: bytes) -> ImageScore:
        """Decode and score one encoded image.

        Raises:
            ImageError: The bytes are not a scorable image.
        """
        return self.score_prepared([prepare_item(data, self.config)])[0]
