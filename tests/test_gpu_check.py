"""benchmarks/gpu_check.py's CPU rehearsal (--dry-run) writes every step's rows, and the wheels
carried to the GPU machine cover what they need. Nothing here needs a GPU or the network."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_dry_run_writes_every_step(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, f"gpu_check --dry-run exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    files = sorted(p.name for p in tmp_path.iterdir())
    # the device tool returns at most 8 files, named in letters, digits, '.', '_' and '-'
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert all((tmp_path / f).is_file() and (tmp_path / f).stat().st_size < 16 * 2**20 for f in files)
    prefix = files[0].split("_")[0] + "_" + files[0].split("_")[1].split(".")[0]
    assert prefix.startswith("dryrun_") and f"{prefix}.log" in files and f"{prefix}.png" in files
    path = lambda step: tmp_path / f"{prefix}_{step}.csv"  # noqa: E731

    steps = {r["step"]: r for r in read_csv(path("steps"))}
    assert list(steps) == ["tests", "grid", "samfast", "tiles", "automasks"]
    assert all(r["status"] == "ok" and int(r["rows"]) > 0 for r in steps.values()), steps

    tests = read_csv(path("tests"))
    assert any(r["kind"] == "pytest" and "test_cuda_matches_stock" in r["test"] and r["status"] == "skipped" for r in tests)
    verify = {(r["backend"], r["dtype"]): r["status"] for r in tests if r["kind"] == "verify"}
    assert verify[("sdpa", "float32")] == verify[("auto", "bfloat16")] == "passed"
    assert verify[("flex", "float32")] == "refused"  # compiled flex is CUDA only

    grid = read_csv(path("grid"))
    assert {r["mode"] for r in grid} == {"stock", "stock-sdpa", "blocked", "sdpa", "bands", "flashbias", "flex", "auto"}
    assert {(r["scope"], r["batch"], r["dtype"]) for r in grid} == {(s, b, d) for s in ("layer", "encoder") for b in ("1", "2") for d in ("bfloat16", "float32")}
    assert all(r["status"] == ("refused" if r["mode"] == "flex" else "ok") for r in grid), [r for r in grid if r["status"] != "ok"]
    assert all(float(r["seconds"]) > 0 and r["peak_mb"] for r in grid if r["status"] == "ok")
    assert all(r["planner_mb"] for r in grid if r["scope"] == "encoder" and r["mode"] not in ("stock-sdpa", "flex"))

    samfast = read_csv(path("samfast"))
    assert [r["status"] for r in samfast if r["mode"] == "auto"] == ["ok"] and float(samfast[0]["img_per_s"]) > 0
    assert sum(r["status"] == "reference" for r in samfast) == 2

    tiles = read_csv(path("tiles"))
    assert {(r["job"], r["tile"]) for r in tiles} == {(j, t) for j in ("prompts", "auto") for t in ("256", "512")}
    assert all(r["status"] == "ok" and int(r["tiles"]) > 1 and r["peak_mb"] for r in tiles), tiles

    automasks = {r["job"].split(",")[0]: r for r in read_csv(path("automasks"))}
    assert automasks["segment --auto"]["status"] == "ok"
    amg = automasks["benchmarks/bench_amg.py (issue 22)"]
    assert amg["status"] == ("not landed" if not (BENCHMARKS / "bench_amg.py").exists() else "ok"), amg


def test_without_cuda_the_real_run_refuses_and_points_to_the_dry_run(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--dry-run" in done.stderr


def carried() -> dict[str, list[str]]:
    """gpu_requirements.txt: carried name -> the needs it records."""
    needs = {}
    for line in (BENCHMARKS / "gpu_requirements.txt").read_text().splitlines():
        requirement, _, comment = line.partition("#")
        if requirement.strip():
            name = requirement.split("==")[0].strip()
            assert comment.strip().startswith("needs:"), f"{name}: record its needs ('# needs: ...')"
            needs[norm(name)] = [norm(n) for n in comment.split("needs:")[1].split()]
    return needs


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages() -> set[str]:
    lines = (BENCHMARKS / "gpu_device_packages.txt").read_text().splitlines()
    return {norm(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def test_every_need_of_the_carried_wheels_is_carried_or_on_the_device():
    needs, device = carried(), device_packages()
    assert {"segment-anything", "pycocotools", "zarr", "imagecodecs"} <= set(needs)
    missing = {f"{name} needs {need}" for name, wanted in needs.items() for need in wanted if need not in needs and need not in device}
    assert not missing, missing
    assert {"torch", "numpy", "scikit-image", "matplotlib", "pytest"} <= device


@pytest.mark.slow
def test_what_sam_blocked_and_segment_import_is_carried_or_on_the_device(tmp_path):
    # Every distribution behind a module loaded by `import sam_blocked` and a tiled `segment`
    # run: carried, on the device, or sam_blocked itself. A new import fails here, not there.
    script = f"""
import importlib.metadata as m, json, sys
import numpy as np, tifffile
tifffile.imwrite({str(tmp_path / "a.tif")!r}, np.zeros((96, 96, 3), np.uint8), tile=(32, 32))
open({str(tmp_path / "p.json")!r}, "w").write(json.dumps({{"a.tif": [{{"foreground": [[5, 5]]}}]}}))
from sam_blocked import cli
assert cli.main(["segment", {str(tmp_path / "a.tif")!r}, "--prompts", {str(tmp_path / "p.json")!r}, "--tile", "64",
                 "--model-type", "tiny", "--device", "cpu", "--output", {str(tmp_path / "out")!r}]) == 0
found = m.packages_distributions()
print(json.dumps(sorted({{d for name in list(sys.modules) for d in found.get(name.split(".")[0], [])}})))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    used = {norm(d) for d in __import__("json").loads(done.stdout.strip().splitlines()[-1])}
    known = set(carried()) | device_packages() | {"sam-blocked"}
    assert not used - known, f"imported but neither carried nor on the device: {sorted(used - known)}"


def test_downloaded_wheels_match_the_requirements():
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        pytest.skip("no .whl/ here: run benchmarks/gpu_wheels.sh (needs the registry)")
    names = {norm(w.name.split("-")[0]): w for w in wheels}
    assert set(carried()) <= set(names) and len(names) == len(wheels), "one wheel per name, every requirement downloaded"
    for name, wanted in carried().items():
        with zipfile.ZipFile(names[name]) as z:
            metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        requires = {norm(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0]) for line in metadata.splitlines()
                    if line.startswith("Requires-Dist:") and "extra ==" not in line}  # fmt: skip
        assert requires == set(wanted), f"{name}: the wheel needs {sorted(requires)}, gpu_requirements.txt records {sorted(wanted)}"
    assert sum(w.stat().st_size for w in wheels) < 48 * 2**20  # with the tree, under the device's 64 MiB
