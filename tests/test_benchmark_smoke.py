"""The benchmark's smoke configuration, end to end: real worker processes, optimum's own export,
PyTorch generate() and edgecap on one tiny random model. Checks what the numbers rest on (equal
tokens, every report field, baselines timed without extra work), never the timings themselves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Every format edgecap ships for the CPU, so the main benchmark's default systems all run here.
SYSTEMS = ["pytorch", "optimum-fp32", "edgecap-fp32", "edgecap-int8", "edgecap-int8-block",
           "edgecap-int4"]
CASES = ["greedy:1", "beam4:2"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[dict, Path, Path]:
    pytest.importorskip("optimum.onnxruntime")
    work, out = tmp_path_factory.mktemp("bench-work"), tmp_path_factory.mktemp("bench-out")
    command = [sys.executable, "-m", "benchmarks", "--tiny", "--work-dir", str(work),
               "--out-dir", str(out), "--systems", ",".join(SYSTEMS), "--cases", ",".join(CASES),
               "--reps", "3", "--budget-s", "0.1", "--slice-s", "0.1", "--settle-s", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [result_file] = out.glob("*.json")
    return json.loads(result_file.read_text()), out, work / "tiny"


def test_result_records_what_it_was_measured_on(smoke_run):
    result, _, _ = smoke_run
    env = result["environment"]
    assert len(env["edgecap_commit"].split("+")[0]) == 40
    for library in ("python", "onnxruntime", "numpy", "torch", "transformers", "optimum"):
        assert env["versions"][library], library
    assert env["cpu"]["model"] and isinstance(env["cpu"]["flags"], list)
    assert env["threads"]["requested"] >= 1 and env["threads"]["cores_available"] >= 1


def test_fp32_systems_emit_identical_tokens(smoke_run):
    result, _, _ = smoke_run
    assert result["equal_work"] == {case: {"pytorch": True, "optimum-fp32": True, "edgecap-fp32": True}
                                    for case in CASES}


def test_every_system_and_case_is_reported(smoke_run):
    result, out, _ = smoke_run
    assert "tiny smoke model" in result["model"]
    for case in CASES:
        assert sorted(result["table"][case]) == sorted(SYSTEMS)
        for row in result["table"][case].values():
            assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
            assert row["reps"] >= 3 and row["images_per_s"] > 0 and row["decode_ms_per_token"] > 0
        assert result["table"][case]["pytorch"]["speedup_vs_pytorch"] == pytest.approx(1.0)
    for name in SYSTEMS:
        system = result["systems"][name]
        assert system["size_bytes"] > 0 and system["peak_rss_mb"] > 0 and system["cold_start_s"] > 0
    stem = next(out.glob("*.json")).stem
    assert (out / f"{stem}.png").stat().st_size > 0
    table = (out / f"{stem}.md").read_text()
    assert all(f"| {case} | {name} |" in table for case in CASES for name in SYSTEMS)


@pytest.mark.parametrize("kind", ["pytorch", "optimum"])
def test_baselines_encode_once_inside_the_timed_generate(smoke_run, flickr_test_images, kind):
    """The encoder time of PyTorch and optimum comes from generate()'s own encoder call: the
    timed latency must not include a second, separate encoder pass."""
    from benchmarks.worker import HFSystem

    _, _, work = smoke_run
    system = HFSystem(kind, work / "hf", 2, work / "optimum-fp32")
    for beams in (1, 4):
        tokens, encoder_ms, decode_ms = system.run(flickr_test_images[:2], beams)
        assert len(system.encoder_calls_ms) == 1
        assert encoder_ms == system.encoder_calls_ms[0] > 0 and decode_ms > 0
        assert len(tokens) == 2 and all(len(row) == 20 for row in tokens)


def test_gpu_benchmark_runs_its_cpu_configuration(tiny_export, tmp_path):
    """benchmarks/gpu.py without a GPU: --help works, the CPU rows (plain and IO binding) equal
    the CPU fp32 reference, and every GPU row this onnxruntime cannot run is skipped with its
    reason instead of being measured on the CPU."""
    photos = REPO / "tests" / "data"
    help_run = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "--devices" in help_run.stdout
    command = [sys.executable, "-m", "benchmarks.gpu", "--model", str(tiny_export),
               "--devices", "cpu,cuda", "--precisions", "fp32", "--baselines", "none",
               "--image-dir", str(photos), "--images", "2", "--warmup", "1",
               "--out-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [report_file] = tmp_path.glob("*-gpu.json")
    report = json.loads(report_file.read_text())
    for name in ("edgecap-cpu-fp32", "edgecap-cpu-fp32-io-on"):
        row = report["systems"][name]
        assert row["images"] == row["identical_to_cpu_fp32"] == 2
        assert 0 < row["p50_ms"] <= row["p95_ms"]
    assert report["systems"]["edgecap-cpu-fp32-io-on"]["runner"] == "DeviceGraphRunner"
    assert "edgecap-cuda-fp32" in report["systems"] or report["skipped"]["edgecap-cuda-fp32"]
    assert "| edgecap-cpu-fp32 | 2 | 2/2 |" in (tmp_path / f"{report_file.stem}.md").read_text()
