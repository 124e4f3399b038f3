"""``edgecap caption --ray`` on a local Ray cluster: 200 real photos plus 10 broken files.

One cluster (2 CPUs, loopback only) serves the whole module; another test starts ``ray start
--head`` as its own process and connects by address. The reference is ``edgecap caption`` on the
same inputs with the same tiny model: Ray must give the same records, once each.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from edgecap.cli.main import main
from PIL import Image, ImageOps

# Ray resolves 127.0.0.1 to the machine's network address unless clusters are "off": this keeps
# every node address (ours and the `ray start` head's) on loopback. Read when ray is imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
try:
    import ray
except ImportError:  # the missing-extra test below still runs
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="needs the [ray] extra")
PHOTOS, BROKEN = 200, 10
ACTOR_TITLE = b"MapWorker(MapBatches(CaptionActor))"  # Ray's process title for our actors


def broken_files() -> dict[str, bytes]:
    """Ten files named like photos that no decoder accepts (every one a different failure)."""
    jpeg = (Path(__file__).parent / "data" / "cat.jpg").read_bytes()
    return {
        "empty.jpg": b"", "truncated-100.jpg": jpeg[:100], "truncated-2k.jpg": jpeg[:2048],
        "truncated-half.jpg": jpeg[: len(jpeg) // 2], "text.jpg": b"not an image\n" * 20,
        "random.png": os.urandom(4096), "png-signature.png": b"\x89PNG\r\n\x1a\n",
        "gif-header.gif": b"GIF89a", "page.jpg": b"<html><body>404</body></html>",
        "archive.jpeg": b"PK\x03\x04" + bytes(200),
    }


@pytest.fixture(scope="module")
def archive(tmp_path_factory, sample_photos) -> Path:
    """A folder of 200 distinct real photos (shipped, derived variants, then smaller
    upside-down copies of those) and 10 broken files."""
    folder = tmp_path_factory.mktemp("archive")
    base = sample_photos(99)
    for path in base:
        shutil.copy(path, folder / path.name)
    for i in range(PHOTOS - len(base)):
        path, shrink = base[i % len(base)], 2 + i // len(base)  # 1/2 size, then 1/3
        image = Image.open(path).convert("RGB")
        small = image.resize((image.width // shrink, image.height // shrink))
        ImageOps.flip(ImageOps.mirror(small)).save(folder / f"{path.stem}-small{shrink}.jpg",
                                                   "JPEG", quality=85)
    for name, data in broken_files().items():
        (folder / name).write_bytes(data)
    assert len(list(folder.iterdir())) == PHOTOS + BROKEN
    return folder


@pytest.fixture(scope="module")
def reference(archive, tiny_export, tmp_path_factory) -> dict[str, dict]:
    """``edgecap caption``'s records for the archive, by source."""
    out = tmp_path_factory.mktemp("reference") / "caption.jsonl"
    assert main(["caption", str(archive), "--model", str(tiny_export), "--out", str(out)]) == 1
    return by_source(read_jsonl(out))


@pytest.fixture(scope="module")
def cluster():
    # address="local": a new cluster even where `ray start` left an address behind.
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_source(records: list[dict]) -> dict[str, dict]:
    sources = [r["source"] for r in records]
    assert len(set(sources)) == len(sources), "a source appears twice"
    return {r["source"]: r for r in records}


def assert_same_records(records: list[dict], reference: dict[str, dict]) -> None:
    """Exactly the reference's inputs, once each: same captions, errors for the broken files."""
    got = by_source(records)
    assert sorted(got) == sorted(reference)
    for source, record in got.items():
        expected = reference[source]
        assert record["status"] == expected["status"], source
        if expected["status"] == "ok":
            assert record["generated_text"] == expected["generated_text"], source
            assert record["token_ids"] == expected["token_ids"], source
            assert record["score"] == pytest.approx(expected["score"], abs=2e-4)
            assert set(record) == set(expected)  # the same keys as caption --out
        else:
            assert Path(source).name in broken_files()
            assert record == expected
    assert sum(r["status"] == "error" for r in records) == BROKEN


@needs_ray
def test_ray_run_gives_one_record_per_input_and_resumes(cluster, archive, reference,
                                                        tiny_export, tmp_path, capsys):
    out = tmp_path / "ray.jsonl"
    command = ["caption", str(archive), "--model", str(tiny_export), "--out", str(out),
               "--ray", "--actors", "1:2"]
    assert main(command) == 1  # the broken files are errors, as with `caption`
    records = read_jsonl(out)
    assert len(records) == PHOTOS + BROKEN
    assert_same_records(records, reference)
    assert "200 captioned, 10 failed" in capsys.readouterr().err

    before = out.read_bytes()
    assert main(command) == 0
    assert out.read_bytes() == before  # nothing captioned twice
    assert "0 captioned, 0 failed, 210 already in" in capsys.readouterr().err


def actor_pids() -> list[int]:
    """Our caption actors' processes: Ray's title for them, descended from this test process
    (the local cluster's raylet is our child), so another cluster's actors are never touched."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and ACTOR_TITLE in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return [pid for pid in pids if descends_from(pid, os.getpid())]


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the command name
    return False


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@needs_ray
def test_killed_actor_loses_and_duplicates_nothing(cluster, archive, reference, tiny_export,
                                                   tmp_path):
    out = tmp_path / "killed.jsonl"
    # One actor and small batches: the kill lands on the only worker, mid-run.
    command = ["caption", str(archive), "--model", str(tiny_export), "--out", str(out),
               "--ray", "--actors", "1", "--batch-size", "2"]
    codes = []
    run = threading.Thread(target=lambda: codes.append(main(command)), daemon=True)
    run.start()
    wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 4, 180, "first records")
    [pid] = actor_pids()
    os.kill(pid, signal.SIGKILL)
    written_at_kill = out.read_bytes().count(b"\n")
    run.join(timeout=300)
    assert not run.is_alive() and codes == [1]
    assert written_at_kill < PHOTOS + BROKEN  # the kill really was mid-run
    records = read_jsonl(out)
    assert len(records) == PHOTOS + BROKEN
    assert_same_records(records, reference)
    assert actor_pids() == [] or pid not in actor_pids()  # a new process took over


@needs_ray
def test_parquet_output_holds_the_same_records_and_resumes(cluster, archive, reference,
                                                           tiny_export, tmp_path, capsys):
    import pyarrow.parquet as pq
    from edgecap.distributed import row_to_record

    out = tmp_path / "results.parquet"
    command = ["caption", str(archive), "--model", str(tiny_export), "--out", str(out),
               "--ray", "--format", "parquet"]
    assert main(command) == 1
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == PHOTOS + BROKEN
    assert_same_records([row_to_record(row) for row in rows], reference)
    capsys.readouterr()

    # A file a killed run left half-written holds no records: it is removed on resume.
    (out / "torn.parquet").write_bytes(b"PAR1 half a file")
    assert main(command) == 0
    assert not (out / "torn.parquet").exists()
    assert len(pq.read_table(out)) == PHOTOS + BROKEN
    assert "0 captioned, 0 failed, 210 already in" in capsys.readouterr().err


@needs_ray
def test_caption_dataset_takes_a_dataset_of_bytes(cluster, archive, reference, tiny_export):
    from edgecap.distributed import caption_dataset, row_to_record

    paths = sorted(archive.iterdir())[:24]
    files = ray.data.read_binary_files([str(p) for p in paths], include_paths=True)
    rows = caption_dataset(files, tiny_export, batch_size=4, actors=(1, 2)).take_all()
    records = [row_to_record(row) for row in rows]
    subset = {str(p): reference[str(p)] for p in paths}
    for record in records:  # read_binary_files may name a file without its leading slash
        record["source"] = str(Path("/", record["source"]))
    got = by_source(records)
    assert sorted(got) == sorted(subset)
    for source, record in got.items():
        assert record.get("generated_text") == subset[source].get("generated_text")
        assert record["status"] == subset[source]["status"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_ray
def test_connects_to_a_cluster_started_with_ray_start(archive, reference, tiny_export, tmp_path):
    executable = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    port, log = free_port(), tmp_path / "head.log"
    # Its own temp dir (short: Ray's socket paths must fit 107 bytes), so the address it records
    # never points later runs at a cluster this test has stopped.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = subprocess.Popen(
        [executable, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats", "--block",
         f"--temp-dir={temp_dir}"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: b"Ray runtime started" in log.read_bytes() or head.poll() is not None,
                 120, "ray start --head")
        assert head.poll() is None, log.read_text()[-2000:]
        inputs = [str(archive / "cat.jpg"), str(archive / "coffee.jpg"), str(archive / "text.jpg")]
        done = subprocess.run(
            [sys.executable, "-m", "edgecap.cli", "caption", *inputs, "--model", str(tiny_export),
             "--json", "--ray", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 1, done.stderr[-3000:]  # text.jpg is not an image
        records = by_source([json.loads(line) for line in done.stdout.splitlines()])
        assert sorted(records) == sorted(inputs)
        for source, record in records.items():
            assert record.get("generated_text") == reference[source].get("generated_text")
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_process_group(process: subprocess.Popen) -> None:
    """`ray start --block` and everything it started (its own session): SIGTERM, then SIGKILL."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # gcs_server may outlive a SIGTERM
    except ProcessLookupError:
        pass


def test_without_the_extra_ray_names_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    image = str(Path(__file__).parent / "data" / "cat.jpg")
    assert main(["caption", image, "--ray"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'edgecap[ray]'" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--format", "parquet"], "--format parquet and --actors need --ray"),
    (["--ray", "--format", "parquet"], "--format parquet needs --out FOLDER"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    image = str(Path(__file__).parent / "data" / "cat.jpg")
    assert main(["caption", image, *argv]) == 2
    assert capsys.readouterr().err.strip() == f"edgecap: error: {message}"


def test_ray_before_the_inputs_is_not_taken_as_an_address(capsys):
    data = Path(__file__).parent / "data"
    assert main(["caption", "--ray", str(data), str(data / "cat.jpg")]) == 2
    assert "put --ray after the inputs" in capsys.readouterr().err


def test_an_unexpected_failure_costs_only_its_own_item():
    """A failure that is not a bad image (an onnxruntime crash, say) is narrowed down to the
    input that causes it; the rest of the batch keeps its captions."""
    from edgecap import CaptionResult
    from edgecap.distributed import caption_items

    class Flaky:
        def caption_stream(self, items, batch_size, **generation):
            if any(source == "poison.jpg" for source, _ in items):
                raise RuntimeError("kernel failed")
            return [CaptionResult("a cat", [257], -0.5, source) for source, _ in items]

    items = [("a.jpg", b"x"), ("poison.jpg", b"y"), ("b.jpg", b"z")]
    records = caption_items(Flaky(), items, 8, {})
    assert [r["source"] for r in records] == ["a.jpg", "poison.jpg", "b.jpg"]
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert records[1]["error"] == "captioning failed (RuntimeError: kernel failed)"


def test_a_bad_model_or_option_fails_before_the_cluster_starts(tmp_path, capsys):
    image = str(Path(__file__).parent / "data" / "cat.jpg")
    assert main(["caption", image, "--ray", "--model", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().startswith(f"edgecap: error: {tmp_path}")
    # An option the model cannot honour is a usage error, as everywhere (exit 2).
    assert main(["caption", image, "--ray", "--max-new-tokens", "100000"]) == 2
    assert "max_new_tokens 100000 exceeds" in capsys.readouterr().err
