"""The label-file layouts the pipeline reads and their columns, apart from the readers: parsers name them cheaply."""

LAYOUTS = ("koniq", "kadid", "live-challenge", "spaq", "generic")
DEFAULT_LABEL_COLUMN = {"koniq": "MOS_zscore", "kadid": "dmos", "spaq": "MOS", "generic": "mos"}
NAME_COLUMN = {"koniq": "image_name", "kadid": "dist_img", "spaq": "Image name"}
# Optional column naming each row's scene (see "Groups" in ``pipeline/analysis/labels.py``).
GROUP_COLUMN = {"kadid": "ref_img", "generic": "group"}
LIVE_NAMES, LIVE_MOS = "AllImages_release", "AllMOS_release"
LIVE_TRAINING_IMAGES = 7
