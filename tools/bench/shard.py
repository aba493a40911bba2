"""Data prep: ``tools/shard_coco.py`` images/s vs. plain ``tar cf`` of the same files (the I/O ceiling).

``python tools/bench/shard.py [--images 600 --workers 2 --cold]``

Both sides, alternating, pack the same split (JPEG dir + instances and captions JSON) into a fresh output
directory on the same file system. ``shard_coco.py`` runs in this process through its ``main()`` (what
``python tools/shard_coco.py`` does, without interpreter start-up), so it includes loading and joining the
JSON files, checking every JPEG (a DCT-scaled draft decode that walks the whole entropy-coded stream), the
per-sample JSON, tar writing and the shard and manifest SHA-256s; a second row checks only the JPEG
headers and end marker (``--verify header``). ``tar`` only copies bytes. ``--cold``
drops the input files from the page cache before each pass (``posix_fadvise(DONTNEED)``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import Report, Row, Target, alternate, machine_info, make_demo_data, setup, workdir
from input import evict
from shard_coco import main as shard_coco_main  # tools/shard_coco.py (common puts tools/ on sys.path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=600, help="demo images to generate (without --coco)")
    p.add_argument("--image-min", type=int, default=360)
    p.add_argument("--image-max", type=int, default=640)
    p.add_argument("--coco", default="", help="an existing COCO dir (train/, annotations/) instead")
    p.add_argument("--split", default="train")
    p.add_argument("--workers", type=int, default=1, help="shard_coco.py --workers")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--cold", action="store_true", help="drop the inputs from the page cache before each pass")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # data prep never uses a GPU
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench_results/shard.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup(args)
    report = Report("shard", device, vars(args))
    with workdir() as tmp:
        if args.coco:
            coco = Path(args.coco)
        else:
            coco = make_demo_data(tmp, args.images, min_size=args.image_min, max_size=args.image_max)[0]
        images = coco / args.split
        ann = coco / "annotations"
        instances, captions = ann / f"instances_{args.split}.json", ann / f"captions_{args.split}.json"
        inputs = [*sorted(images.iterdir()), instances, captions]
        n_images = sum(1 for p in inputs if p.suffix == ".jpg")
        size = sum(p.stat().st_size for p in inputs)
        print(f"{n_images} images, {size / 2**20:.1f} MiB, shard_coco.py --workers {args.workers}")
        out = tmp / "out"

        def fresh() -> None:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            if args.cold:
                evict(inputs)

        def shard(verify: str) -> float:
            fresh()
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # its per-run summary
                code = shard_coco_main(
                    [
                        f"--images={images}",
                        f"--instances={instances}",
                        f"--captions={captions}",
                        f"--out={out}",
                        f"--split={args.split}",
                        f"--workers={args.workers}",
                        f"--samples-per-shard={args.samples_per_shard}",
                        f"--verify={verify}",
                        "--no-progress",
                    ]
                )
            elapsed = time.perf_counter() - start
            if code != 0:
                raise RuntimeError(f"shard_coco.py exited with {code}")
            return n_images / elapsed

        def tar() -> float:
            fresh()
            start = time.perf_counter()
            subprocess.run(["tar", "cf", str(out / "all.tar"), "-C", str(coco), args.split, *(
                str(p.relative_to(coco)) for p in (instances, captions))], check=True)  # fmt: skip
            return n_images / (time.perf_counter() - start)

        print("images/s:")
        sides = {
            "shard_coco": lambda: shard("decode"),
            "shard_coco_header": lambda: shard("header"),
            "tar": tar,
        }
        v = alternate(sides, repeats=args.repeats, warmup=args.warmup)
    cache = "cold page cache" if args.cold else "inputs in page cache"
    rows = [
        Row("tar cf (I/O ceiling)", v["tar"], "images/s"),
        Row(f"shard_coco.py --workers {args.workers}", v["shard_coco"], "images/s", "tar cf (I/O ceiling)"),
        Row("  ... --verify header", v["shard_coco_header"], "images/s", "tar cf (I/O ceiling)"),
    ]
    report.table(f"Data prep: {n_images} images, {size / 2**20:.0f} MiB, {cache}", rows)
    report.check(Target("shard_coco.py / tar (draft-decode check)", rows[1].ratio or 0.0, 0.5, True))
    report.check(Target("shard_coco.py --verify header / tar", rows[2].ratio or 0.0, 0.5, True))
    report.extra["dataset"] = {"images": n_images, "bytes": size}
    report.extra["cores"] = machine_info(device)["cores"]
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
