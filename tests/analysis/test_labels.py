"""Label readers on small files written in each dataset's exact layout."""

import json

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io

from pipeline.analysis.labels import LabelError, Labels, absolute_uri, default_allow_prefixes, join_uri, read_labels
from pipeline.batch.allowlist import Allowlist, RejectedURI

KONIQ_COLUMNS = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]


def _koniq_rows():
    return [
        ["826373.jpg", 0, 3, 40, 56, 3, 102, 3.578, 0.6, 68.8],
        ["10004473376.jpg", 0, 2, 25, 73, 7, 107, 3.794, 0.55, 72.6],
        ["100045624.jpg", 5, 50, 40, 5, 0, 100, 2.45, 0.7, 38.2],
    ]


def _write_koniq(path, rows=None, columns=KONIQ_COLUMNS):
    pd.DataFrame(rows or _koniq_rows(), columns=columns).to_csv(path, index=False)
    return path


def test_join_uri_uses_exactly_one_slash():
    for prefix in ("s3://bucket/koniq/1024x768", "s3://bucket/koniq/1024x768/", "s3://bucket/koniq/1024x768//"):
        assert join_uri(prefix, "826373.jpg") == "s3://bucket/koniq/1024x768/826373.jpg"
    assert join_uri("/data/spaq/", "/00001.png") == "/data/spaq/00001.png"


def test_koniq_default_mos_zscore_or_mos(tmp_path):
    path = _write_koniq(tmp_path / "koniq10k_scores_and_distributions.csv")
    labels = read_labels(str(path), "koniq", "s3://bucket/koniq/1024x768/")
    assert labels.table.schema == pa.schema([pa.field("uri", pa.string(), nullable=False),
                                             pa.field("label", pa.float64(), nullable=False)])
    assert labels.table.column("uri").to_pylist() == [f"s3://bucket/koniq/1024x768/{r[0]}" for r in _koniq_rows()]
    assert labels.table.column("label").to_pylist() == [r[-1] for r in _koniq_rows()]
    assert labels.higher_is_better and labels.label_column == "MOS_zscore" and len(labels) == 3
    mos = read_labels(str(path), "koniq", "/data/koniq", label_column="MOS")
    assert mos.table.column("label").to_pylist() == [r[7] for r in _koniq_rows()]
    assert mos.table.column("uri")[1].as_py() == "/data/koniq/10004473376.jpg"


def test_koniq_errors_name_the_column_or_the_line(tmp_path):
    no_zscore = _write_koniq(tmp_path / "a.csv", [r[:-1] for r in _koniq_rows()], KONIQ_COLUMNS[:-1])
    with pytest.raises(LabelError, match=r"koniq label file .*a\.csv has no column 'MOS_zscore' \(columns: image"):
        read_labels(str(no_zscore), "koniq", "/data")
    rows = _koniq_rows()
    rows[2][-1] = "n/a"
    bad = _write_koniq(tmp_path / "b.csv", rows)
    with pytest.raises(LabelError, match=r"line 4 \(image '100045624.jpg'\): label in 'MOS_zscore' is not a number"):
        read_labels(str(bad), "koniq", "/data")
    with pytest.raises(LabelError, match="needs an images prefix"):
        read_labels(str(no_zscore), "koniq")


def _write_kadid(path):
    path.write_text("dist_img,ref_img,dmos,var\n"
                    "I01_01_01.png,I01.png,4.57,0.496\n"
                    "I01_01_02.png,I01.png,4.33,0.869\n"
                    "I01_01_05.png,I01.png,2.03,0.447\n")
    return path


def test_kadid_uses_distorted_images_and_higher_is_better(tmp_path):
    labels = read_labels(str(_write_kadid(tmp_path / "dmos.csv")), "kadid", "s3://b/kadid10k/images")
    assert labels.table.to_pydict() == {
        "uri": ["s3://b/kadid10k/images/I01_01_01.png", "s3://b/kadid10k/images/I01_01_02.png",
                "s3://b/kadid10k/images/I01_01_05.png"],
        "label": [4.57, 4.33, 2.03]}
    assert labels.higher_is_better and labels.label_column == "dmos"


def test_kadid_empty_or_header_only_files_are_refused(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(LabelError, match="is empty"):
        read_labels(str(empty), "kadid", "/data")
    header = tmp_path / "header.csv"
    header.write_text("dist_img,ref_img,dmos,var\n")
    with pytest.raises(LabelError, match="has no rows"):
        read_labels(str(header), "kadid", "/data")
    with pytest.raises(LabelError, match="no label file at"):
        read_labels(str(tmp_path / "missing.csv"), "kadid", "/data")


def _write_live(root, n=12, names=None, mos=None):
    """The LIVE Challenge's Data folder: a cell array of names and a 1 x N row of MOS, as MATLAB saves them."""
    data = root / "Data"
    data.mkdir(parents=True, exist_ok=True)
    names = names or [f"t{i + 1}.bmp" for i in range(7)] + [f"{100 + i}.JPG" for i in range(n - 7)]
    cell = np.empty((len(names), 1), dtype=object)
    for i, name in enumerate(names):
        cell[i, 0] = name
    mos = np.linspace(20, 80, len(names)) if mos is None else np.asarray(mos, float)
    scipy.io.savemat(data / "AllImages_release.mat", {"AllImages_release": cell})
    scipy.io.savemat(data / "AllMOS_release.mat", {"AllMOS_release": mos[None, :]})
    return names, mos


def test_live_challenge_drops_the_training_images_and_defaults_to_images_folder(tmp_path):
    root = tmp_path / "ChallengeDB_release"
    names, mos = _write_live(root)
    assert isinstance(scipy.io.loadmat(root / "Data" / "AllImages_release.mat")["AllImages_release"][0, 0],
                      np.ndarray)  # really a MATLAB cell array
    labels = read_labels(str(root), "live-challenge")
    assert labels.table.column("uri").to_pylist() == [f"{root}/Images/{n}" for n in names[7:]]
    np.testing.assert_allclose(labels.table.column("label").to_numpy(), mos[7:])
    assert labels.higher_is_better and len(labels) == 5
    kept = read_labels(str(root / "Data"), "live-challenge", "s3://b/live/Images/", keep_training_images=True)
    assert kept.table.column("uri").to_pylist()[:2] == ["s3://b/live/Images/t1.bmp", "s3://b/live/Images/t2.bmp"]
    assert len(kept) == 12
    from_mat = read_labels(str(root / "Data" / "AllMOS_release.mat"), "live-challenge")
    assert from_mat.table.equals(labels.table)
    # Images may be read from where the names were joined: the dataset's Images/ folder, or the prefix given.
    assert default_allow_prefixes(labels) == default_allow_prefixes(from_mat) == (f"{root}/Images",)
    assert default_allow_prefixes(kept) == ("s3://b/live/Images/",)


def test_live_challenge_paths_relative_to_the_working_folder(tmp_path, monkeypatch):
    """A ``.mat`` named from inside ``Data/``, or ``Data`` from the root: images resolve to the dataset's folder."""
    root = tmp_path / "ChallengeDB_release"
    names, _ = _write_live(root)
    expected = [f"{root}/Images/{n}" for n in names[7:]]
    monkeypatch.chdir(root / "Data")
    assert read_labels("AllMOS_release.mat", "live-challenge").table.column("uri").to_pylist() == expected
    monkeypatch.chdir(root)
    assert read_labels("Data", "live-challenge").table.column("uri").to_pylist() == expected
    monkeypatch.chdir(tmp_path)
    assert read_labels("ChallengeDB_release", "live-challenge").table.column("uri").to_pylist() == expected


def test_live_challenge_errors(tmp_path):
    root = tmp_path / "live"
    _write_live(root)
    scipy.io.savemat(root / "Data" / "AllMOS_release.mat", {"MOS": np.ones((1, 12))})
    with pytest.raises(LabelError, match=r"has no variable 'AllMOS_release' \(variables: MOS\)"):
        read_labels(str(root), "live-challenge")
    scipy.io.savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.ones((1, 11))})
    with pytest.raises(LabelError, match="names 12 images but .* has 11 scores"):
        read_labels(str(root), "live-challenge")
    _write_live(root, mos=[50.0] * 9 + [np.nan] + [50.0] * 2)
    with pytest.raises(LabelError, match=r"entry 10 \(image '102.JPG'\): label in 'AllMOS_release' is not a number"):
        read_labels(str(root), "live-challenge")
    with pytest.raises(LabelError, match="--label-column does not apply"):
        read_labels(str(root), "live-challenge", label_column="MOS")


SPAQ = pd.DataFrame({"Image name": ["00001.png", "00002.png", "00003.png"], "MOS": [42.65, 81.2, 17.0],
                     "Brightness": [40.1, 70.0, 20.5], "Colorfulness": [30.0, 60.0, 10.0],
                     "Contrast": [35.0, 66.0, 12.0], "Noisiness": [50.0, 80.0, 25.0], "Sharpness": [45.0, 85.0, 5.0]})


def test_spaq_excel_and_csv_give_the_same_labels(tmp_path):
    xlsx = tmp_path / "MOS and Image attribute scores.xlsx"
    with pd.ExcelWriter(xlsx, engine="openpyxl") as writer:
        SPAQ.to_excel(writer, sheet_name="Sheet1", index=False)
    csv = tmp_path / "spaq.csv"
    SPAQ.to_csv(csv, index=False)
    from_excel = read_labels(str(xlsx), "spaq", "/data/spaq/TestImage")
    from_csv = read_labels(str(csv), "spaq", "/data/spaq/TestImage/")
    assert from_excel.table.equals(from_csv.table)
    assert from_excel.table.to_pydict() == {"uri": [f"/data/spaq/TestImage/{n}" for n in SPAQ["Image name"]],
                                           "label": SPAQ["MOS"].tolist()}
    sharpness = read_labels(str(xlsx), "spaq", "/data", label_column="Sharpness")
    assert sharpness.table.column("label").to_pylist() == SPAQ["Sharpness"].tolist()


def test_spaq_sheet_without_mos_is_refused(tmp_path):
    xlsx = tmp_path / "spaq.xlsx"
    SPAQ.drop(columns=["MOS"]).to_excel(xlsx, index=False, engine="openpyxl")
    with pytest.raises(LabelError, match="spaq label file .* has no column 'MOS'"):
        read_labels(str(xlsx), "spaq", "/data")
    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(b"PK\x03\x04 not really a workbook")
    with pytest.raises(LabelError, match="cannot read label file .*broken.xlsx as excel"):
        read_labels(str(broken), "spaq", "/data")


def test_generic_csv_parquet_and_jsonl(tmp_path):
    rows = [{"uri": "a.jpg", "mos": 3.5, "dmos": 20.0}, {"uri": "/abs/b.jpg", "mos": 4.0, "dmos": 10.0},
            {"uri": "s3://other/c.jpg", "mos": 1.5, "dmos": 70.0}]
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "l.csv", index=False)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "l.parquet")
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    expected_uris = ["s3://bucket/imgs/a.jpg", "/abs/b.jpg", "s3://other/c.jpg"]
    for name in ("l.csv", "l.parquet", "l.jsonl"):
        labels = read_labels(str(tmp_path / name), "generic", "s3://bucket/imgs")
        assert labels.table.to_pydict() == {"uri": expected_uris, "label": [3.5, 4.0, 1.5]}, name
        assert labels.higher_is_better
    dmos = read_labels(str(tmp_path / "l.csv"), "generic", label_column="dmos", lower_is_better=True)
    assert not dmos.higher_is_better and dmos.table.column("uri").to_pylist()[0] == "a.jpg"
    renamed = frame.rename(columns={"uri": "path"})
    renamed.to_csv(tmp_path / "p.csv", index=False)
    assert read_labels(str(tmp_path / "p.csv"), "generic", uri_column="path").table.column("label").to_pylist() == [
        3.5, 4.0, 1.5]


def test_generic_errors_name_the_row(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"uri": "a.jpg", "mos": 3}\n{"uri": "b.jpg", "mos": "good"}\n')
    with pytest.raises(LabelError, match=r"row 2 \(image 'b.jpg'\): label in 'mos' is not a number \('good'\)"):
        read_labels(str(tmp_path / "bad.jsonl"), "generic")
    (tmp_path / "dup.csv").write_text("uri,mos\na.jpg,1\nb.jpg,2\na.jpg,3\n")
    with pytest.raises(LabelError, match=r"line 4: image 'a.jpg' is labelled twice \(also line 2\)"):
        read_labels(str(tmp_path / "dup.csv"), "generic")
    (tmp_path / "blank.csv").write_text("uri,mos\na.jpg,1\n,2\n")
    with pytest.raises(LabelError, match="line 3 has no image name"):
        read_labels(str(tmp_path / "blank.csv"), "generic")
    (tmp_path / "nolabel.csv").write_text("uri,score\na.jpg,1\n")
    with pytest.raises(LabelError, match=r"has no column 'mos' \(columns: uri, score\)"):
        read_labels(str(tmp_path / "nolabel.csv"), "generic")


def test_layout_options_are_checked(tmp_path):
    path = _write_koniq(tmp_path / "k.csv")
    with pytest.raises(LabelError, match="unknown label layout 'tid2013'"):
        read_labels(str(path), "tid2013", "/data")
    with pytest.raises(LabelError, match="--lower-is-better applies to the generic layout only"):
        read_labels(str(path), "koniq", "/data", lower_is_better=True)
    with pytest.raises(LabelError, match="--uri-column applies to the generic layout only"):
        read_labels(str(path), "koniq", "/data", uri_column="path")


def test_label_files_are_read_through_fsspec():
    fs = fsspec.filesystem("memory")
    fs.pipe("/labels/koniq.csv", pd.DataFrame(_koniq_rows(), columns=KONIQ_COLUMNS).to_csv(index=False).encode())
    fs.pipe("/labels/koniq.csv.gz", __import__("gzip").compress(fs.cat("/labels/koniq.csv")))
    try:
        plain = read_labels("memory://labels/koniq.csv", "koniq", "s3://b/k/")
        packed = read_labels("memory://labels/koniq.csv.gz", "koniq", "s3://b/k/")
        assert plain.table.equals(packed.table) and len(plain) == 3
        _write_live_memory(fs)
        live = read_labels("memory://live", "live-challenge")
        assert live.table.column("uri").to_pylist() == ["memory://live/Images/8.bmp"]
    finally:
        fs.rm("/labels", recursive=True)
        fs.rm("/live", recursive=True)


def _write_live_memory(fs):
    import io

    names = np.empty((8, 1), dtype=object)
    for i in range(8):
        names[i, 0] = f"t{i + 1}.bmp" if i < 7 else "8.bmp"
    for var, value in (("AllImages_release", names), ("AllMOS_release", np.arange(8.0)[None, :])):
        buffer = io.BytesIO()
        scipy.io.savemat(buffer, {var: value})
        fs.pipe(f"/live/Data/{var}.mat", buffer.getvalue())


def test_names_are_joined_without_resolving_dot_segments_so_the_allowlist_refuses_them(tmp_path):
    """A label file's ``..`` after the images prefix (or in a relative path) reaches the allowlist as written."""
    labels = tmp_path / "labels.csv"
    labels.write_text("uri,mos\nok.png,1\n../../etc/passwd,2\nfile:///etc/passwd,3\ns3://other/x.png,4\n")
    read = read_labels(str(labels), "generic", "/data/set")
    uris = read.table.column("uri").to_pylist()
    assert uris == ["/data/set/ok.png", "/data/set/../../etc/passwd", "file:///etc/passwd", "s3://other/x.png"]
    allowlist = Allowlist(default_allow_prefixes(read))
    assert allowlist.check(uris[0]) == "file:///data/set/ok.png"
    for uri, reason in zip(uris[1:], ["'.' or '..' path segments", "outside", "outside"], strict=True):
        with pytest.raises(RejectedURI, match=reason):
            allowlist.check(uri)
    # Without an images prefix: the label file's folder; a relative path is made absolute, its dots kept.
    plain = read_labels(str(labels), "generic")
    assert default_allow_prefixes(plain) == (str(tmp_path),)
    on_s3 = Labels(read.table, True, "s3://b/sets/a/labels.csv", "generic", "mos")
    assert default_allow_prefixes(on_s3) == ("s3://b/sets/a/",)
    assert absolute_uri("../x.png").endswith("/../x.png") and absolute_uri("s3://b/x") == "s3://b/x"
