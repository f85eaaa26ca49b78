"""pneumo_ray.io.listing: what a scoring job was given, streamed in pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pneumo_ray.config import ConfigError
from pneumo_ray.io import listing, stores

from ..conftest import REPO


def rows(inputs):
    pages = list(listing.iter_listing([str(i) for i in inputs]))
    table = pa.Table.from_batches(pages, schema=listing.LISTING_SCHEMA)
    return pages, {r["image_uri"]: r for r in table.to_pylist()}


def test_a_folder_is_walked_in_pages_with_sizes_mtimes_and_symlinks(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "PAGE", 3)
    store = tmp_path / "store"
    (store / "a" / "b").mkdir(parents=True)
    for i in range(5):
        (store / "a" / f"x{i}.jpeg").write_bytes(b"j" * (i + 1))
    (store / "a" / "b" / "deep.PNG").write_bytes(b"png")
    (store / "notes.txt").write_text("not an image")
    target = tmp_path / "elsewhere.jpeg"
    target.write_bytes(b"0123456789")
    (store / "link.jpeg").symlink_to(target)
    (store / "broken.jpeg").symlink_to(tmp_path / "gone.jpeg")
    pages, found = rows([store])
    assert [p.num_rows for p in pages] == [3, 3, 2]  # streamed a page at a time
    assert len(found) == 8 and str(store / "notes.txt") not in found
    assert found[str(store / "a" / "x3.jpeg")]["image_bytes"] == 4
    assert (
        found[str(store / "a" / "x3.jpeg")]["image_mtime_ns"]
        == os.stat(store / "a" / "x3.jpeg").st_mtime_ns
    )
    assert found[str(store / "link.jpeg")]["image_bytes"] == 10  # the file it points to
    assert found[str(store / "broken.jpeg")]["image_bytes"] == -1  # gets a "no such file" row


def test_a_walk_says_which_files_it_left_out_for_their_names(tmp_path):
    store = tmp_path / "pacs"
    (store / "ST0" / "SE0").mkdir(parents=True)
    for name in ("IM0", "IM1", "IM2"):  # a DICOM export: files without a suffix
        (store / "ST0" / "SE0" / name).write_bytes(b"\0" * 128 + b"DICM")
    (store / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    (store / "notes.txt").write_text("not an image")
    (store / ".DS_Store").write_bytes(b"")  # hidden files are not worth a word
    (store / "a.DICOM").write_bytes(b"\0" * 128 + b"DICM")
    (store / "b.jpeg").write_bytes(b"j")
    said = []
    pages = list(listing.iter_listing([str(store)], report=said.append))
    found = {uri for page in pages for uri in page.column("image_uri").to_pylist()}
    assert found == {str(store / "a.DICOM"), str(store / "b.jpeg")}
    assert said == [
        f"{store}: left out 5 file(s) not named as images (4 without a suffix, 1 .txt); "
        "scored are .jpeg .jpg .png .dcm .dicom in any case; a manifest (--input list.txt) "
        "scores files of any name, DICOM exports without a suffix too"
    ]
    # the manifest the line suggests scores them
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(str(p) for p in (store / "ST0" / "SE0").iterdir()))
    assert len(rows([manifest])[1]) == 3
    said.clear()
    list(listing.iter_listing([str(store / "ST0" / "SE0" / "IM0")], report=said.append))
    assert said == []  # a file named on its own is taken as it is


def test_csv_manifests_are_parsed_as_csv(tmp_path):
    odd = tmp_path / "images" / "smith, john_1.jpeg"  # a comma in the name
    odd.parent.mkdir()
    odd.write_bytes(b"x" * 7)
    plain = tmp_path / "images" / "plain.jpeg"
    plain.write_bytes(b"y" * 3)
    with_header = tmp_path / "with_header.csv"
    with_header.write_text(f'image_uri,site\n"{odd}",north\nimages/plain.jpeg,south\n')
    _, found = rows([with_header])
    assert set(found) == {str(odd), str(plain)}  # relative to the manifest's folder
    assert found[str(odd)]["image_bytes"] == 7
    no_header = tmp_path / "no_header.csv"
    no_header.write_text(f'"{odd}",1\n{plain},2\n')
    assert set(rows([no_header])[1]) == {str(odd), str(plain)}
    text = tmp_path / "list.txt"
    text.write_text(f"{odd}\n\n{plain}\n")  # a text manifest takes each line whole
    assert set(rows([text])[1]) == {str(odd), str(plain)}


def test_manifests_with_sizes_and_mtimes_are_not_looked_up(tmp_path):
    manifest = tmp_path / "inventory.parquet"
    table = pa.table(
        {
            "key": ["s3://bucket/a.jpeg", "s3://bucket/b.jpeg"],  # never touched
            "size": pa.array([11, 12], pa.int32()),
            "last_modified": pa.array([1_000_000, 2_000_000], pa.timestamp("ms", tz="UTC")),
        }
    )
    pq.write_table(table, manifest)
    _, found = rows([manifest])
    assert found["s3://bucket/a.jpeg"]["image_bytes"] == 11
    assert found["s3://bucket/b.jpeg"]["image_mtime_ns"] == 2_000_000 * 1_000_000
    csv = tmp_path / "inventory.csv"
    csv.write_text("uri,size,mtime_ns\ns3://bucket/c.jpeg,5,77\n")
    assert rows([csv])[1]["s3://bucket/c.jpeg"]["image_mtime_ns"] == 77


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(stores.StoreError, match="no such folder"):
        rows([tmp_path / "nothing"])
    with pytest.raises(stores.StoreError, match="no such manifest"):
        rows([tmp_path / "nothing.csv"])
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"name": ["a"]}), bad)
    with pytest.raises(ConfigError, match="needs a column image_uri"):
        rows([bad])


def test_the_scoring_driver_never_imports_torch():
    """The driver lists, plans and commits; torch (about 450 MB) is only in the actors."""
    code = (
        "import sys; sys.argv = ['score.py', '--help'];"
        "import runpy;"
        'exec(\'try:\\n runpy.run_path("jobs/score.py", run_name="__main__")\\n'
        "except SystemExit:\\n pass');"
        "import pneumo_ray.scoring.score, pneumo_ray.scoring.ledger, pneumo_ray.io.listing;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
