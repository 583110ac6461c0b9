"""One loading path for model weights: URI -> bytes -> state dict -> remap -> strict load.

Weights come only from a URI the user passes (a local path, ``file://``, ``s3://`` or any fsspec URL, or a
Hugging Face-style folder already on disk); nothing is downloaded from a model hub. PyTorch files are read with
``torch.load(weights_only=True)``, which refuses pickled code; ``.safetensors`` files hold tensors only.
The SHA-256 of the bytes read identifies the model version in every output.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import fsspec
import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

# Weight files looked for, in order, inside a Hugging Face-style folder.
FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")


class WeightsError(ValueError):
    """Weights could not be read, or do not fit the model they are meant for."""


@dataclass(frozen=True)
class Checkpoint:
    """A state dict and where it came from.

    Attributes:
        uri: The URI the user passed.
        path: The file actually read (differs from ``uri`` for a folder).
        sha256: Hex SHA-256 of the file's bytes.
        state_dict: Tensors by key, wrappers and ``module.`` prefixes removed.
        config: The folder's ``config.json``, if it had one.
    """

    uri: str
    path: str
    sha256: str
    state_dict: dict[str, torch.Tensor]
    config: dict | None = None


def weights_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, dict | None]:
    """The weights file at ``path`` and the folder's ``config.json``.

    ``path`` itself, or the one weights file inside a Hugging Face-style folder.
    """
    if not fs.isdir(path):
        return path, None
    config = None
    config_path = posixpath.join(path, "config.json")
    if fs.exists(config_path):
        with fs.open(config_path, "rb") as f:
            config = json.loads(f.read())
    for name in FOLDER_WEIGHT_FILES:
        candidate = posixpath.join(path, name)
        if fs.exists(candidate):
            return candidate, config
    found = sorted(p for p in fs.ls(path, detail=False) if p.endswith((".safetensors", ".pth", ".pt", ".bin")))
    if len(found) == 1:
        return found[0], config
    raise WeightsError(f"folder {path} holds {len(found)} weight files ({', '.join(found) or 'none'}); "
                       f"expected one, or one of {', '.join(FOLDER_WEIGHT_FILES)}")


def _looks_like_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object.
    return len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data)


def _text_kind(data: bytes) -> str | None:
    """``"JSON"``, ``"HTML or XML"`` or ``"text"`` when the file starts as text, else None."""
    head = data[:512]
    try:
        text = head.decode("utf-8").lstrip("\ufeff \t\r\n")
    except UnicodeDecodeError:
        return None
    if any(ord(c) < 32 and c not in "\t\r\n" for c in text):
        return None
    return "JSON" if text[:1] in "{[" else "HTML or XML" if text[:1] == "<" else "text"


_BLOCKED_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)")


def _decode(data: bytes, path: str) -> Mapping:
    """Tensors by key from a checkpoint's bytes; every failure is told in the user's terms, not torch's."""
    size = f"{len(data)} bytes"
    if path.endswith(".safetensors") or _looks_like_safetensors(data):
        try:
            return load_safetensors_bytes(data)
        except Exception:  # noqa: BLE001 - re-raised with the file named
            raise WeightsError(f"{path} is not a readable safetensors file ({size}): its header or tensors are "
                               "damaged or cut short; copy it again") from None
    text = _text_kind(data)
    if text:
        raise WeightsError(f"{path} is {text}, not a checkpoint ({size}); weights are a .pth/.pt/.bin or "
                           ".safetensors file saved by PyTorch") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        message = str(exc)
        if data[:4] == b"PK\x03\x04" and "Weights only load failed" not in message:
            raise WeightsError(f"{path} is a damaged or truncated PyTorch checkpoint ({size}); copy it again") \
                from None
        blocked = _BLOCKED_GLOBAL.search(message)
        what = f" ({blocked.group(1)})" if blocked else ""
        raise WeightsError(f"{path} is not a readable PyTorch weights file (loaded with weights_only=True, "
                           f"which refuses pickled code): it holds Python objects other than tensors{what}, or "
                           f"is no checkpoint at all ({size}); nothing in it ran. Save the model's state_dict() "
                           "or use .safetensors") from None


def _unwrap(obj: Mapping, path: str) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds no state dict (a mapping of names to tensors)")
    state_dict = {}
    for key, value in obj.items():
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state_dict[key] = value
    return state_dict


def read_checkpoint(uri: str, storage_options: Mapping | None = None) -> Checkpoint:
    """Read a checkpoint from a URI and hash its bytes.

    Args:
        uri: Local path, ``file://``, ``s3://`` or other fsspec URL of a ``.pth``/``.pt``/``.bin``/
            ``.safetensors`` file, or of a folder holding ``config.json`` and one weights file.
        storage_options: fsspec options (endpoint, profile, ...); credentials come from the environment.

    Raises:
        WeightsError: The URI cannot be read or does not hold a state dict.
    """
    weights_path, data, config = _read(uri, storage_options)
    state_dict = _unwrap(_decode(data, weights_path), weights_path)
    return Checkpoint(uri=uri, path=weights_path, sha256=hashlib.sha256(data).hexdigest(),
                      state_dict=state_dict, config=config)


@contextlib.contextmanager
def reading(uri: str, what: str = "weights") -> Iterator[None]:
    """Turn a storage error of any backend into one ``WeightsError`` naming ``what`` and the URI."""
    try:
        yield
    except WeightsError:
        raise
    except FileNotFoundError:
        raise WeightsError(f"no {what} at {uri}") from None
    except Exception as exc:  # noqa: BLE001 - storage errors of any backend, reported with the URI
        raise WeightsError(f"cannot read {what} from {uri}: {type(exc).__name__}: {exc}") from None


def _read(uri: str, storage_options: Mapping | None) -> tuple[str, bytes, dict | None]:
    """The weights file's path, bytes and folder config (see ``read_checkpoint``)."""
    with reading(uri):
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        weights_path, config = weights_file(fs, path)
        with fs.open(weights_path, "rb") as f:
            data = f.read()
    if not data:
        raise WeightsError(f"{weights_path} is empty (0 bytes)")
    return weights_path, data, config


def read_tensor(uri: str, storage_options: Mapping | None = None) -> tuple[str, str, torch.Tensor]:
    """Read a file that holds one tensor (``torch.save(tensor)``, or a safetensors file with one entry).

    Returns:
        The file read, the SHA-256 of its bytes, and the tensor.

    Raises:
        WeightsError: The URI cannot be read, or does not hold exactly one tensor.
    """
    path, data, _ = _read(uri, storage_options)
    obj = _decode(data, path)
    if isinstance(obj, Mapping) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        held = f"{len(obj)} entries" if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(f"{path} holds {held}, not one tensor")
    return path, hashlib.sha256(data).hexdigest(), obj


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str,
               filter_fn: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
               ) -> dict[str, torch.Tensor]:
    """Remap a state dict with the model's filter function and check keys and shapes against the model.

    Works on a model built on the ``meta`` device, so a driver can validate weights without holding a model.

    Args:
        model: The module the weights are for.
        state_dict: Tensors by key, as read.
        name: What the weights are for, used in the error message (e.g. ``"DGIQA (--weights x.pth)"``).
        filter_fn: The model's ``checkpoint_filter_fn``, renaming keys of other layouts.

    Returns:
        The remapped state dict.

    Raises:
        WeightsError: Keys are missing or unexpected, or shapes differ; the message names them.
    """
    remapped = filter_fn(state_dict) if filter_fn else dict(state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(remapped))
    unexpected = sorted(set(remapped) - set(expected))
    mismatched = sorted(f"{k} {tuple(remapped[k].shape)} vs {tuple(expected[k].shape)}"
                        for k in set(expected) & set(remapped) if remapped[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (checkpoint vs model): {_preview(mismatched)}")
    if problems:
        raise WeightsError(f"{name} checkpoint does not fit the model: " + "; ".join(problems))
    return remapped


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str,
                filter_fn: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                assign: bool = False) -> None:
    """``check_fits``, then ``load_state_dict(strict=True)``.

    Args:
        model: The network.
        state_dict: The checkpoint's tensors.
        name: The checkpoint's name in messages.
        filter_fn: The key remapping.
        assign: Make the checkpoint's tensors the network's (``load_state_dict(assign=True)``) instead of copying
            them into its own: for a network built on the meta device, whose random initialisation and second
            copy of the weights would cost seconds and gigabytes. Floating tensors are then made float32, as a
            copy into float32 parameters would.

    Raises:
        WeightsError: The checkpoint does not fit (see ``check_fits``).
    """
    model.load_state_dict(check_fits(model, state_dict, name, filter_fn), strict=True, assign=assign)
    if assign:
        model.float()
