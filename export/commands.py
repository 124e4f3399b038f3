"""Toolchain subcommands for the ``edgecap`` CLI: export, train, eval.

Only argument definitions live at module level: torch and transformers are imported when a
command actually runs, so registering these costs nothing on a runtime-only path.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

# Torch-free: the train options are registered with the other commands at no cost.
from .train.presence_config import DESCRIPTION as PRESENCE_DESCRIPTION
from .train.presence_config import add_presence_arguments
from .train.scst_config import add_scst_arguments, scst_config_from_args
from .train.config import add_train_arguments, config_from_args


def register(commands) -> None:
    """Add the toolchain's subcommands (in the order --help lists them) to ``commands``."""
    _add_export(commands)
    _add_training(commands)
    _add_checkpoint_exports(commands)
    _add_evaluation(commands)


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export", help="export a model to edgecap's ONNX graphs (needs [export] extra)",
        description="Export a Hugging Face VisionEncoderDecoderModel (ViT/DeiT encoder, GPT-2 "
        "decoder with cross-attention), from a folder or by model id, into OUT: encoder.onnx, "
        "decoder.onnx, tokenizer.json, manifest.json. The graphs are checked against PyTorch "
        "before anything is written. With HF_HUB_OFFLINE=1 a model id is read from the local "
        "Hugging Face cache only.",
    )
    export.add_argument("src", help="save_pretrained() folder of the model, or a Hugging Face "
                        "model id (org/name; a folder of that name wins)")
    export.add_argument("out", type=Path, help="output directory (created)")
    add_quantize_arguments(export)
    export.set_defaults(handler=run_export)


def _add_training(commands) -> None:
    train = commands.add_parser(
        "train", help="train a captioner on caption folders (needs [export] extra)",
        description="Train a frozen EfficientNet-Lite + small GPT-2 captioner with "
        "teacher-forced cross-entropy on one or several data folders (Flickr8k's layout, or "
        "images/ + captions.tsv or captions.jsonl; see docs/training.md), each caption started "
        "by its style token; writes a checkpoint directory that `edgecap export-trained` turns "
        "into an export. --resume continues a killed run.",
    )
    add_train_arguments(train)
    train.set_defaults(handler=run_train)

    scst = commands.add_parser(
        "train-scst", help="fine-tune a trained captioner on its own CIDEr-D (self-critical "
        "sequence training)",
        description="Fine-tune a checkpoint written by `edgecap train` with self-critical "
        "sequence training: the model samples several captions per training image and learns "
        "from how each one's CIDEr-D compares with its siblings'. Reuses the run's data folders, "
        "feature cache and vocabulary; scores the dev split as it goes and writes the best model "
        "(the starting one included) to --out, ready for `edgecap export-trained`.",
    )
    add_scst_arguments(scst)
    scst.set_defaults(handler=run_train_scst)

    presence = commands.add_parser(
        "train-presence", help="fit presence heads (person, ...) that ground a trained captioner",
        description=PRESENCE_DESCRIPTION)
    add_presence_arguments(presence)
    presence.set_defaults(handler=run_train_presence)


def _add_checkpoint_exports(commands) -> None:
    """export-trained and export-prefix: checkpoints of edgecap's own training and ClipCap's."""
    export_trained = commands.add_parser(
        "export-trained", help="export a checkpoint written by `edgecap train`",
        description="Export a training checkpoint directory (encoder.pt, decoder/, id_map.json) "
        "into edgecap's ONNX graphs, optionally quantized. A run of either --arch works: its "
        "encoder.json says which family it is (--decoder-graph applies to cross-attention).",
    )
    export_trained.add_argument("checkpoint", type=Path, help="directory written by `edgecap train`")
    export_trained.add_argument("out", type=Path, help="output directory (created)")
    add_quantize_arguments(export_trained)
    export_trained.set_defaults(handler=run_export_trained)

    export_prefix = commands.add_parser(
        "export-prefix", help="export a ClipCap-style checkpoint folder (GPT-2 + mapper + "
        "image encoder)",
        description="Export a prefix captioner (an image encoder, a mapper to prefix_length "
        "GPT-2 input embeddings, a GPT-2 without cross-attention) from a checkpoint folder: "
        "prefix_captioner.json naming a GPT2LMHeadModel.save_pretrained() folder with its "
        "tokenizer, the mapper (a state dict of ClipCap's MLP or transformer mapper; a whole "
        "ClipCap checkpoint will do) and the image encoder (a Hugging Face vision model folder "
        "or id, or an EfficientNet-Lite). The format is in docs/export.md. Every part is checked "
        "before export, and the graphs against PyTorch before anything is written.",
    )
    export_prefix.add_argument("checkpoint", type=Path,
                               help="folder holding prefix_captioner.json and the parts it names")
    export_prefix.add_argument("out", type=Path, help="output directory (created)")
    add_quantize_arguments(export_prefix, decoder_graph=False)
    export_prefix.set_defaults(handler=run_export_prefix)


def _add_evaluation(commands) -> None:
    """quality-report (a quantized export against its fp32 one) and eval (a dataset split)."""
    report = commands.add_parser(
        "quality-report", help="what quantization cost: a quantized export vs its fp32 export",
        description="Caption the same images with both exports: identical-caption share, token "
        "agreement, metric deltas (with --data), file sizes and per-part latency ratios. Prints "
        "a markdown table; --out writes JSON (and .md beside it).",
    )
    from .quantize.quality_report import add_arguments as add_report_arguments

    add_report_arguments(report)
    report.set_defaults(handler=run_quality_report)

    evaluate = commands.add_parser(
        "eval", help="caption a dataset split and score it (BLEU, METEOR, ROUGE-L, CIDEr)",
        description="Caption every image of a split and score against all references. DATA is a "
        "Flickr8k folder (captions.txt, split_*.txt, images/) or a COCO-style captions JSON.",
    )
    from edgecap.options import add_generation_arguments, add_runtime_arguments

    evaluate.add_argument("--data", type=Path, required=True, help="Flickr8k folder or COCO JSON")
    evaluate.add_argument("--images", type=Path, help="image folder for a COCO JSON")
    evaluate.add_argument("--split", default="test", help="train, dev or test (Flickr8k)")
    evaluate.add_argument("--model", type=Path, help="export directory (default: embedded model)")
    evaluate.add_argument("--limit", type=int, help="only the first N images")
    evaluate.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    evaluate.add_argument("--invariance", action="store_true",
                          help="also report the share of captions identical alone and in batches "
                          "of 8 (captions every image twice more)")
    evaluate.add_argument("--out", type=Path, help="write metrics and captions as JSON here")
    add_generation_arguments(evaluate)
    add_runtime_arguments(evaluate, batch_size=16)
    evaluate.set_defaults(handler=run_eval)


def add_quantize_arguments(parser: argparse.ArgumentParser, decoder_graph: bool = True) -> None:
    """The weight-format options; ``decoder_graph`` adds the choice of cross-attention step."""
    if decoder_graph:
        parser.add_argument("--decoder-graph", choices=["fused", "traced"], default="fused",
                            help="fused (default): the step written with ONNX Runtime's fused "
                            "attention and layer-norm kernels; traced: the TorchScript trace of "
                            "the same maths (slower; for runtimes without com.microsoft ops)")
    parser.add_argument("--quantize", default="none",
                        choices=["none", "int8-dynamic", "int8-block", "int8-static", "int4", "fp16"],
                        help="weight format of the written graphs (default: none = fp32). CPU: "
                        "int8-dynamic (4x smaller, closest to fp32), int8-block (decoder weights "
                        "in 8-bit blocks: faster one-row decoding, slower batches; see "
                        "docs/quantization.md) or int4 (decoder weights in 4-bit blocks: "
                        "fastest greedy decoding, check quality with quality-report)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="int4 and int8-block: weights sharing one scale (a power of 2 that "
                        "divides the decoder width; default: the largest at which a caption "
                        "never depends on its batch, see docs/quantization.md)")
    parser.add_argument("--calibration", type=Path,
                        help="folder of representative images: int8-static needs it; int8-dynamic "
                        "and int8-block use it to fix the encoder's (and int8-dynamic's "
                        "decoder's) activation scales (faster, still batch-invariant; without it "
                        "each row is scaled on its own)")
    parser.add_argument("--per-row-encoder", action="store_true",
                        help="int8-dynamic or int8-block with --calibration: scale the encoder's "
                        "activations "
                        "per row instead of with the calibrated scales (slower on large "
                        "encoders; see docs/quantization.md)")
    parser.add_argument("--calibration-count", type=int, default=64,
                        help="images used for calibration (default 64, sorted by name)")
    parser.add_argument("--keep-float", action="append", default=[], metavar="NODE",
                        help="keep these nodes in float: 'lm_head' or a node-name prefix "
                        "(repeatable; default: quantize every MatMul; docs/quantization.md)")


def run_train(args: argparse.Namespace) -> int:
    from .train import loop as training

    return training.run(config_from_args(args))


def run_train_presence(args: argparse.Namespace) -> int:
    from .train import presence as grounding

    return grounding.run(args)


def run_train_scst(args: argparse.Namespace) -> int:
    from .train import scst

    try:
        return scst.run(scst_config_from_args(args))
    except ValueError as exc:  # not a training checkpoint, or its data changed
        print(f"edgecap: train-scst failed: {exc}")
        return 1


def _export_and_quantize(export, args: argparse.Namespace) -> int:
    """Run ``export()`` (returns a Manifest), then quantize in place if asked; one JSON line out."""
    from .graphs.onnx_export import ExportError

    if args.quantize == "int8-static" and (args.calibration is None or not args.calibration.is_dir()):
        # Check before exporting: otherwise an fp32 export would be left behind in OUT.
        print("edgecap: export failed: int8-static needs --calibration DIR (a folder of images)")
        return 1
    if args.per_row_encoder and (args.quantize not in ("int8-dynamic", "int8-block")
                                 or args.calibration is None):
        print("edgecap: export failed: --per-row-encoder goes with --quantize int8-dynamic or "
              "int8-block and --calibration DIR")
        return 1
    try:
        manifest = export()
        if args.quantize != "none":
            from .quantize.variants import quantize_export

            manifest = quantize_export(
                args.out, args.out, mode=args.quantize, calibration=args.calibration,
                calibration_count=args.calibration_count, exclude_nodes=tuple(args.keep_float),
                calibrate_encoder=None if not args.per_row_encoder else False,
                block_size=args.block_size)
    except (ExportError, ValueError) as exc:
        print(f"edgecap: export failed: {exc}")
        return 1
    print(json.dumps({"out": str(args.out), "quantization": manifest.quantization["mode"],
                      "parity": manifest.provenance["parity"]}))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .graphs.onnx_export import export_pretrained

    logging.getLogger("edgecap").setLevel(logging.INFO)
    return _export_and_quantize(lambda: export_pretrained(
        args.src, args.out, fused=args.decoder_graph == "fused"), args)


def run_export_trained(args: argparse.Namespace) -> int:
    from .train.trained_export import export_checkpoint

    logging.getLogger("edgecap").setLevel(logging.INFO)
    return _export_and_quantize(lambda: export_checkpoint(
        args.checkpoint, args.out, fused=args.decoder_graph == "fused"), args)


def run_export_prefix(args: argparse.Namespace) -> int:
    from .train.prefix_checkpoint import export_prefix_checkpoint

    logging.getLogger("edgecap").setLevel(logging.INFO)
    return _export_and_quantize(lambda: export_prefix_checkpoint(args.checkpoint, args.out), args)


def run_quality_report(args: argparse.Namespace) -> int:
    from .quantize.quality_report import run

    return run(args)


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_cli

    return evaluate_cli(args)
