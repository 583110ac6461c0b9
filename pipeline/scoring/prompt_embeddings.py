"""DP-IQA's text condition: CLIP ViT-L/14 text features of quality prompts, read from a file or computed once.

The features are not in a DP-IQA checkpoint: the authors compute them with a separate script and load the tensor
file it saves. A user gives either that file (``--prompt-embeddings``, ``torch.save`` of a ``(prompts, 768)``
tensor, or a safetensors file with one tensor) or a CLIP ViT-L/14 folder in Hugging Face format, weights and
tokenizer files (``--clip-text``; the ``openai/clip-vit-large-patch14`` layout, a whole CLIP model or its text
half), from which the features are computed here as the authors' script computes them: the prompts tokenised
together (padded to the longest, truncated at CLIP's 77 tokens), ``get_text_features`` (the projected end-of-text
token), float32 on the CPU. Computed features are cached on local disk by the CLIP weights' SHA-256, so each
machine computes them once.

The prompts are the paper's 495: five quality levels x nine scenes x eleven distortion groups, in that nesting
order. The authors' script as published lists 33 distortion names instead (1,485 prompts); a checkpoint trained
with that file needs that file, given with ``--prompt-embeddings``.

What the features were identifies the model as much as its weights do, so it enters ``model_id``:
``prompts@<sha256 of the file>`` or ``clip-text@<sha256 of the CLIP weights>``.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load_file, save_file

from pipeline.scoring.weights import WeightsError, read_tensor, reading, weights_file

QUALITIES = ("bad", "poor", "fair", "good", "perfect")
SCENES = ("animal", "cityscape", "human", "indoor", "landscape", "night", "plant", "still_life", "others")
DISTORTIONS = ("jpeg2000 compression", "jpeg compression", "noise", "blur", "color", "contrast", "overexposure",
               "underexposure", "spatial", "quantization", "other")
CACHE_ENV = "DGIQA_CACHE_DIR"


def quality_prompts() -> list[str]:
    """The 495 prompts, quality outermost, then scene, then distortion."""
    return [f"a photo of a {scene} with {distortion} artifacts, which is of {quality} quality"
            for quality, scene, distortion in product(QUALITIES, SCENES, DISTORTIONS)]


@dataclass(frozen=True)
class PromptFeatures:
    """Prompt features and what they were made from.

    Attributes:
        features: ``(prompts, width)`` float32.
        label: ``prompts@<sha256>`` or ``clip-text@<sha256>``: their part of ``model_id``.
    """

    features: torch.Tensor
    label: str


def read_prompt_features(uri: str, storage_options: Mapping | None = None) -> PromptFeatures:
    """The features in a tensor file.

    Raises:
        WeightsError: The file cannot be read or is not one 2-D floating tensor.
    """
    path, sha256, tensor = read_tensor(uri, storage_options)
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise WeightsError(f"{path} holds a {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} "
                           "tensor; prompt features are (prompts, width) floats")
    return PromptFeatures(tensor.float(), f"prompts@{sha256}")


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dgiqa") / "prompt-features"


def _clip_folder(uri: str, storage_options: Mapping | None) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """The CLIP folder's file system, path, and the SHA-256 of its weights file (read once, in chunks)."""
    with reading(uri, "CLIP model"):
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if not fs.exists(path):
            raise FileNotFoundError(path)
        if not fs.isdir(path):
            raise WeightsError(f"--clip-text {uri} is not a folder (a CLIP model in Hugging Face format: "
                               "config.json, model.safetensors, vocab.json, merges.txt)")
        weights, _ = weights_file(fs, path)
        digest = hashlib.sha256()
        with fs.open(weights, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return fs, path, digest.hexdigest()


def encode_prompts(folder: str, prompts: list[str]) -> torch.Tensor:
    """CLIP's projected text features of ``prompts``, as the authors' script computes them (float32, CPU).

    A whole CLIP model's folder (``model_type: clip``, as ``openai/clip-vit-large-patch14`` is published) runs
    through ``CLIPModel.get_text_features`` as in their script; a text-only one (``CLIPTextModelWithProjection``)
    gives the same features from its own class.
    """
    from transformers import AutoConfig, CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        whole = isinstance(AutoConfig.from_pretrained(folder, local_files_only=True), CLIPConfig)
        model = (CLIPModel if whole else CLIPTextModelWithProjection).from_pretrained(
            folder, local_files_only=True, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise WeightsError(f"--clip-text {folder} is not a loadable CLIP text model: "
                           f"{str(exc).strip().splitlines()[0]}") from None
    tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    inputs = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    with torch.inference_mode():
        out = model.get_text_features(**inputs) if whole else model(**inputs).text_embeds
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()


def compute_prompt_features(uri: str, storage_options: Mapping | None = None) -> PromptFeatures:
    """The features of ``quality_prompts()`` from a CLIP folder, cached by its weights' SHA-256.

    Raises:
        WeightsError: The folder cannot be read or is no CLIP text model.
    """
    fs, path, sha256 = _clip_folder(uri, storage_options)
    label = f"clip-text@{sha256}"
    cached = _cache_dir() / f"clip-text-{sha256}.safetensors"
    if cached.exists():  # before any copy: a cache hit reads the remote weights once, to hash them
        return PromptFeatures(load_file(str(cached))["features"], label)
    if "file" in fs.protocol:
        features = encode_prompts(path, quality_prompts())
    else:
        with tempfile.TemporaryDirectory(prefix="dgiqa-clip-") as scratch:
            with reading(uri, "CLIP model"):
                for name in fs.ls(path, detail=False):
                    fs.get(name, posixpath.join(scratch, posixpath.basename(name)))
            features = encode_prompts(scratch, quality_prompts())
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.partial")
    save_file({"features": features.contiguous()}, str(partial))
    partial.replace(cached)  # atomic: actors on one machine never read a half-written file
    return PromptFeatures(features, label)


def prompt_features(prompt_embeddings: str | None, clip_text: str | None,
                    storage_options: Mapping | None = None) -> PromptFeatures:
    """The features from whichever source was given (``ScorerConfig`` makes sure exactly one was)."""
    if prompt_embeddings:
        return read_prompt_features(prompt_embeddings, storage_options)
    if clip_text:
        return compute_prompt_features(clip_text, storage_options)
    raise WeightsError("DP-IQA needs --prompt-embeddings or --clip-text")
