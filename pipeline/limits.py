"""Limits on what the pipeline reads, in a module of their own so that argument parsers can name them cheaply.

Every command's ``--help`` prints these defaults; importing them from the modules that enforce them would load
fsspec, OpenCV and torch before a flag is parsed.
"""

DEFAULT_MAX_BYTES = 256 * 2**20
"""Default byte limit per object: far above any photograph, far below what would crowd a worker's memory."""

DEFAULT_MAX_PIXELS = 100_000_000
"""Default pixel limit per image, checked from the header before decoding (a decompression bomb never allocates)."""

DEFAULT_PLAN_MEMORY_MB = 256
"""Default memory of the job's planner and commit (DuckDB) before they spill to disk."""
