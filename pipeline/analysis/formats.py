"""The formats a selection of scores is written in; light, so that ``dgiqa filter``'s parser names them cheaply."""

FORMATS = ("parquet", "csv", "jsonl")
