"""Options naming a label file and its layout, shared by ``evaluate`` and ``train``."""

from __future__ import annotations

from pipeline.analysis.label_layouts import LAYOUTS


def add_label_arguments(group, lower_is_better_help: str) -> None:
    """Add the options naming a label file and its layout (``dgiqa evaluate`` and ``dgiqa train`` share them).

    Args:
        group: An ``argparse`` parser or argument group.
        lower_is_better_help: What ``--lower-is-better`` does for this command.
    """
    group.add_argument("labels", metavar="LABELS", help="label file (live-challenge: the dataset folder), path or URI")
    group.add_argument("--layout", choices=LAYOUTS, default="generic",
                       help="koniq (koniq10k_scores_and_distributions.csv), kadid (dmos.csv), live-challenge "
                            "(Data/*.mat), spaq (xlsx or csv), generic (uri + label columns; default)")
    group.add_argument("--images-prefix", metavar="URI",
                       help="folder or URI prefix the dataset's image names are joined onto (needed for koniq, "
                            "kadid, spaq; live-challenge defaults to the dataset's Images/)")
    group.add_argument("--label-column", help="label column (koniq: MOS_zscore or MOS; generic: default mos)")
    group.add_argument("--uri-column", default="uri", help="generic layout: the column of image URIs (uri)")
    group.add_argument("--lower-is-better", action="store_true", help=lower_is_better_help)
    group.add_argument("--keep-training-images", action="store_true",
                       help="live-challenge: keep the 7 training images t1..t7 (left out by custom)")
