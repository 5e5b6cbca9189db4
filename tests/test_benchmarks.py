"""The benchmark scripts run end to end on tiny shapes and write their CSV and PNG.

They measure nothing here: each configuration runs in a child process, as in a real
sweep, and the test checks the rows' statuses and that the files exist.
"""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sam_blocked.attention.dispatch import auto_order

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{name} {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_bench_backends_writes_rows_and_plot(tmp_path):
    # vit_b layer at 128 px: an 8 x 8 token grid, batch 2; flex is refused on the CPU with its reason
    args = ["--scopes", "layer", "--models", "vit_b", "--sizes", "128", "--dtypes", "float32", "--batch", "2",
            "--repeat", "1", "--threads", "1", "--out-dir", str(tmp_path), "--machine", "test"]  # fmt: skip
    run_script("bench_backends.py", *args, "--modes", "stock", "stock-sdpa", "auto", "flex")

    rows = {r["mode"]: r for r in read_csv(tmp_path / "backends_test.csv")}
    assert set(rows) == {"stock", "stock-sdpa", "auto", "flex"}
    for mode in ("stock", "stock-sdpa", "auto"):
        assert rows[mode]["status"] == "ok", rows[mode]
        assert float(rows[mode]["seconds"]) > 0
        assert rows[mode]["batch"] == "2" and rows[mode]["tokens"] == "64"
    # auto's first CPU float32 choice for an 8 x 8 global grid, as the backends module states it
    assert rows["auto"]["backend_used"] == auto_order("cpu", (8, 8), 64)[0] == "bands"
    assert rows["flex"]["status"] == "refused" and "flex on the CPU" in rows["flex"]["note"]
    assert (tmp_path / "backends_test.png").stat().st_size > 0
    table = run_script("bench_backends.py", "--table", "--out-dir", str(tmp_path), "--machine", "test")
    assert table.startswith("| scope | model | size | batch | dtype | stock | stock-sdpa | flex | auto |")
    assert "| layer | vit_b | 128 | 2 | float32 | " in table and "| refused |" in table

    # a second sweep keeps the first one's rows and adds its own
    run_script("bench_backends.py", *args, "--modes", "blocked")
    assert {r["mode"] for r in read_csv(tmp_path / "backends_test.csv")} == {"stock", "stock-sdpa", "auto", "flex", "blocked"}


@pytest.mark.slow
def test_bench_resolution_writes_rows_and_plot(tmp_path):
    run_script("bench_resolution.py", "--models", "tiny", "--sizes", "64", "128", "--modes", "stock", "budget",
               "--dtypes", "float32", "bfloat16", "--threads", "1", "--gemm-size", "256",  # a bfloat16 2048^3 GEMM took 20 s on CPUs without bf16 instructions
               "--out-dir", str(tmp_path), "--machine", "test")  # fmt: skip

    rows = read_csv(tmp_path / "resolution_test.csv")
    assert {(r["size"], r["dtype"], r["mode"]) for r in rows} == {
        (size, dtype, mode) for size in ("64", "128") for dtype in ("float32", "bfloat16") for mode in ("stock", "budget")
    }
    assert all(r["status"] == "ok" for r in rows), rows
    for r in rows:  # the planner's predictions and the floor ratio beside each measurement
        assert float(r["planned_mb"]) > 0 and float(r["gemm_gflops"]) > 0 and float(r["floor_ratio"]) > 0 and float(r["gflop"]) > 0
        assert float(r["tensor_peak_mb"]) > 0 and float(r["planned_tensor_mb"]) > 0  # the tensors alone, counted by the profiler
    assert (tmp_path / "resolution_test.png").stat().st_size > 0
    table = run_script("bench_resolution.py", "--table", "--out-dir", str(tmp_path), "--machine", "test")
    assert table.startswith("| model | size | dtype | mode | blocks run | status | extra peak MiB | planned (CPU: bound) | ratio | tensors' peak MiB |")
    assert "| tiny | 128 | bfloat16 | budget 32 MiB | all | ok |" in table

    # a long run's memory from the first blocks and the neck: its own rows, no floor ratio
    run_script("bench_resolution.py", "--models", "tiny", "--sizes", "128", "--modes", "budget", "--blocks", "1",
               "--threads", "1", "--out-dir", str(tmp_path), "--machine", "test")  # fmt: skip
    rows = read_csv(tmp_path / "resolution_test.csv")
    truncated = [r for r in rows if r["blocks"]]
    assert len(rows) == 9 and [r["blocks"] for r in truncated] == ["0-0 + neck"]
    assert truncated[0]["status"] == "ok" and truncated[0]["floor_ratio"] == "" and float(truncated[0]["planned_mb"]) > 0


@pytest.mark.slow
def test_bench_memory_writes_rows_with_the_floor_ratio(tmp_path):
    run_script("bench_memory.py", "--targets", "layer", "encoder", "--grid", "8", "--img-size", "128", "--chunks", "4",
               "--repeat", "1", "--threads", "1", "--out", str(tmp_path))  # fmt: skip
    rows = read_csv(tmp_path / "memory_cpu.csv")
    assert {(r["target"], r["mode"]) for r in rows} == {(t, m) for t in ("layer", "encoder") for m in ("stock", "patched")}
    assert all(float(r["floor_ratio"]) > 0 and float(r["gemm_gflops"]) > 0 for r in rows), rows
    assert (tmp_path / "memory_cpu.png").stat().st_size > 0


def test_bench_backends_refuses_bad_arguments():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_backends.py"), "--sizes", "100"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "multiples of 16" in done.stderr


@pytest.mark.slow
def test_bench_ray_writes_rows_plot_and_the_overhead_table(tmp_path):
    pytest.importorskip("ray")
    out = run_script("bench_ray.py", "--images", "1", "2", "--configs", "local1", "ray1", "--out-dir", str(tmp_path), "--machine", "test")

    rows = read_csv(tmp_path / "ray_test.csv")
    assert {(r["engine"], r["workers"], r["images"]) for r in rows} == {("local", "1", "1"), ("local", "1", "2"), ("ray", "1", "1"), ("ray", "1", "2")}
    assert all(r["status"] == "ok" and float(r["run_seconds"]) > 0 and float(r["worker_seconds_per_image"]) > 0 for r in rows), rows
    assert "| tiny | prompts | ray | 1 |" in out and "worker " in out and "end to end" in out
    assert (tmp_path / "ray_test.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_tiles_writes_rows_table_and_picture(tmp_path):
    # tiny at 256 px tiles on a 600 x 500 mosaic: prompt mode needs 4 of its 9 tiles, automatic mode all 9
    common = ["--models", "tiny", "--tiles", "256", "--threads", "1", "--out-dir", str(tmp_path), "--machine", "test",
              "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    run_script("bench_tiles.py", *common, "--sizes", "600x500", "200")
    run_script("bench_tiles.py", *common, "--sizes", "600x500", "--mode", "auto", "--points-per-side", "3")

    rows = {(r["mode"], r["width"], r["height"]): r for r in read_csv(tmp_path / "tiles_test.csv")}
    assert set(rows) == {("prompts", "600", "500"), ("auto", "600", "500")}, "200 px fits one tile: skipped"
    assert all(r["status"] == "ok" for r in rows.values()), rows
    prompts, auto = rows[("prompts", "600", "500")], rows[("auto", "600", "500")]
    assert (prompts["tiles"], prompts["encoder_passes"], prompts["masks"]) == ("9", "4", "5"), "five prompt sets, two in one tile"
    assert auto["tiles"] == auto["encoder_passes"] == "9" and auto["duplicates"] == "0"
    assert float(prompts["peak_mb"]) > float(prompts["model_mb"]) > 0 and float(prompts["write_s"]) >= 0
    assert (tmp_path / "tiles_test.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["mosaic_600x500.tif"]
    table = run_script("bench_tiles.py", "--table", "--out-dir", str(tmp_path), "--machine", "test")
    assert table.startswith("| mode | model | image px | tile px | tiles | encoder passes |")
    assert "| prompts (5 sets) | tiny | 600 x 500 | 256 | 9 | 4 | 5 |" in table and "| auto (3 pts/side) | tiny | 600 x 500 | 256 | 9 | 9 |" in table

    picture = tmp_path / "labels.png"
    out = run_script("bench_tiles.py", "--picture", str(picture), "--picture-size", "600x500", "--tiles", "256",
                     "--points-per-side", "3", "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert "9 tiles" in out and picture.stat().st_size > 0


def test_bench_tiles_inputs_hold_the_mosaic_tiffs_pixels(tmp_path):
    # the OME-Zarr and GeoTIFF exactly, level 1 of the zarr at every 2nd pixel; the slide through JPEG, closely
    sys.path.insert(0, str(BENCHMARKS))
    import bench_tiles
    import tifffile

    from sam_blocked.inputs.base import ReadSettings
    from sam_blocked.inputs.sources import open_image

    expected = tifffile.imread(bench_tiles.mosaic_tiff(tmp_path, 4100, 2100))  # (2100, 4100, 3): the OME-Zarr has 2 levels
    box = (500, 300, 2013, 1811)  # odd sizes, across chunks and tiles
    window = expected[300:1811, 500:2013]
    for kind, tolerance in (("ome-zarr", 0), ("geotiff", 0), ("slide", 8)):
        with open_image(bench_tiles.mosaic_image(kind, tmp_path, 4100, 2100)) as source:
            read = source.read(box).astype(int)
            assert (source.width, source.height) == (4100, 2100), kind
            assert np.abs(read - window).mean() <= tolerance, f"{kind}: mean difference {np.abs(read - window).mean():.2f}"
            assert (kind == "geotiff") == (source.geo is not None), kind
    with open_image(tmp_path / "mosaic_4100x2100.ome.zarr", read=ReadSettings(level=1)) as source:
        assert (source.read((0, 0, 2050, 1050)) == expected[::2, ::2]).all() and source.mpp == 2 * bench_tiles.SLIDE_MPP
    with open_image(tmp_path / "mosaic_4100x2100.svs", read=ReadSettings(level=1)) as source:
        assert (source.width, source.height, source.downsample) == (1025, 525, 4.0)


@pytest.mark.slow
def test_bench_tiles_segments_each_input_into_each_writer(tmp_path):
    args = ["--models", "tiny", "--tiles", "256", "--threads", "1", "--out-dir", str(tmp_path), "--machine", "test",
            "--cache-dir", str(tmp_path / "cache"), "--sizes", "600x500", "--write-dir", str(tmp_path)]  # fmt: skip
    run_script("bench_tiles.py", *args, "--inputs", "slide", "ome-zarr", "--formats", "ome-tiff,ngff,geojson,gpkg")
    run_script("bench_tiles.py", *args, "--inputs", "geotiff", "--formats", "cog")

    rows = {(r["input"], r["formats"]): r for r in read_csv(tmp_path / "tiles_test.csv")}
    assert set(rows) == {("slide", "ome-tiff,ngff,geojson,gpkg"), ("ome-zarr", "ome-tiff,ngff,geojson,gpkg"), ("geotiff", "cog")}
    for r in rows.values():
        assert r["status"] == "ok" and (r["tiles"], r["encoder_passes"], r["masks"]) == ("9", "4", "5"), r
        assert float(r["peak_mb"]) >= float(r["segment_peak_mb"]) > float(r["model_mb"]) > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("bench_tiles_")) == [], "outputs deleted after"
    table = run_script("bench_tiles.py", "--table", "--out-dir", str(tmp_path), "--machine", "test")
    assert "| slide | ome-tiff,ngff,geojson,gpkg | prompts (5 sets) | tiny | 600 x 500 | 256 | 4 | 5 |" in table
    assert "| geotiff | cog |" in table


def test_bench_tiles_refuses_bad_arguments():
    for args, message in ((["--sizes", "8000x"], "WIDTHxHEIGHT"), (["--tiles", "1000"], "multiples of 16"),
                          (["--formats", "labels,tiff"], "--formats tiff")):
        done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_tiles.py"), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.slow
def test_bench_contention_writes_rows_plot_and_table(tmp_path):
    # tiny model at 64 px, quiet and beside one busy process: four fresh children, busy process killed after each
    run_script("bench_contention.py", "--model-type", "tiny", "--img-size", "64", "--repeat", "1", "--threads", "1",
               "--busy", "0", "1", "--out-dir", str(tmp_path), "--machine", "test")  # fmt: skip
    rows = read_csv(tmp_path / "contention_test.csv")
    assert {(r["mode"], r["busy"]) for r in rows} == {(m, b) for m in ("stock", "patched") for b in ("0", "1")}
    for r in rows:
        assert r["status"] == "ok" and r["threads"] == "1" and r["wait_policy"] == "default", r
        assert 0 < float(r["seconds"]) == min(float(r["second_s"]), float(r["third_s"])), r  # best of two after the warm-up
    assert (tmp_path / "contention_test.png").stat().st_size > 0
    table = run_script("bench_contention.py", "--table", "--out-dir", str(tmp_path), "--machine", "test")
    assert table.startswith("| model | px | OMP_WAIT_POLICY | threads | load | mode | runs | median s | range s | x stock |")
    assert "| tiny | 64 | default | 1 | 1 busy | patched | 1 |" in table
