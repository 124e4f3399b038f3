"""The one place that builds onnxruntime sessions: providers, threads, graph optimizations."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort

from .errors import ModelError
from .gpu.providers import (
    TENSORRT, WANTED, check_precision, default_engine_cache, provider_options, session_providers,
)
from .manifest import Manifest

log = logging.getLogger("edgecap")

# A git-lfs pointer file starts with this line instead of protobuf bytes.
LFS_POINTER_PREFIX = b"version https://git-lfs"


def default_threads() -> int:
    """Intra-op threads: the cores this process may use (respects taskset / cgroup affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_providers(device: str, options: dict[str, dict[str, str]] | None = None
                      ) -> list[str | tuple[str, dict[str, str]]]:
    """Map ``device`` (auto, cpu, cuda, tensorrt) to available execution providers, each with
    its ``options`` (by provider name, from ``gpu_providers.provider_options``) if any."""
    available = ort.get_available_providers()
    providers = session_providers(device, options or {}, available)
    wanted = WANTED[device][0]
    if device not in ("auto", "cpu") and _name(providers[0]) != wanted:
        log.warning("%s requested but onnxruntime offers only %s; falling back", wanted, available)
    return providers


def _name(provider: str | tuple[str, dict[str, str]]) -> str:
    return provider if isinstance(provider, str) else provider[0]


def build_session(
    path: str | Path, *, threads: int | None = None, device: str = "cpu", profile: bool = False,
    config: dict[str, str] | None = None, spinning: bool = False,
    provider_options: dict[str, dict[str, str]] | None = None,
) -> ort.InferenceSession:
    """Open one ONNX graph with full graph optimizations.

    ``spinning``: within a run, idle pool threads busy-wait for the next kernel instead of
    sleeping; they stop as soon as the run ends. Worth it for both graphs: the decoder step runs
    many small kernels per token, each otherwise paying a thread wake-up, and the encoder gains a
    little too (measurements in benchmarks/README.md, "What was tried").
    ``provider_options``: settings per provider name (TensorRT profiles, engine cache, ...).

    Raises:
        ModelError: the file is missing, a git-lfs pointer, or not a loadable ONNX model.
    """
    path = Path(path)
    check_model_file(path)
    options = session_options(threads, profile, config, spinning)
    try:
        session = ort.InferenceSession(str(path), options,
                                       providers=resolve_providers(device, provider_options))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{path}: onnxruntime cannot load this graph ({first_line[:300]}); the file is corrupt "
            "or truncated: re-export or re-install the model"
            + ("" if device == "cpu" else f" (or the {device} provider refused it)")
        ) from None
    if device in ("cuda", "tensorrt") and session.get_providers()[0] == "CPUExecutionProvider":
        log.warning("%s: running on CPU; the GPU provider failed to initialise", path.name)
    return session


def open_graphs(model_dir: Path, manifest: Manifest, *, device: str = "cpu",
                threads: int | None = None, precision: str = "fp32",
                engine_cache: str | Path | None = None
                ) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """The encoder and decoder sessions of an export, with their providers' options.

    Raises:
        ModelError: a graph is missing or cannot be loaded.
        OptionsError: a precision this device cannot honour.
    """
    available = ort.get_available_providers()
    check_precision(device, precision, manifest, available)
    cache = None
    if device == "tensorrt":
        cache = Path(engine_cache) if engine_cache else default_engine_cache(model_dir, manifest)
        if TENSORRT in available:
            (cache / precision).mkdir(parents=True, exist_ok=True)
    config = manifest.quantization.get("session_config", {})
    sessions = []
    for graph, file in (("encoder", manifest.encoder_file), ("decoder", manifest.decoder_file)):
        options = provider_options(device, graph, manifest, precision=precision, engine_cache=cache)
        sessions.append(build_session(Path(model_dir) / file, threads=threads, device=device,
                                      config=config, spinning=True, provider_options=options))
    return sessions[0], sessions[1]


def build_helper_session(model: bytes, providers: list[str]) -> ort.InferenceSession:
    """A small graph built in-process (e.g. gather_graph's), on the given providers."""
    return ort.InferenceSession(model, session_options(1, False, None, False), providers=providers)


def session_options(threads: int | None, profile: bool, config: dict[str, str] | None,
                    spinning: bool) -> ort.SessionOptions:
    """The settings every session shares (see build_session)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1  # one step at a time: parallelism lives inside each op
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.enable_profiling = profile
    # Spinning that outlives a run steals the cores of whatever runs next (the other session's
    # pool), so the two pools would slow each other down. Spinning that stops at the end of each
    # run (force_spinning_stop) keeps the wake-up savings without that cost.
    entries = {"session.intra_op.allow_spinning": "1" if spinning else "0"}
    if spinning:
        entries["session.force_spinning_stop"] = "1"
    # Parallel loops hand out shrinking blocks of work instead of one task per block: fewer
    # dispatches for the many small kernels of a decoder step (measured: benchmarks/README.md).
    entries["session.intra_op.dynamic_block_base"] = "4"
    entries.update({key: str(value) for key, value in (config or {}).items()})  # the manifest's
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    return options


def check_model_file(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"{path}: missing model file; re-export the model or pass the right --model")
    with path.open("rb") as handle:
        head = handle.read(64)
    if head.startswith(LFS_POINTER_PREFIX):
        raise ModelError(
            f"{path}: this is a git-lfs pointer, not the model; run `git lfs pull` to fetch it"
        )
    if len(head) == 0:
        raise ModelError(f"{path}: empty model file; re-export or re-install the model")
