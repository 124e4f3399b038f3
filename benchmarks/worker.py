"""One benchmarked system in its own process, so peak RSS and cold start are its own.

The process loads its system, replies with its cold start and size, then runs the cases it is
told to, one time slice at a time, replying with latencies, encoder and decode times and the
token ids produced (for the equal-work check). The parent interleaves the systems' slices so
that a noisy minute on a shared machine hits every system alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import time
from pathlib import Path

NEW_TOKENS = 20  # every system generates exactly this many tokens (min = max)


def peak_rss_mb() -> float:
    """This process's own peak RSS. VmHWM belongs to the address space created at exec;
    ru_maxrss would include the parent's footprint inherited at fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dir_size(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


class EdgecapSystem:
    def __init__(self, model_dir: Path, threads: int):
        from edgecap import Captioner

        self.captioner = Captioner(model_dir, cpu_threads=threads)
        self.size = dir_size(model_dir, "*.onnx")

    def run(self, images, beams: int):
        from edgecap.preprocess import load_image

        loaded = [load_image(p) for p in images]
        options = self.captioner.options(num_beams=beams, max_new_tokens=NEW_TOKENS,
                                         min_new_tokens=NEW_TOKENS, no_repeat_ngram_size=0,
                                         length_penalty=1.0, early_stopping=False)
        results = self.captioner.caption_loaded(loaded, options, [str(p) for p in images])
        timings = results[0].timings
        return [r.token_ids for r in results], timings["encoder_ms"], timings["decoder_ms"]


class HFSystem:
    """PyTorch + transformers generate(), or optimum's ORTModelForVision2Seq (same API)."""

    def __init__(self, kind: str, model_dir: Path, threads: int, optimum_dir: Path | None):
        import torch
        from transformers import ViTImageProcessor

        torch.set_num_threads(threads)
        self.torch = torch
        self.processor = ViTImageProcessor.from_pretrained(model_dir)
        if kind == "pytorch":
            from transformers import VisionEncoderDecoderModel

            self.model = VisionEncoderDecoderModel.from_pretrained(model_dir).eval()
            self.size = dir_size(model_dir, "*.safetensors")
        else:
            from optimum.onnxruntime import ORTModelForVision2Seq
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.model = ORTModelForVision2Seq.from_pretrained(optimum_dir, session_options=options)
            self.size = dir_size(optimum_dir, "*.onnx") + dir_size(optimum_dir, "*.onnx_data")
        self.encoder_calls_ms: list[float] = []
        time_calls(self.model.encoder, self.encoder_calls_ms)

    def run(self, images, beams: int):
        from PIL import Image

        pixels = self.processor([Image.open(p).convert("RGB") for p in images],
                                return_tensors="pt").pixel_values
        self.encoder_calls_ms.clear()
        with self.torch.no_grad():
            began = time.perf_counter()
            out = self.model.generate(pixels, num_beams=beams, max_new_tokens=NEW_TOKENS,
                                      min_new_tokens=NEW_TOKENS, no_repeat_ngram_size=0,
                                      length_penalty=1.0, early_stopping=False)
            total_ms = (time.perf_counter() - began) * 1e3
        tokens = [row[1:] for row in out.tolist()]
        encoder_ms = sum(self.encoder_calls_ms)  # generate() encodes once, inside the timed call
        return tokens, encoder_ms, max(0.0, total_ms - encoder_ms)


def time_calls(module, calls_ms: list[float]) -> None:
    """Record the duration of every call of ``module.forward`` in ``calls_ms``.

    Both PyTorch modules and optimum's ORTEncoder route ``__call__`` through ``forward``, so an
    instance-level wrapper times generate()'s own encoder pass: no extra pass is run (one used
    to be, outside generate() but inside the timed latency, which charged the baselines one
    encoder pass too many).
    """
    inner = module.forward

    @functools.wraps(inner)  # generate() inspects the encoder's forward signature
    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            calls_ms.append((time.perf_counter() - began) * 1e3)

    module.forward = timed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--optimum-dir", type=Path)
    parser.add_argument("--images", nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--launched-at", type=float, required=True)
    args = parser.parse_args(argv)

    # Replies go to the real stdout; anything a library prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    if args.system.startswith("edgecap"):
        system = EdgecapSystem(args.model_dir, args.threads)
    else:
        system = HFSystem(args.system.split("-")[0], args.model_dir, args.threads, args.optimum_dir)
    system.run(args.images[:1], 1)
    reply({"cold_start_s": time.time() - args.launched_at, "size_bytes": system.size,
           "threads": args.threads})

    # Commands, one JSON object per line on stdin (see benchmarks/__main__.py):
    #   {"op": "warm", "case": "beam4:8"}             one untimed run
    #   {"op": "run", "case": ..., "slice_s": s, "max_reps": n}  timed runs for about s seconds
    #   {"op": "quit"}                                 reply with peak RSS and exit
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            reply({"peak_rss_mb": peak_rss_mb()})
            return 0
        mode, batch = command["case"].split(":")
        beams = 1 if mode == "greedy" else int(mode.removeprefix("beam"))
        images = args.images[: int(batch)]
        if command["op"] == "warm":
            system.run(images, beams)
            reply({"ok": True})
            continue
        latencies, encoder, decode, tokens = [], [], [], None
        started = time.perf_counter()
        while not latencies or (time.perf_counter() - started < command["slice_s"]
                                and len(latencies) < command["max_reps"]):
            began = time.perf_counter()
            tokens, enc_ms, dec_ms = system.run(images, beams)
            latencies.append((time.perf_counter() - began) * 1e3)
            encoder.append(enc_ms)
            decode.append(dec_ms)
        reply({"latency_ms": latencies, "encoder_ms": encoder, "decode_ms": decode,
               "tokens": tokens, "batch": len(images), "beams": beams})
    return 1  # stdin closed without "quit"


if __name__ == "__main__":
    sys.exit(main())
