"""jobs/score.py: Ray Data batch scoring of image folders into committed Parquet runs."""

from __future__ import annotations

import io
import json
import shutil
import signal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pneumo_ray import faults
from pneumo_ray.scoring.score import (
    DECODE_BLOCK_MIN,
    OUTPUT_SCHEMA,
    committed_runs,
    read_scores,
    recover,
)

from ..conftest import CHEST_XRAY, FULLRES, REPO, run_job, start_job, stop_group
from ..dicom import transcode, write_dicom
from ..test_cluster import wait_for


def score(bundle, inputs, output, env, *extra, cwd=REPO):
    args = ["--model", str(bundle), "--output", str(output), *extra]
    for uri in inputs:
        args += ["--input", str(uri)]
    result = run_job("score.py", *args, env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def copy_images(target, sources):
    target.mkdir(parents=True, exist_ok=True)
    for source in sources:
        shutil.copy(source, target / source.name)
    return target


def check_rows(table, bundle):
    """Schema and value checks on scored rows."""
    card = json.loads((bundle / "card.json").read_text())
    df = table.to_pandas()
    assert table.schema.equals(OUTPUT_SCHEMA, check_metadata=False)
    ok = df[df["error"].isna()]
    assert len(ok) and ok["p_pneumonia"].between(0, 1).all()
    total = ok["p_normal"] + ok["p_bacterial"] + ok["p_viral"]
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
    # the scope check: out of scope, a reason and no call; in scope, no reason
    assert ok["in_scope"].notna().all() and ok["scope_score"].notna().all()
    outside = ok[~ok["in_scope"].astype(bool)]
    assert outside[["pred_binary", "pred_class", "knn_label"]].isna().all().all()
    assert outside["scope_reason"].notna().all() and outside["heatmap_uri"].isna().all()
    ok = ok[ok["in_scope"].astype(bool)]
    assert len(ok) and ok["scope_reason"].isna().all()
    threshold = card["models"]["binary"]["threshold"]
    expected = np.where(ok["p_pneumonia"] >= threshold, "pneumonia", "normal")
    assert (ok["pred_binary"] == expected).all()
    argmax = ok[["p_normal", "p_bacterial", "p_viral"]].to_numpy().argmax(axis=1)
    assert (ok["pred_class"] == np.array(["normal", "bacterial", "viral"])[argmax]).all()
    reference = set(pq.read_table(bundle / "knn_reference.parquet").column("image_uri").to_pylist())
    k = card["models"]["knn"]["k"]
    for neighbours, distances in zip(ok["knn_neighbors"], ok["knn_distances"], strict=True):
        assert len(neighbours) == k and set(neighbours) <= reference
        assert len(distances) == k and np.all(np.diff(distances) >= 0)
    assert set(ok["knn_label"]) <= {"normal", "bacterial", "viral"}
    assert (ok["anomaly_score"] > 0).all()
    assert (
        ok["is_anomaly"] == (ok["anomaly_score"] > card["models"]["autoencoder"]["threshold"])
    ).all()
    assert (df["model_version"] == card["model_version"]).all()
    assert df["scored_at"].notna().all()
    return df


def test_scores_a_folder_of_real_images(trained, tmp_path, job_env):
    bundle, _ = trained
    output = tmp_path / "scores"
    log = score(bundle, [FULLRES], output, job_env)
    table = read_scores(str(output))
    df = check_rows(table, bundle)
    expected = sorted(str(p) for p in FULLRES.rglob("*.jpeg"))
    assert sorted(df["image_uri"]) == expected  # every image exactly once
    assert df["error"].isna().all()
    # Plain pandas on the output folder reads the same committed rows.
    assert len(pd.read_parquet(output)) == len(expected)
    assert f"images listed: {len(expected)}" in log and f"scored: {len(expected)}" in log
    assert "images/s" in log and str(output) in log
    # Pneumonia images get a higher p_pneumonia on average than normal ones.
    is_pneumonia = df["image_uri"].str.contains("/PNEUMONIA/")
    assert df[is_pneumonia]["p_pneumonia"].mean() > df[~is_pneumonia]["p_pneumonia"].mean()


def _bad_files(folder):
    good = next((CHEST_XRAY / "test" / "NORMAL").glob("*.jpeg")).read_bytes()
    png = io.BytesIO()
    Image.new("1", (20000, 20000)).save(png, format="PNG")  # decompression bomb (tiny file)
    files = {
        "corrupt.jpeg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "truncated.jpeg": good[: len(good) // 3],
        "empty.png": b"",
        "notes.jpg": b"radiologist notes: not an image\n",
        "bomb.png": png.getvalue(),
        "UPPER.JPEG": good,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_bad_files_get_one_row_each_with_a_useful_error(trained, tmp_path, job_env):
    bundle, _ = trained
    folder = copy_images(tmp_path / "mixed", sorted((CHEST_XRAY / "test" / "NORMAL").glob("*"))[:5])
    _bad_files(folder)
    (folder / "README.txt").write_text("not scored: not an image suffix")
    output = tmp_path / "scores"
    log = score(bundle, [folder], output, job_env)
    df = read_scores(str(output)).to_pandas().set_index("image_uri")
    names = {uri.rsplit("/", 1)[1] for uri in df.index}
    assert len(df) == 11 and "README.txt" not in names  # 5 good + 6 image-named files
    errors = {uri.rsplit("/", 1)[1]: error for uri, error in df["error"].items()}
    assert errors["empty.png"] == "empty file (0 bytes)"
    assert "not a readable image" in errors["corrupt.jpeg"]
    assert "not a readable image" in errors["notes.jpg"]
    assert "truncated" in errors["truncated.jpeg"].lower() or "broken" in errors["truncated.jpeg"]
    assert "decompression bomb" in errors["bomb.png"] or "pixel limit" in errors["bomb.png"]
    assert pd.isna(errors["UPPER.JPEG"])  # any case of extension
    bad = df[df["error"].notna()]
    assert bad[["p_pneumonia", "anomaly_score", "pred_class", "knn_label"]].isna().all().all()
    assert "failed (row with error): 5" in log


def test_dicom_images_are_scored(trained, tmp_path, job_env):
    bundle, _ = trained
    folder = tmp_path / "dicom"
    folder.mkdir()
    sources = sorted((CHEST_XRAY / "test" / "PNEUMONIA").glob("*.jpeg"))[:4]
    kinds = [(8, "MONOCHROME2"), (8, "MONOCHROME1"), (16, "MONOCHROME2"), (16, "MONOCHROME1")]
    for source, (bits, photometric) in zip(sources, kinds, strict=True):
        gray = np.asarray(Image.open(source).convert("L"))
        dcm = folder / f"{source.stem}_{bits}_{photometric}.dcm"
        write_dicom(dcm, gray, bits, photometric)
        if bits == 16 and photometric == "MONOCHROME2":  # as a PACS stores it: JPEG Lossless
            transcode(dcm, dcm, "JPEGLosslessProcess14_1")
        # The same picture as PNG, stretched to the full range as a DICOM without a VOI
        # window is: the DICOM must score like it.
        low, high = int(gray.min()), int(gray.max())
        stretched = np.round((gray - low) / (high - low) * 255).astype(np.uint8)
        Image.fromarray(stretched).save(folder / f"{source.stem}_{bits}_{photometric}.png")
    write_dicom(folder / "lateral.dcm", gray, 16, view="LL")  # a lateral the models cannot read
    output = tmp_path / "scores"
    score(bundle, [folder], output, job_env)
    df = check_rows(read_scores(str(output)), bundle).set_index("image_uri")
    lateral = df.loc[str(folder / "lateral.dcm")]
    # scored, but out of scope: its probabilities stay, marked, and it gets no call
    assert pd.isna(lateral["error"]) and not lateral["in_scope"]
    assert lateral["scope_reason"].startswith("lateral or oblique view: DICOM ViewPosition LL")
    assert pd.isna(lateral["pred_binary"]) and pd.isna(lateral["pred_class"])
    assert 0 <= lateral["p_pneumonia"] <= 1
    df = df.drop(index=str(folder / "lateral.dcm"))
    assert len(df) == 8 and df["error"].isna().all()
    for dcm in (u for u in df.index if u.endswith(".dcm")):
        png = dcm[: -len(".dcm")] + ".png"
        assert abs(df.loc[dcm, "p_pneumonia"] - df.loc[png, "p_pneumonia"]) < 0.1


def test_incremental_rerun_scores_only_new_images(trained, tmp_path, job_env):
    bundle, _ = trained
    images = sorted((CHEST_XRAY / "test" / "PNEUMONIA").glob("*.jpeg"))
    folder = copy_images(tmp_path / "store", images[:6])
    output = tmp_path / "scores"
    score(bundle, [folder], output, job_env)
    copy_images(folder, images[6:9])
    log = score(bundle, [folder], output, job_env)
    assert "already scored (skipped): 6" in log and "scored: 3" in log
    assert len(committed_runs(str(output))) == 2
    df = read_scores(str(output)).to_pandas()
    assert sorted(df["image_uri"]) == sorted(str(folder / p.name) for p in images[:9])
    log = score(bundle, [folder], output, job_env)  # nothing new
    assert "nothing new to score" in log and len(committed_runs(str(output))) == 2
    log = score(bundle, [folder], output, job_env, "--rescore")
    assert "scored: 9" in log
    latest = read_scores(str(output), latest=True).to_pandas()
    assert len(latest) == 9 and latest["image_uri"].is_unique


def test_manifest_input_and_missing_files(trained, tmp_path, job_env):
    bundle, _ = trained
    images = sorted((CHEST_XRAY / "test" / "NORMAL").glob("*.jpeg"))[:3]
    manifest = tmp_path / "manifest.txt"
    missing = tmp_path / "gone.jpeg"
    manifest.write_text("image_uri\n" + "\n".join(str(p) for p in [*images, missing]) + "\n")
    output = tmp_path / "scores"
    score(bundle, [manifest], output, job_env)
    df = read_scores(str(output)).to_pandas().set_index("image_uri")
    assert len(df) == 4
    assert "no such file" in df.loc[str(missing), "error"]
    assert df.drop(index=str(missing))["error"].isna().all()


def score_args(bundle, folder, output, *extra):
    return ["--model", str(bundle), "--input", str(folder), "--output", str(output), *extra]


def link_images(folder, sources):
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        (folder / source.name).symlink_to(source)
    return folder


def test_a_killed_run_keeps_its_committed_parts_and_the_rerun_scores_the_rest(
    trained, tmp_path, job_env
):
    bundle, _ = trained
    sources = sorted((CHEST_XRAY / "test" / "PNEUMONIA").glob("*.jpeg"))[:40]
    folder = link_images(tmp_path / "store", sources)
    output = tmp_path / "scores"
    env = {**job_env, faults.KILL_AFTER_PART: "1"}  # the driver SIGKILLs itself after part 1
    job = start_job("score.py", score_args(bundle, folder, output, "--commit-every", "8"), env,
                    tmp_path / "killed.log")  # fmt: skip
    try:
        assert job.wait(timeout=600) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    finally:
        stop_group(job)
    [run] = committed_runs(str(output))
    part = output / f"run={run}" / "part-00000.parquet"
    kept = part.read_bytes()
    assert read_scores(str(output)).num_rows == 8
    assert len(pd.read_parquet(output)) == 8  # plain readers see no staged rows either
    assert list((output / "_staging").iterdir()), "the killed run left its work list behind"

    log = score(bundle, [folder], output, job_env, "--commit-every", "8")
    assert "already scored (skipped): 8" in log and "scored: 32" in log
    assert "parts committed: 4" in log and f"staged files of run {run}, which died" in log
    df = read_scores(str(output)).to_pandas()
    assert sorted(df["image_uri"]) == sorted(str(folder / p.name) for p in sources)  # once each
    assert part.read_bytes() == kept  # the committed part was not touched
    assert not list((output / "_staging").iterdir())


def test_a_new_model_rescores_and_transient_errors_are_retried_next_run(trained, tmp_path, job_env):
    bundle, _ = trained
    sources = sorted((CHEST_XRAY / "test" / "NORMAL").glob("*.jpeg"))[:6]
    folder = link_images(tmp_path / "store", sources)
    (folder / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    flaky = sources[0].name
    output = tmp_path / "scores"
    # Every read attempt of `flaky` fails as a timeout would: a transient error row.
    log = score(bundle, [folder], output, {**job_env, faults.READ_FAULTS: f"{flaky}:99"})
    assert "failed (row with error): 2, of which transient (retried next run): 1" in log
    df = read_scores(str(output)).to_pandas().set_index("image_uri")
    assert df.loc[str(folder / flaky), "error_kind"] == "transient"
    assert "injected transient read error" in df.loc[str(folder / flaky), "error"]
    assert df.loc[str(folder / "corrupt.jpeg"), "error_kind"] == "permanent"
    assert (
        df.drop(index=[str(folder / flaky), str(folder / "corrupt.jpeg")])["error_kind"]
        .isna()
        .all()
    )

    # Next night: the transient one is scored again (its first two reads fail, the third works:
    # retried within the run), the permanent one is not.
    log = score(bundle, [folder], output, {**job_env, faults.READ_FAULTS: f"{flaky}:2"})
    assert "already scored (skipped): 6" in log and "scored: 1" in log
    latest = read_scores(str(output), latest=True).to_pandas().set_index("image_uri")
    assert pd.isna(latest.loc[str(folder / flaky), "error"])

    # A new model: --only-new keeps the old rows, the default scores the store again.
    new_bundle = tmp_path / "bundle_v2"
    shutil.copytree(bundle, new_bundle)
    card = json.loads((new_bundle / "card.json").read_text())
    card["model_version"] = "pneumo-test-v2"
    (new_bundle / "card.json").write_text(json.dumps(card))
    log = score(new_bundle, [folder], output, job_env, "--only-new")
    assert "nothing new to score" in log
    log = score(new_bundle, [folder], output, job_env, "--batch-size", "2")
    assert "already scored (skipped): 0" in log and "scored: 6" in log
    df = read_scores(str(output)).to_pandas()
    assert (df["model_version"] == "pneumo-test-v2").sum() == 7
    log = score(new_bundle, [folder], output, job_env)
    assert "nothing new to score" in log


def test_a_second_job_on_the_same_output_is_refused_and_the_first_finishes(
    trained, tmp_path, job_env
):
    bundle, _ = trained
    sources = sorted((CHEST_XRAY / "test" / "PNEUMONIA").glob("*.jpeg"))[40:52]
    folder = link_images(tmp_path / "store", sources)
    output, release = tmp_path / "scores", tmp_path / "release"
    env = {**job_env, faults.HOLD_AFTER_PART: f"1:{release}"}  # job A waits after part 1
    first = start_job("score.py", score_args(bundle, folder, output, "--commit-every", "4"), env,
                      tmp_path / "first.log")  # fmt: skip
    try:
        wait_for(lambda: committed_runs(str(output)), 600, "job A's first part")
        staged = sorted(p for p in (output / "_staging").rglob("*") if p.is_file())
        assert staged  # A's work list
        second = run_job("score.py", *score_args(bundle, folder, output), env=job_env)
        assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"score.py: error: --output {output} is being scored by run ")
        assert f"pid {first.pid}" in last and "use another --output" in last
        assert sorted(p for p in (output / "_staging").rglob("*") if p.is_file()) == staged
        assert read_scores(str(output)).num_rows == 4  # B wrote nothing
        release.touch()
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        stop_group(first)
    df = read_scores(str(output)).to_pandas()
    assert sorted(df["image_uri"]) == sorted(str(folder / p.name) for p in sources)
    assert "nothing new to score" in score(bundle, [folder], output, job_env)  # lock released


def test_recover_finishes_a_commit_that_was_interrupted(tmp_path):
    output = tmp_path / "scores"
    staged = output / "_staging" / "r1"
    staged.mkdir(parents=True)
    pq.write_table(OUTPUT_SCHEMA.empty_table(), staged / "part-00000.parquet")
    (output / "_runs" / "r1").mkdir(parents=True)
    (output / "_runs" / "r1" / "part-00000.committing").write_text(
        json.dumps({"run_id": "r1", "part": 0, "rows": 0})
    )
    (output / "_staging" / "r2").mkdir()  # a run killed while staging: no marker
    (output / "_staging" / "mine").mkdir()  # the recovering run's own
    assert committed_runs(str(output)) == []  # committing is not committed
    done = recover(str(output), keep_run="mine")
    assert committed_runs(str(output)) == ["r1"]
    assert (output / "run=r1" / "part-00000.parquet").is_file()
    assert sorted(p.name for p in (output / "_runs" / "r1").iterdir()) == ["part-00000.committed"]
    assert sorted(p.name for p in (output / "_staging").iterdir()) == ["mine"]
    assert done[0] == "finished the commit of run r1 part-00000"
    assert "deleted the staged files of run r2, which died" in done


def test_runs_written_before_parts_are_still_read(tmp_path):
    output = tmp_path / "scores"
    (output / "run=old").mkdir(parents=True)
    table = OUTPUT_SCHEMA.empty_table().drop_columns(["error_kind"])  # the old schema
    row = {name: [None] for name in table.schema.names}
    row.update(image_uri=["/x/a.jpeg"], image_bytes=[10], image_mtime_ns=[5], error=["bad"])
    pq.write_table(pa.Table.from_pydict(row, schema=table.schema), output / "run=old" / "x.parquet")
    (output / "_runs").mkdir()
    (output / "_runs" / "old.json").write_text(json.dumps({"run_id": "old", "state": "committed"}))
    assert committed_runs(str(output)) == ["old"]
    df = read_scores(str(output)).to_pandas()
    assert df["image_uri"].tolist() == ["/x/a.jpeg"] and df["error_kind"].isna().all()


def test_gpu_decode_path_gives_the_same_rows_and_says_it_fell_back(trained, tmp_path, job_env):
    bundle, _ = trained
    folder = copy_images(
        tmp_path / "mixed", sorted((CHEST_XRAY / "test" / "PNEUMONIA").glob("*"))[:12]
    )
    Image.open(sorted(FULLRES.rglob("*.jpeg"))[0]).convert("L").save(folder / "as_png.png")
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = {}
    for mode in ("cpu", "gpu"):
        log = score(bundle, [folder], tmp_path / mode, job_env, "--decode", mode)
        decoder = "GPU (nvJPEG)" if mode == "gpu" else "CPU"
        # 14 images on 2 CPUs: the smallest decode blocks
        assert f"JPEG decode on {decoder} in blocks of {DECODE_BLOCK_MIN}" in log
        df = read_scores(str(tmp_path / mode)).to_pandas()
        df["has_heatmap"] = df.pop("heatmap_uri").notna()  # each run writes its own folder
        rows[mode] = df.drop(columns=["scored_at", "scored_on"]).sort_values("image_uri")
    # No CUDA here: the JPEGs' bytes reach the actor, which says it decoded them on its CPU
    # (the tasks decoded the PNG and the broken file, as CPU decode does).
    assert "falling back to the CPU decoder" in log
    assert len(rows["gpu"]) == 14 and rows["gpu"]["error"].notna().sum() == 1
    pd.testing.assert_frame_equal(
        rows["cpu"].reset_index(drop=True), rows["gpu"].reset_index(drop=True)
    )
