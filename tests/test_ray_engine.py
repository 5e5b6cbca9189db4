"""`sam-blocked segment --engine ray` on a two-node Ray cluster on this machine, tiny SAM.

One cluster for the module (ray.cluster_utils.Cluster: two nodes of 1 CPU, small object
stores, every process on 127.0.0.1), started and shut down by a fixture. Each Ray run is
compared with the local engine on the same inputs: byte-for-byte the same files, the
same summary but for timing and worker fields. The local reference runs with one torch
thread, as each worker does (--cpus-per-worker 1): float sums depend on the thread count.
Random weights: the masks mean nothing; the plumbing is what is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: every Ray process on 127.0.0.1
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from sam_blocked import cli  # noqa: E402
from sam_blocked.engines.ray_worker import EXIT_AT, EXIT_MARKER, pack_crops, unpack_crops  # noqa: E402
from sam_blocked.inputs.images import ImageItem  # noqa: E402
from sam_blocked.outputs.images import ImageOutputs, remove_stray_partials, unique_token  # noqa: E402
from sam_blocked.summary import LOG_NAME, SUMMARY_NAME  # noqa: E402
from sam_blocked.tiles.crops import MaskCrop  # noqa: E402
from test_tiles_run import mosaic  # noqa: E402  (tests/ is on sys.path)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),  # Ray Data's own, on copying its context
]
AUTO = ("--auto", "--points-per-side", 4, "--pred-iou-thresh", 0, "--stability-score-thresh", 0)
DIES = "a-worker-dies-here.jpg"  # the tests' exit hook kills the first worker to write a mask of it
ENGINE_FLAGS = ("engine", "address", "workers", "gpus_per_worker", "cpus_per_worker", "output", "inputs")


def segment(*args: object) -> int:
    return cli.main(["segment", *map(str, args), "--model-type", "tiny"])


def segment_local(*args: object) -> int:
    """The local engine with one torch thread, as a worker with --cpus-per-worker 1 has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return segment(*args)
    finally:
        torch.set_num_threads(threads)


def summary_of(out: Path) -> dict:
    return json.loads((out / SUMMARY_NAME).read_text())


def files(out: Path) -> dict[str, bytes]:
    """Every output file but the summary and the log, by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in (SUMMARY_NAME, LOG_NAME)}


def partials(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".partial" in p.name or ".replaced" in p.name]


def comparable(summary: dict) -> dict:
    """The summary without timing and worker fields (and the flags that name the engine or the folders)."""
    drop = {"seconds", "peak_memory_bytes", "nodes", "workers"}
    kept = {k: v for k, v in summary.items() if k not in drop | {"engine", "output"}}
    kept["settings"] = {**summary["settings"], "flags": {k: v for k, v in summary["settings"]["flags"].items() if k not in ENGINE_FLAGS}}
    for key in ("done", "skipped", "failed"):
        kept[key] = [{k: v for k, v in entry.items() if k not in drop} for entry in summary[key]]
    return kept


def assert_same_run(local: Path, distributed: Path) -> None:
    assert files(local) == files(distributed), "the Ray run's files are byte-for-byte the local run's"
    assert comparable(summary_of(local)) == comparable(summary_of(distributed))
    assert not partials(distributed)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes of 1 CPU each on 127.0.0.1; the exit hook armed for the image DIES; Ray Data
    waits for every worker of a pool before it sends work."""
    from ray.cluster_utils import Cluster

    marker = tmp_path_factory.mktemp("hook") / "died"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EXIT_AT, DIES)  # inherited by the nodes, hence by every worker
        mp.setenv(EXIT_MARKER, str(marker))
        mp.setenv("RAY_DISABLE_USAGE_STATS", "1")  # no usage reports, no queries to a Prometheus that is not there
        # Both workers up before the first unit is sent, so that both get work however slowly one starts
        # (the engine itself sends work to the first worker ready).
        mp.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)
        node = {"num_cpus": 1, "object_store_memory": 200 * 2**20}
        started = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        try:
            started.add_node(**node)
            started.wait_for_nodes()
            started.marker = marker
            yield started
        finally:
            if ray.is_initialized():
                ray.shutdown()
            started.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of photographs: the examples, two more of scikit-image's, and a truncated JPEG."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg"):
        shutil.copy(EXAMPLES / name, folder / name)
    for name in ("rocket", "immunohistochemistry"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg", quality=90)
    whole = (EXAMPLES / "coffee.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    return folder


@pytest.fixture(scope="module")
def runs(cluster, photos, tmp_path_factory):
    """The folder through the local engine and through two Ray workers on two nodes."""
    local, distributed = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("ray")
    args = (photos, *AUTO, "--format", "both", "--overlay")
    codes = (
        segment_local(*args, "--output", local),
        segment(*args, "--output", distributed, "--engine", "ray", "--address", cluster.address, "--workers", 2),
    )
    return local, distributed, codes


@pytest.mark.slow
def test_a_folder_on_two_nodes_gives_the_local_engines_files(runs):
    local, distributed, codes = runs
    assert codes == (1, 1), "exit code 1: the truncated file failed, in both engines"
    assert len(files(distributed)) >= 5 * 4, "per image: its JSON, overlay, metadata.csv and a PNG at least"
    assert_same_run(local, distributed)


@pytest.mark.slow
def test_both_nodes_did_work_and_the_summary_says_who_did_what(runs, cluster):
    _, distributed, _ = runs
    summary = summary_of(distributed)
    assert summary["engine"] == "ray" and summary["counts"]["done"] == 5
    workers = summary["workers"]
    assert len(workers) == 2 and len({w["node"] for w in workers}) == 2, "one worker on each node"
    assert all(w["images"] >= 1 and w["busy_seconds"] > 0 and w["images_per_second"] > 0 for w in workers), "both nodes did work"
    assert sum(w["images"] for w in workers) == 6, "five images done and the truncated one tried, each once"
    nodes = {node.node_id[:12] for node in cluster.list_all_nodes()}
    assert {w["node"] for w in workers} == nodes
    # the thread rule (engines.ray.worker_threads): --cpus-per-worker 1 on nodes of 1 CPU, one
    # torch thread per worker, so a node's workers never run more threads than it has CPUs
    cpus = {node.node_id[:12]: 1 for node in cluster.list_all_nodes()}
    assert all(w["threads"] == 1 for w in workers), [w["threads"] for w in workers]
    for node in nodes:
        assert sum(w["threads"] for w in workers if w["node"] == node) <= cpus[node]
    for entry in summary["done"]:
        assert len(entry["workers"]) == 1 and set(entry["nodes"]) <= nodes
    assert "tiny with seeded random weights" in summary["settings"]["model"] and summary["settings"]["random_weights"] is True


def test_worker_threads_are_the_whole_cpus_ray_reserves():
    from sam_blocked.engines.ray import worker_threads

    assert [worker_threads(c) for c in (0.25, 0.5, 1, 1.5, 2, 3.99, 8)] == [1, 1, 1, 1, 2, 3, 8]


@pytest.mark.slow
def test_a_truncated_file_fails_alone_with_its_message(runs):
    local, distributed, _ = runs
    (failed,) = summary_of(distributed)["failed"]
    assert failed["image"] == "truncated.jpg" and "truncated" in failed["reason"]
    assert failed["reason"] == summary_of(local)["failed"][0]["reason"]
    assert len(failed["workers"]) == 1, "the worker that read it is named"
    assert f"failed truncated.jpg: {failed['reason']}" in (distributed / LOG_NAME).read_text()


@pytest.mark.slow
def test_a_rerun_skips_finished_images_and_redoes_only_the_rest(runs, photos, cluster):
    _, distributed, _ = runs
    before = {p: p.stat().st_mtime_ns for p in distributed.rglob("*.png")}
    (distributed / "rocket.json").unlink()  # as if the run had stopped before rocket's JSON
    code = segment(photos, *AUTO, "--format", "both", "--overlay", "--output", distributed, "--engine", "ray", "--address", cluster.address, "--workers", 2)
    assert code == 1
    summary = summary_of(distributed)
    assert [d["image"] for d in summary["done"]] == ["rocket.jpg"]
    assert summary["counts"]["skipped"] == 4 and [f["image"] for f in summary["failed"]] == ["truncated.jpg"]
    assert sum(w["images"] for w in summary["workers"]) == 2, "only rocket and the truncated file went to the workers"
    others = [p for p in before if not p.relative_to(distributed).as_posix().startswith("rocket")]
    assert others and all(p.stat().st_mtime_ns == before[p] for p in others), "finished images untouched"
    assert (distributed / "rocket.json").is_file() and not partials(distributed)


@pytest.mark.slow
def test_a_worker_killed_in_its_first_image_is_restarted_and_nothing_is_lost(cluster, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(EXAMPLES / "astronaut.jpg", folder / DIES)  # first in the run: the first image of its worker
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(EXAMPLES / name, folder / name)
    args = (folder, "--prompts", tmp_path / "prompts.json", "--format", "both", "--overlay", "--multimask")
    prompts = json.loads((EXAMPLES / "prompts.json").read_text())
    prompts[DIES] = prompts.pop("astronaut.jpg")
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    assert segment_local(*args, "--output", tmp_path / "local") == 0
    assert not cluster.marker.exists()
    assert segment(*args, "--output", tmp_path / "ray", "--engine", "ray", "--address", cluster.address, "--workers", 2) == 0
    assert cluster.marker.exists(), "a worker did exit in the middle of the image"
    summary = summary_of(tmp_path / "ray")
    assert [d["image"] for d in summary["done"]] == [DIES, "chelsea.jpg", "coffee.jpg"], "every image, once"
    assert sorted(w["restarts"] for w in summary["workers"]) == [0, 1], "the dead worker was restarted, once"
    assert_same_run(tmp_path / "local", tmp_path / "ray")


@pytest.mark.slow
def test_tiles_of_one_large_image_spread_over_both_workers_and_stitch_as_local(cluster, tmp_path):
    tifffile.imwrite(tmp_path / "mosaic.tif", mosaic(), tile=(128, 128), compression="zlib")
    args = (tmp_path / "mosaic.tif", *AUTO, "--tile", 256, "--overlap", 32, "--box-nms-thresh", 0.5)
    assert segment_local(*args, "--output", tmp_path / "local") == 0
    assert segment(*args, "--output", tmp_path / "ray", "--engine", "ray", "--address", cluster.address, "--workers", 2) == 0
    assert sorted(files(tmp_path / "ray")) == ["mosaic.json", "mosaic.labels.tif", "mosaic.objects.csv"]
    assert_same_run(tmp_path / "local", tmp_path / "ray")
    summary = summary_of(tmp_path / "ray")
    (done,) = summary["done"]
    assert done["tiles"] == done["encoder_passes"] == 15 and done["masks"] >= 10
    assert len(done["workers"]) == 2 and len(done["nodes"]) == 2, "both workers, on both nodes, did tiles of it"
    assert sum(w["tiles"] for w in summary["workers"]) == 15 and all(w["tiles_per_second"] > 0 for w in summary["workers"])


@pytest.mark.slow
def test_workers_that_do_not_fit_the_cluster_are_refused(cluster, tmp_path, capsys):
    code = segment(EXAMPLES / "coffee.jpg", "--auto", "--output", tmp_path / "out", "--engine", "ray", "--address", cluster.address, "--workers", 3)
    assert code == 2
    err = capsys.readouterr().err
    assert "--workers 3" in err and "the cluster has 2 CPU(s) and 0 GPU(s) on 2 node(s)" in err
    assert not (tmp_path / "out").exists(), "refused before anything was written"


@pytest.mark.slow
def test_without_an_address_a_local_ray_instance_is_started(tmp_path):
    """What a laptop run does: ray.init() here, shut down after; run in a subprocess, apart from the module's cluster."""
    env = {k: v for k, v in os.environ.items() if k not in (EXIT_AT, EXIT_MARKER, "RAY_ADDRESS")}
    command = [sys.executable, "-m", "sam_blocked", "segment", str(EXAMPLES / "chelsea.jpg"), "--auto", "--points-per-side", "2"]
    command += ["--output", str(tmp_path / "out"), "--model-type", "tiny", "--engine", "ray", "--workers", "1"]
    done = subprocess.run(command, env={**env, "RAY_DISABLE_USAGE_STATS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = summary_of(tmp_path / "out")
    assert summary["engine"] == "ray" and summary["counts"]["done"] == 1 and len(summary["workers"]) == 1
    assert "ray engine: 1 worker(s)" in done.stderr


# ----------------------------------------------------------------- fast: no cluster


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    assert segment(EXAMPLES / "coffee.jpg", "--auto", "--output", tmp_path / "out", "--engine", "ray") == 2
    assert "pip install 'sam-blocked[ray]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--workers", "2"], "--workers go with --engine ray"),
        (["--engine", "ray", "--workers", "0"], "--workers 0 must be a whole number >= 1"),
        (["--engine", "ray", "--gpus-per-worker", "-1"], "--gpus-per-worker -1.0 must be a number >= 0"),
        (["--engine", "ray", "--cpus-per-worker", "0"], "--cpus-per-worker 0.0 must be a number > 0"),
        (["--engine", "ray", "--device", "cuda:1"], "each Ray worker sees only the GPUs Ray gives it"),
        (["--engine", "ray", "--device", "cpu", "--gpus-per-worker", "1"], "GPUs they do not use"),
        (["--engine", "ray", "--tile", "auto"], "--tile auto sizes the tile to this machine's memory"),
    ],
)
def test_bad_engine_flags_exit_2_with_one_line(tmp_path, capsys, args, phrase):
    assert segment(EXAMPLES / "coffee.jpg", "--auto", "--output", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_engine_names_settings_that_the_command_line_spells_as_flags(tmp_path, capsys):
    from sam_blocked.engines.options import SegmentOptions
    from sam_blocked.engines.ray import RayEngine
    from sam_blocked.engines.ray_worker import _died
    from sam_blocked.errors import SettingError, spell
    from sam_blocked.models.load import ModelSettings
    from sam_blocked.tiles.plan import Tiling

    with pytest.raises(SettingError) as refused:
        RayEngine(ModelSettings("tiny", device="cpu"), gpus_per_worker=1)
    assert str(refused.value) == "device cpu with gpus_per_worker 1: the workers would hold GPUs they do not use; drop one"
    assert segment(EXAMPLES / "coffee.jpg", "--auto", "--output", tmp_path / "out", "--engine", "ray", "--device", "cpu", "--gpus-per-worker", 1) == 2
    assert "error: --device cpu with --gpus-per-worker 1.0: the workers would hold GPUs they do not use" in capsys.readouterr().err
    with pytest.raises(SettingError) as refused:  # before Ray starts
        RayEngine(ModelSettings("tiny", img_size=512)).prepare(SegmentOptions(tiling=Tiling(256)), prompt_mode=True)
    assert str(refused.value) == "tile 256 must be the model's input size (img_size 512): set img_size to 256"
    assert spell(refused.value, cli.FLAGS) == "--tile 256 must be the model's input size (--img-size 512): set --img-size to 256"
    died = _died(3)
    assert "try a smaller tile, points_per_batch or fewer workers per node" in str(died)
    assert "try a smaller --tile, --points-per-batch or fewer --workers per node" in spell(died, cli.FLAGS)


def test_importing_the_package_and_the_cli_does_not_import_ray():
    code = "import sys, sam_blocked, sam_blocked.cli, sam_blocked.segment, sam_blocked.engines; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}).returncode == 0


def test_crops_travel_as_packed_bits():
    rng = np.random.default_rng(0)
    crops = [MaskCrop(rng.random((h, w)) > 0.5, x0, y0, {"area": h * w, "tile": 3}) for h, w, x0, y0 in [(1, 1, 0, 0), (7, 13, 5, 9), (64, 3, 100, 2)]]
    packed = pack_crops(crops)
    assert sum(bits.nbytes for bits, *_ in packed) <= sum(-(-c.mask.size // 8) for c in crops)
    for crop, back in zip(crops, unpack_crops(packed)):
        np.testing.assert_array_equal(back.mask, crop.mask)
        assert (back.x0, back.y0, back.record, back.mask.dtype) == (crop.x0, crop.y0, crop.record, np.bool_)


def test_a_workers_staging_names_are_its_own_and_strays_are_removed(tmp_path):
    item = ImageItem(tmp_path / "photo.jpg", "photo.jpg")
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    a, b = (ImageOutputs(tmp_path, item, ("png", "coco"), overlay=False, token=unique_token()) for _ in range(2))
    for outputs in (a, b):
        outputs.begin(item, np.zeros((4, 6, 3), np.uint8), [])
        outputs.add({"area": 6, "bbox": [2, 1, 2, 1], "predicted_iou": 1.0, "point_coords": [], "stability_score": 1.0, "crop_box": [0, 0, 6, 4]}, mask)
    staged = partials(tmp_path)
    assert len(staged) == 2 and all((p / "0.png").is_file() for p in staged), "two attempts stage side by side, a folder each, never in one file"
    b.commit()  # b finishes; a died in the middle of its image
    assert (tmp_path / "photo" / "metadata.csv").is_file() and json.loads((tmp_path / "photo.json").read_text())["annotations"]
    (tmp_path / ".photo.json.partial").write_text("a local run's, not a worker's")
    (tmp_path / ".notes.partial.mine").write_text("not ours either")
    assert remove_stray_partials([tmp_path, tmp_path / "missing"]) == 1
    assert sorted(p.name for p in partials(tmp_path)) == [".notes.partial.mine", ".photo.json.partial"]
