"""Where a decoder step's time goes: ONNX Runtime's profiler over N steps, summed by op type.

    python -m benchmarks.profile_step EXPORT_DIR [--steps 20] [--rows 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np


def main(argv=None) -> int:
    from edgecap.manifest import Manifest
    from edgecap.sessions import build_session
    from edgecap.runner import GraphRunner

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=1, help="hypotheses per step (beams x images)")
    args = parser.parse_args(argv)
    manifest = Manifest.read(args.model)
    config = manifest.quantization.get("session_config", {})
    encoder = build_session(os.path.join(args.model, manifest.encoder_file), config=config)
    decoder = build_session(os.path.join(args.model, manifest.decoder_file), config=config, profile=True,
                            spinning=True)
    runner = GraphRunner(encoder, decoder, manifest)
    pre = manifest.preprocessing
    pixels = np.random.default_rng(0).standard_normal((1, 3, pre.height, pre.width), np.float32)
    state = runner.start(runner.encode(pixels), repeats=args.rows)
    tokens = np.full(args.rows, manifest.decoder_start_token_id)
    for _ in range(args.steps):
        tokens = runner.step(state, tokens).argmax(axis=-1)
    trace = decoder.end_profiling()
    with open(trace) as handle:
        events = json.load(handle)
    os.remove(trace)
    by_op: dict[str, float] = defaultdict(float)
    total = 0.0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e3
        if event.get("cat") == "Session" and event["name"] == "model_run":
            total += event["dur"] / 1e3
    kernels = sum(by_op.values())
    print(f"{args.steps} steps x {args.rows} rows: model_run {total / args.steps:.2f} ms/step, "
          f"kernels {kernels / args.steps:.2f} ms/step")
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {op:32s} {ms / args.steps:7.3f} ms/step  {ms / kernels:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
