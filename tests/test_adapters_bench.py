"""benchmarks/bench_transformers.py runs end to end on a tiny size and writes its CSV, PNG and table."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_transformers.py"


@pytest.mark.slow
def test_bench_transformers_writes_rows_plot_and_table(tmp_path):
    args = ["--models", "vit_b", "--sizes", "128", "--repeat", "1", "--threads", "1", "--out-dir", str(tmp_path), "--machine", "test"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "transformers_test.csv", newline="") as f:
        rows = {r["mode"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"eager", "sdpa", "patched", "enabled"}
    assert all(r["status"] == "ok" and float(r["seconds"]) > 0 for r in rows.values()), rows
    assert (tmp_path / "transformers_test.png").stat().st_size > 0
    table = subprocess.run([sys.executable, str(SCRIPT), "--table", "--out-dir", str(tmp_path), "--machine", "test"],
                           capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert table.startswith("| model | size | batch | dtype | eager | sdpa | patched | enabled |")
