"""Packaging: the torch / torchvision check at import, the dependency floors, and a non-editable install."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from helpers import FAST, ok, train_env

import ticod
from ticod.config import SHIPPED_CONFIGS, ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("ticod-train", "ticod-eval", "ticod-predict", "ticod-export", "ticod-shard-coco")


def fake_versions(torch: str, torchvision: str):
    return {"torch": torch, "torchvision": torchvision}.__getitem__


def test_matched_pair_passes_and_the_installed_one_too(monkeypatch):
    ticod.check_torch_pair()  # this environment's pair
    monkeypatch.setattr(ticod.metadata, "requires", lambda name: ["torch>=2.6", "torchvision>=0.21"])
    ticod.check_torch_pair(fake_versions("2.6.0+cu124", "0.21.0+cu124"))
    ticod.check_torch_pair(fake_versions("2.14.1", "0.29.1"))


def test_mismatched_pair_fails_in_one_line_naming_both():
    with pytest.raises(ImportError) as e:
        ticod.check_torch_pair(fake_versions("2.14.1", "0.28.0"))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("torchvision 0.28.0 does not match torch 2.14.1") and "0.29" in msg


def test_torch_below_the_floor_fails_in_one_line(monkeypatch):
    monkeypatch.setattr(ticod.metadata, "requires", lambda name: ["numpy>=1.26", "torch>=2.6", "timm"])
    with pytest.raises(ImportError, match=r"^torch 2\.4\.1 is too old: TICOD needs torch>=2\.6 ") as e:
        ticod.check_torch_pair(fake_versions("2.4.1", "0.19.1"))  # a matched, but old, pair
    assert "\n" not in str(e.value)


def test_import_ticod_stops_on_a_mismatched_torchvision(tmp_path):
    """A torchvision 0.19 distribution first on the path: ``import ticod`` fails with that one line."""
    info = tmp_path / "torchvision-0.19.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.19.0\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", "import ticod"], env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: torchvision 0.19.0 does not match torch "), proc.stderr


def requirements(extra: bool = False) -> list[str]:
    """pyproject.toml's dependencies (with ``extra``: also the dev ones), as the installed metadata has them."""
    reqs = metadata.requires("ticod") or []
    return [r.split(";")[0].strip() for r in reqs if extra or "extra ==" not in r]


def test_declared_floors_are_a_matched_pair():
    deps = requirements()
    floors = {d.split(">=")[0]: d.split(">=")[1].split(",")[0] for d in deps if ">=" in d}
    torch_mm, vision_mm = ticod._major_minor(floors["torch"]), ticod._major_minor(floors["torchvision"])
    assert vision_mm == (0, torch_mm[1] + ticod.TORCHVISION_MINOR_OFFSET)
    assert not [d for d in deps if "==" in d], "exact pins belong in constraints.txt"


def test_lock_pins_every_dependency_exactly():
    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[name.lower().replace("_", "-")] = version
    assert all(lock.values()), "every line of constraints.txt is name==version"
    for dep in requirements(extra=True):
        name = re.match(r"[A-Za-z0-9_.-]+", dep)[0].lower().replace("_", "-")  # "pytest<9.2,>=8": pytest
        assert name in lock, f"{name} is not pinned in constraints.txt"


def test_shipped_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    assert SHIPPED_CONFIGS.resolve() == (ROOT / "configs").resolve()  # one copy: the package links to it
    monkeypatch.chdir(tmp_path)
    for name, file in (("ticod_large", "ticod_large.yaml"), ("ablation/joint.yaml", "ablation/joint.yaml")):
        by_path = load_config(ROOT / "configs" / file, ["max_steps=700"])
        assert to_dict(load_config(name, ["max_steps=700"])) == to_dict(by_path)
    (tmp_path / "ticod_large.yaml").write_text("max_steps: 3000\n")
    assert load_config("ticod_large.yaml").max_steps == 3000  # a file that exists wins over a shipped name
    with pytest.raises(
        ConfigError, match=r"config file not found: ticod_largest \(shipped configs: .*ticod_large"
    ):
        load_config("ticod_largest")


def source_copy(dest: Path) -> Path:
    """What a fresh clone holds: tracked files and new ones git does not ignore (no .venv, runs, builds)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_symlink() or src.is_file():  # deleted-but-tracked files are skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


@pytest.mark.slow
@pytest.mark.parallel_ok  # one process at a time
def test_pip_install_without_e_runs_the_commands_outside_the_clone(demo_coco_dir, demo_shards_dir, tmp_path):
    """``pip install CLONE`` (a wheel, not editable) into a fresh venv whose dependencies are already there
    (this environment's, as a cluster's own torch would be). From a dir outside the clone the console
    scripts shard a split, train ``--config demo`` 2 steps with a final eval, evaluate the export and
    predict; the export's model card holds the final eval's metrics.
    """
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy the clone from")
    clone, venv, work = source_copy(tmp_path / "clone"), tmp_path / "venv", tmp_path / "outside"
    ok(
        subprocess.run(
            [sys._base_executable, "-m", "venv", "--without-pip", venv], capture_output=True, text=True
        )
    )
    python = venv / "bin" / "python"
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "deps.pth").write_text(
        sysconfig.get_path("purelib") + "\n"
    )  # the deps only: its .pth files stay off
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index"]
    ok(subprocess.run([*pip, "--no-build-isolation", clone], capture_output=True, text=True, timeout=600))
    work.mkdir()
    env = train_env({"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    env.pop("PYTHONPATH", None)

    def run(*cmd: str | Path) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(c) for c in cmd], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        ok(proc)
        return proc

    # Where `import ticod` resolves (find_spec runs no package code): the install, not the clone or ROOT.
    where = run(python, "-c", "import importlib.util as u; print(u.find_spec('ticod').origin)").stdout
    assert Path(where.strip()) == site / "ticod" / "__init__.py"
    assert all((venv / "bin" / name).is_file() for name in COMMANDS)

    ann = demo_coco_dir / "annotations"
    shard = ["--images", demo_coco_dir / "val", "--instances", ann / "instances_val.json", "--out", "shards"]
    run(
        "ticod-shard-coco", *shard, "--captions", ann / "captions_val.json", "--split", "val", "--no-progress"
    )
    assert json.loads((work / "shards" / "val-manifest.json").read_text())["total_samples"] == 8
    train = ["run_dir=run", f"data.shards_dir={demo_shards_dir}", "max_steps=2", "deepspeed.zero_stage=0"]
    run("ticod-train", "--config", "demo", *train, *FAST, "eval.at_end=true", "eval.bertscore=false")
    (final_eval,) = (work / "run" / "eval").glob("step_*/metrics.json")
    metrics = json.loads(final_eval.read_text())
    card = (work / "run" / "export" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: ticod\n")
    assert f"| AP | {metrics['AP']:.4f} |" in card and f"| CIDEr | {metrics['CIDEr']:.4f} |" in card

    run(
        "ticod-eval",
        "--checkpoint",
        "run/export",
        "--data",
        "shards",
        "--out",
        "eval",
        "eval.bertscore=false",
    )
    assert json.loads((work / "eval" / "metrics.json").read_text())["num_images"] == metrics["num_images"]
    image = sorted((demo_coco_dir / "val").glob("*.jpg"))[0]
    run("ticod-predict", "--checkpoint", "run/export", image, "--out", "preds")
    assert (work / "preds" / f"{image.stem}.json").is_file()
