"""tools/shard_coco.py: faithful samples, manifest, determinism across workers, and real-COCO quirks."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
from PIL import Image

from ticod.data.coco import load_records

shard_coco = load_tool("shard_coco")


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def run(coco: Path, out: Path, split: str = "val", *extra: object) -> int:
    ann = coco / "annotations"
    args = ["--images", coco / split, "--instances", ann / f"instances_{split}.json"]
    args += ["--captions", ann / f"captions_{split}.json", "--out", out, "--split", split, "--no-progress"]
    return shard_coco.main([str(a) for a in [*args, *extra]])


@pytest.fixture
def coco_copy(demo_coco_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the demo dataset (for breaking it)."""
    return Path(shutil.copytree(demo_coco_dir, tmp_path / "coco"))


def test_samples_match_source_and_manifest_counts(demo_coco_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    assert run(demo_coco_dir, out, "train", "--samples-per-shard", 10) == 0
    summary = capsys.readouterr().out
    manifest = json.loads((out / "train-manifest.json").read_text())
    ann = demo_coco_dir / "annotations"
    records, categories = load_records(ann / "instances_train.json", ann / "captions_train.json")
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 4]
    assert manifest["total_samples"] == len(records) == 24
    assert manifest["categories"] == categories
    src = ann / "instances_train.json"
    assert manifest["sources"]["instances"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()

    read = {}
    for shard in manifest["shards"]:
        members = read_tar(out / shard["name"])
        assert len(members) == 2 * shard["samples"] and shard["bytes"] == (out / shard["name"]).stat().st_size
        keys = sorted({name.split(".")[0] for name in members})
        assert keys == shard["keys"]
        for key in keys:
            read[key] = (members[f"{key}.jpg"], json.loads(members[f"{key}.json"]))
    assert sum(s["samples"] for s in manifest["shards"]) == len(read)
    assert list(read) == sorted(read)  # image-id order across shards
    for rec in records:
        jpg, meta = read[f"{rec['image_id']:012d}"]
        assert jpg == (demo_coco_dir / "train" / rec["file_name"]).read_bytes()  # bytes untouched
        assert meta == rec
    boxes = sum(len(r["boxes"]) for r in records)
    assert "images written: 24 in 3 shards" in summary and f"boxes: {boxes} (" in summary
    assert "captions: 120" in summary and "skipped: 0" in summary


def test_workers_give_identical_shards(demo_coco_dir: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(demo_coco_dir, a, "train", "--samples-per-shard", 7, "--workers", 1) == 0
    assert run(demo_coco_dir, b, "train", "--samples-per-shard", 7, "--workers", 2) == 0
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == 5
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_max_shard_bytes_and_limit(demo_coco_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert run(demo_coco_dir, out, "train", "--max-shard-bytes", 30_000, "--limit", 10) == 0
    manifest = json.loads((out / "train-manifest.json").read_text())
    assert manifest["total_samples"] == 10 and len(manifest["shards"]) > 1
    # Every shard but a single-sample one respects the limit (tar pads to 10 KiB records).
    for s in manifest["shards"]:
        assert s["samples"] == 1 or s["bytes"] <= 30_000 + 10240


def test_refuses_to_mix_runs_and_overwrite_replaces(demo_coco_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    assert run(demo_coco_dir, out, "val", "--samples-per-shard", 2) == 0
    assert (out / "val-000003.tar").exists()
    assert run(demo_coco_dir, out, "val", "--samples-per-shard", 8) == 1
    assert "already has 5 file(s) of split 'val'" in capsys.readouterr().err
    assert run(demo_coco_dir, out, "train") == 0  # another split in the same dir is fine
    assert run(demo_coco_dir, out, "val", "--samples-per-shard", 8, "--overwrite") == 0
    assert sorted(p.name for p in out.glob("val-*")) == ["val-000000.tar", "val-manifest.json"]
    assert (out / "train-000000.tar").exists()


def test_corrupt_and_missing_images_are_skipped_and_reported(coco_copy: Path, tmp_path: Path, capsys) -> None:
    records, _ = load_records(coco_copy / "annotations/instances_val.json", None)
    truncated, garbage, missing = (coco_copy / "val" / r["file_name"] for r in records[:3])
    truncated.write_bytes(truncated.read_bytes()[:300])
    garbage.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    missing.unlink()
    out = tmp_path / "s"
    assert run(coco_copy, out, "val") == 0
    text = capsys.readouterr().out
    assert "skipped: 3" in text and "unreadable JPEG: 2" in text and "missing image file: 1" in text
    manifest = json.loads((out / "val-manifest.json").read_text())
    assert manifest["total_samples"] == 5
    assert manifest["skipped"] == {"missing image file": 1, "unreadable JPEG": 2}
    keys = {k for s in manifest["shards"] for k in s["keys"]}
    assert not keys & {f"{r['image_id']:012d}" for r in records[:3]}

    assert run(coco_copy, tmp_path / "strict", "val", "--strict") == 1
    err = capsys.readouterr().err
    assert "(--strict)" in err and ("unreadable JPEG" in err or "missing image file" in err)
    assert not list((tmp_path / "strict").glob("*.tar*"))  # no partial shard left behind


@pytest.mark.parametrize("verify", ["decode", "header"])
def test_jpeg_check_modes(coco_copy: Path, tmp_path: Path, verify: str) -> None:
    """Both modes skip truncated files and non-JPEGs; only ``decode`` sees a broken Huffman table."""
    records, _ = load_records(coco_copy / "annotations/instances_val.json", None)
    paths = [coco_copy / "val" / r["file_name"] for r in records[:3]]
    truncated, png, bogus = paths
    truncated.write_bytes(truncated.read_bytes()[:-200])
    Image.open(png).save(png, format="PNG")
    data = bytearray(bogus.read_bytes())
    dht = data.index(b"\xff\xc4")  # define-Huffman-table: code counts summing far over 256
    data[dht + 5 : dht + 21] = b"\xff" * 16
    bogus.write_bytes(bytes(data))
    out = tmp_path / verify
    assert run(coco_copy, out, "val", "--verify", verify) == 0
    manifest = json.loads((out / "val-manifest.json").read_text())
    assert manifest["jpeg_check"] == verify
    kept = {k for s in manifest["shards"] for k in s["keys"]}
    skipped = {r["image_id"] for r in records if f"{r['image_id']:012d}" not in kept}
    ids = [r["image_id"] for r in records[:3]]
    assert skipped == set(ids if verify == "decode" else ids[:2])
    assert manifest["total_samples"] == len(records) - len(skipped)


def test_grayscale_and_cmyk_jpegs_kept_untouched(coco_copy: Path, tmp_path: Path) -> None:
    records, _ = load_records(coco_copy / "annotations/instances_val.json", None)
    paths = [coco_copy / "val" / r["file_name"] for r in records[:2]]
    Image.open(paths[0]).convert("L").save(paths[0], quality=90)
    Image.open(paths[1]).convert("CMYK").save(paths[1], quality=90)
    out = tmp_path / "s"
    assert run(coco_copy, out, "val") == 0
    members = read_tar(out / "val-000000.tar")
    for path, mode in zip(paths, ["L", "CMYK"], strict=True):
        data = members[path.stem + ".jpg"]
        assert data == path.read_bytes() and Image.open(io.BytesIO(data)).mode == mode


def test_non_coco_json_is_a_clear_error(coco_copy: Path, tmp_path: Path, capsys) -> None:
    ann = coco_copy / "annotations" / "instances_val.json"
    data = json.loads(ann.read_text())
    ann.write_text(json.dumps({"images": data["images"], "categories": data["categories"]}))
    assert run(coco_copy, tmp_path / "s", "val") == 1
    assert "not a COCO annotation file: missing top-level key 'annotations'" in capsys.readouterr().err
    data["annotations"][0].pop("bbox")
    ann.write_text(json.dumps(data))
    assert run(coco_copy, tmp_path / "s", "val") == 1
    assert "annotations[0] is missing key 'bbox'" in capsys.readouterr().err
    ann.write_text("[1, 2, 3]")
    assert run(coco_copy, tmp_path / "s", "val") == 1
    assert "not a COCO annotation file (top level is list)" in capsys.readouterr().err


def test_empty_images_crowd_boxes_and_missing_captions(coco_copy: Path, tmp_path: Path, capsys) -> None:
    ann = coco_copy / "annotations"
    inst = json.loads((ann / "instances_val.json").read_text())
    caps = json.loads((ann / "captions_val.json").read_text())
    first, second = inst["images"][0]["id"], inst["images"][1]["id"]
    inst["annotations"] = [a for a in inst["annotations"] if a["image_id"] != first]  # no boxes
    crowd = next(a for a in inst["annotations"] if a["image_id"] == second)
    crowd["iscrowd"] = 1
    caps["annotations"] = [c for c in caps["annotations"] if c["image_id"] != second]  # no captions
    (ann / "instances_val.json").write_text(json.dumps(inst))
    (ann / "captions_val.json").write_text(json.dumps(caps))

    assert run(coco_copy, tmp_path / "skip", "val") == 0
    assert "no captions: 1" in capsys.readouterr().out
    assert run(coco_copy, tmp_path / "keep", "val", "--missing-captions", "keep") == 0
    members = read_tar(tmp_path / "keep" / "val-000000.tar")
    empty = json.loads(members[f"{first:012d}.json"])
    assert empty["boxes"] == [] and empty["category_ids"] == [] and len(empty["captions"]) == 5
    kept = json.loads(members[f"{second:012d}.json"])
    assert kept["captions"] == [] and kept["iscrowd"][kept["ann_ids"].index(crowd["id"])] == 1
    assert run(coco_copy, tmp_path / "err", "val", "--missing-captions", "error") == 1
    assert f"image {second}" in capsys.readouterr().err


def test_train_tokenizer_option(demo_coco_dir: Path, tmp_path: Path) -> None:
    from ticod.data.tokenizer import load_tokenizer

    out = tmp_path / "s"
    assert run(demo_coco_dir, out, "train", "--train-tokenizer", 300) == 0
    tok = load_tokenizer(out / "tokenizer")
    ids = tok("two red circles", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "two red circles" and 257 < len(tok) <= 300


def test_demo_generator_is_deterministic(tmp_path: Path) -> None:
    make = load_tool("make_demo_coco").make_demo_coco
    a, b = make(tmp_path / "a", 6, 2, seed=3), make(tmp_path / "b", 6, 2, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 6 + 2 + 4
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    c = make(tmp_path / "c", 6, 2, seed=4)
    assert (a / "annotations/captions_train.json").read_text() != (
        c / "annotations/captions_train.json"
    ).read_text()
    image = np.asarray(Image.open(next((a / "train").glob("*.jpg"))))
    assert image.ndim == 3 and min(image.shape[:2]) >= 96 and max(image.shape[:2]) <= 192
