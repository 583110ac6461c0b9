"""The files of one split's training run, written so that a killed run loses at most the epoch in progress.

Each finished epoch is written in this order (by rank 0 of the workers):

* ``train_state.pt``: model, optimizer, scheduler, epoch, history, settings (``torch.load(weights_only=True)``).
  It is written first, so it is the commit point of an epoch: a rerun resumes after the epoch it holds;
* ``last.pth`` and ``last.json``, then ``best.pth`` (a copy of ``last.pth``) and ``best.json`` when the epoch
  improved: plain DGIQA state dicts in the published key layout and their sidecars (provenance and metrics);
* ``metrics.jsonl``, rewritten whole from the history, so it never holds an epoch twice.

Every file is replaced atomically, so a reader sees the old file or the new one. A kill between two writes can leave
a derived file behind the state; ``RunStore.repair`` rewrites it from the state on resume. A sidecar is written after
its weights, so a sidecar naming the state's epoch proves its weights were written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from collections.abc import Mapping, Sequence

import fsspec
import torch

from pipeline.analysis.metrics import finite_or_none
from pipeline.batch.output import atomic_open, atomic_target, is_local
from pipeline.training.train_data import atomic_write, dumps

logger = logging.getLogger(__name__)

STATE_FILE, BEST, LAST, METRICS_FILE, SUMMARY_FILE = "train_state.pt", "best", "last", "metrics.jsonl", "summary.json"
STATE_FORMAT = 1


def epoch_sidecar(base: Mapping, record: Mapping) -> dict:
    """The sidecar of an epoch's checkpoint: the run's provenance (``base``) with the epoch and its metrics."""
    return {**base, "epoch": record["epoch"], "metrics": dict(record)}


class RunStore:
    """The files of one split's training run under a folder URI (see the module docstring for their order)."""

    def __init__(self, folder: str, storage_options: Mapping | None = None):
        self.folder = folder.rstrip("/")
        self.storage_options = storage_options

    def uri(self, name: str) -> str:
        """URI of a file of the run."""
        return posixpath.join(self.folder, name)

    def read_state(self) -> dict | None:
        """The training state of the last finished epoch, or None before the first."""
        fs, path = fsspec.core.url_to_fs(self.uri(STATE_FILE), **(self.storage_options or {}))
        if not fs.exists(path):
            return None
        if is_local(fs):  # memory-mapped: reading the settings does not read the tensors
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            with fs.open(path, "rb") as f:
                state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.uri(STATE_FILE)} has format {state.get('format')!r}, not {STATE_FORMAT}")
        return state

    def _save(self, name: str, obj) -> str:
        """``torch.save`` straight into the file (no copy of it in memory); returns the SHA-256 of its bytes.

        The training state of a DGIQA run is about 800 MB (model and AdamW moments). Serialised into memory
        first, rank 0 held 1.8 GB more than the state at each commit to the test S3 server; streamed, 0.6 GB
        (measured with four 200 MB tensors: s3fs uploads each large write as one part). A save that fails
        part-way leaves the old file (``atomic_open``): torch.save ends its archive even when it fails, and a
        plain close would have committed that.
        """
        fs, path = fsspec.core.url_to_fs(self.uri(name), **(self.storage_options or {}))
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with atomic_open(fs, path) as f:
            hashing = _HashingWriter(f)
            torch.save(obj, hashing)
        return hashing.sha256.hexdigest()

    def write_state(self, state: Mapping) -> None:
        """Commit an epoch."""
        self._save(STATE_FILE, dict(state))

    def write_weights(self, which: str, state_dict: Mapping[str, torch.Tensor], sidecar: Mapping) -> str:
        """``<which>.pth`` (a plain DGIQA state dict) and ``<which>.json``; returns the SHA-256 of the weights."""
        sha256 = self._save(f"{which}.pth", dict(state_dict))
        self.write_json(f"{which}.json", {**sidecar, "weights": self.uri(f"{which}.pth"), "sha256": sha256})
        return sha256

    def copy_weights(self, source: str, which: str, sha256: str, sidecar: Mapping) -> None:
        """``<which>.pth`` as a copy of ``<source>.pth`` (a server-side copy on object stores), and its sidecar."""
        fs, src = fsspec.core.url_to_fs(self.uri(f"{source}.pth"), **(self.storage_options or {}))
        _, dst = fsspec.core.url_to_fs(self.uri(f"{which}.pth"), **(self.storage_options or {}))
        with atomic_target(fs, dst) as target:
            fs.copy(src, target)
        self.write_json(f"{which}.json", {**sidecar, "weights": self.uri(f"{which}.pth"), "sha256": sha256})

    def read_json(self, name: str) -> dict:
        """A JSON file of the run, or ``{}`` when there is none."""
        fs, path = fsspec.core.url_to_fs(self.uri(name), **(self.storage_options or {}))
        if not fs.exists(path):
            return {}
        with fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_json(self, name: str, obj: Mapping) -> None:
        """A JSON file of the run (NaN written as null)."""
        atomic_write(self.uri(name), (json.dumps(finite_or_none(obj), indent=2, sort_keys=True) + "\n").encode(),
                     self.storage_options)

    def write_metrics(self, history: Sequence[Mapping], label_map: Mapping) -> None:
        """Rewrite ``metrics.jsonl`` from the history: one line per epoch, never a duplicate."""
        text = "".join(dumps({**record, "label_map": label_map}) + "\n" for record in history)
        atomic_write(self.uri(METRICS_FILE), text.encode(), self.storage_options)


    def repair(self, state: Mapping, sidecar: Mapping, label_map: Mapping) -> None:
        """Rewrite what the committed state says should exist but does not (a kill may have come between writes).

        Args:
            state: The committed state (``read_state``).
            sidecar: The run's provenance, the ``base`` of ``epoch_sidecar``.
            label_map: ``LabelMap.to_dict()``, written into the metrics log.
        """
        due = [(LAST, state["history"][-1])]
        if state["best"] is not None and state["best"]["epoch"] == state["epoch"]:
            due.append((BEST, state["best"]))
        for which, record in due:
            if self.read_json(f"{which}.json").get("epoch") != record["epoch"]:
                logger.info("restoring %s.pth of epoch %d from %s", which, record["epoch"], STATE_FILE)
                self.write_weights(which, state["model"], epoch_sidecar(sidecar, record))
        self.write_metrics(state["history"], label_map)


class _HashingWriter:
    """A write-only file that hashes what passes through it (``torch.save`` needs ``write`` and ``flush``)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()
