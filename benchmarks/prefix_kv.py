"""Prefix K/V shared by an image's beams against per-beam copies, in the same run.

    python -m benchmarks.prefix_kv --before REV [--cases beamB:BATCH ...] [--reps N]
        [--prefix-length P] [--threads T] [--work-dir DIR] [--out RESULT.json]

REV is a commit whose prefix export still copies the prefix cache into every beam (the parent
of the commit that made beams share it). Its ``runtime/`` and ``export/`` are unpacked as the
package ``edgecap`` into a temporary folder, and one worker process runs that tree while
another runs this checkout. Both build the same random-weight prefix captioner with the
default model's decoder shape (layers, heads, width, vocabulary and positions from its
manifest), export it with their own exporter and decode the same real photos, taking turns
batch by batch so a noisy machine hits both alike. Every caption is forced to ``NEW_TOKENS``
tokens, so both do the same work; the share of batches whose tokens agree is reported too (a
random model's near-ties may flip on float rounding).

Reported per case: decode time per batch (prefill + search; the encoder is run beforehand) and
per caption (batch time / batch size), p50 and p95 (and the minimum, the least disturbed by a
busy machine), and the K/V bytes each decoder step is fed and returns (mean over the steps after
the prefill).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_MODEL = REPO / "runtime" / "models" / "default"
PHOTOS = sorted((REPO / "tests" / "data").glob("*.jpg"))
NEW_TOKENS = 20  # every caption is exactly this long (min = max new tokens)
WARM_UP = 2  # rounds per case before timing


# ---------------------------------------------------------------- worker side


def build_prefix_captioner(prefix_length: int, seed: int = 0):
    """(image encoder, mapper, GPT-2) with random weights and the default model's decoder shape;
    the encoder is a token conv stack (only decoding is timed)."""
    import torch
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = json.loads((DEFAULT_MODEL / "manifest.json").read_text())
    width = shape["num_heads"] * shape["head_dim"]
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=width, n_layer=shape["num_layers"], n_head=shape["num_heads"],
                        n_positions=shape["max_positions"], vocab_size=shape["vocab_size"],
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    gpt2 = GPT2LMHeadModel(config).eval()
    encoder = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten()).eval()
    mapper = nn.Sequential(nn.Linear(16, prefix_length * width),
                           nn.Unflatten(1, (prefix_length, width))).eval()
    return encoder, mapper, gpt2


class CountingDecoder:
    """Stands in for the decoder session: counts the K/V bytes fed to and returned by each run
    after the prefill (the prefill is the run that feeds no token)."""

    def __init__(self, session):
        self.session = session
        self.fed = self.returned = self.runs = 0

    def run(self, names, feeds):
        outputs = self.session.run(names, feeds)
        if feeds["input_ids"].shape[1] > 0:
            self.runs += 1
            self.fed += sum(v.nbytes for k, v in feeds.items()
                            if k.startswith(("past_", "prefix_key", "prefix_value")))
            self.returned += sum(v.nbytes for v in outputs[1:])
        return outputs

    def get_inputs(self):
        return self.session.get_inputs()


def worker(out_dir: Path, prefix_length: int, threads: int) -> int:
    """Export (with whichever ``edgecap`` this process imports), then answer decode requests:
    one JSON object per line in, one per line out."""
    import edgecap
    from edgecap.decoding import beam_search, greedy_search
    from edgecap.manifest import GenerationOptions, Manifest, Preprocessing
    from edgecap.preprocess import load_image, preprocess_batch
    from edgecap.sessions import build_session
    from edgecap.runner import GraphRunner

    if not (out_dir / "manifest.json").is_file():
        from edgecap.export import export_prefix_captioner

        export_prefix_captioner(*build_prefix_captioner(prefix_length), out_dir,
                                image_processor=Preprocessing(height=64, width=64),
                                tokenizer=DEFAULT_MODEL / "tokenizer.json",
                                prefix_length=prefix_length)
    m = Manifest.read(out_dir)
    runner = GraphRunner(build_session(out_dir / m.encoder_file, threads=threads),
                         build_session(out_dir / m.decoder_file, threads=threads), m)
    counter = runner.decoder = CountingDecoder(runner.decoder)
    pixels = preprocess_batch([load_image(p) for p in PHOTOS], m.preprocessing)
    (prefix,) = runner.encode(pixels)
    print(json.dumps({"edgecap": edgecap.__file__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        beams = request["beams"]
        options = GenerationOptions(num_beams=beams, max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS)
        search = beam_search if beams > 1 else greedy_search
        counter.fed = counter.returned = counter.runs = 0
        began = time.perf_counter()
        found = search(runner, [prefix[request["images"]]], options, m.decoder_start_token_id,
                       m.eos_token_id)
        elapsed_ms = (time.perf_counter() - began) * 1e3
        print(json.dumps({"ms": elapsed_ms, "tokens": [h.token_ids for h in found],
                          "fed": counter.fed / counter.runs,
                          "returned": counter.returned / counter.runs}), flush=True)
    return 0


# ---------------------------------------------------------------- driver side


def unpack_revision(revision: str, into: Path) -> Path:
    """``runtime/`` and ``export/`` of ``revision`` laid out as the package ``edgecap`` under
    ``into`` (what the editable install maps them to); returns the folder to put on sys.path."""
    archive = subprocess.run(["git", "archive", "--format=tar", revision, "runtime", "export"],
                             cwd=REPO, capture_output=True, check=True).stdout
    source = into / "source"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    package = into / "package"
    shutil.copytree(source / "runtime", package / "edgecap")
    shutil.copytree(source / "export", package / "edgecap" / "export")
    return package


class Worker:
    def __init__(self, label: str, out_dir: Path, args, python_path: Path | None):
        env = dict(os.environ)
        if python_path is not None:  # ahead of the editable install
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(python_path),
                                                              env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "benchmarks.prefix_kv", "--worker", str(out_dir),
                   "--prefix-length", str(args.prefix_length), "--threads", str(args.threads)]
        self.label = label
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.hello = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label} worker died (its stderr is above)")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:  # a worker that died has nothing to be told
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def run_case(workers: list[Worker], beams: int, batch: int, reps: int) -> dict:
    """``reps`` batches per worker, alternating which one goes first."""
    runs: dict[str, list[dict]] = {w.label: [] for w in workers}
    agree = 0
    for rep in range(-WARM_UP, reps):
        images = [(rep * batch + k) % len(PHOTOS) for k in range(batch)]
        order = workers if rep % 2 else workers[::-1]
        replies = {w.label: w.ask(beams=beams, images=images) for w in order}
        if rep >= 0:
            agree += len({json.dumps(r["tokens"]) for r in replies.values()}) == 1
            for label, reply in replies.items():
                runs[label].append(reply)
    summary = {"same_tokens": agree / reps}
    for label, replies in runs.items():
        ms = np.array([r["ms"] for r in replies])
        summary[label] = {"min_ms": float(ms.min()), "p50_ms": float(np.percentile(ms, 50)),
                          "p95_ms": float(np.percentile(ms, 95)),
                          "p50_ms_per_caption": float(np.percentile(ms, 50)) / batch,
                          "p95_ms_per_caption": float(np.percentile(ms, 95)) / batch,
                          "kv_fed_bytes_per_step": float(np.mean([r["fed"] for r in replies])),
                          "kv_returned_bytes_per_step":
                              float(np.mean([r["returned"] for r in replies]))}
    return summary


def markdown(results: dict) -> str:
    header = ("| case | tree | K/V fed per step | K/V returned per step | decode min / p50 / p95 "
              "ms per batch | per caption p50 / p95 | p50 speed-up |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for case, by_tree in results.items():
        base = by_tree["before"]["p50_ms"]
        for tree in ("before", "after"):
            s = by_tree[tree]
            lines.append(f"| {case} | {tree} | {s['kv_fed_bytes_per_step'] / 1e3:,.0f} kB | "
                         f"{s['kv_returned_bytes_per_step'] / 1e3:,.0f} kB | "
                         f"{s['min_ms']:.1f} / {s['p50_ms']:.1f} / {s['p95_ms']:.1f} | "
                         f"{s['p50_ms_per_caption']:.1f} / {s['p95_ms_per_caption']:.1f} | "
                         f"{base / s['p50_ms']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="commit whose prefix export copies the prefix per beam")
    parser.add_argument("--cases", nargs="+", default=["beam3:1", "beam3:4"],
                        help="cases as beam<B>:<batch>; a single beam is greedy search")
    parser.add_argument("--reps", type=int, default=40, help="timed batches per tree and case")
    parser.add_argument("--prefix-length", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--work-dir", type=Path, help="keeps the exports between runs")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker, args.prefix_length, args.threads)
    if not args.before:
        parser.error("--before REV is required")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="edgecap-prefix-kv-"))
    unpacked = Path(tempfile.mkdtemp(prefix="edgecap-before-"))
    workers: list[Worker] = []
    try:
        before_tree = unpack_revision(args.before, unpacked)
        workers.append(Worker("before", work / "before", args, before_tree))
        workers.append(Worker("after", work / "after", args, None))
        results = {}
        for case in args.cases:
            beams, batch = case.removeprefix("beam").split(":")
            results[case] = run_case(workers, int(beams), int(batch), args.reps)
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(unpacked, ignore_errors=True)
    print(markdown(results))
    if args.out:
        args.out.write_text(json.dumps({"before": args.before, "threads": args.threads,
                                        "prefix_length": args.prefix_length, "reps": args.reps,
                                        "new_tokens": NEW_TOKENS, "cases": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
