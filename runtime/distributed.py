"""Caption archives bigger than one machine on a Ray cluster (``edgecap caption --ray``).

Ray Data does the scheduling: a streaming dataset of inputs flows through ``map_batches`` on an
actor pool; each actor loads one ``Captioner`` once and runs as many threads as the CPUs Ray
gives it. Workers read each input's bytes themselves and decode them with edgecap's safe loader,
and an input that fails becomes an error record (``CaptionFailure.to_record()``), never a
failed task. A killed actor is restarted and its batch retried by Ray (``max_restarts``,
``max_task_retries``); a batch's records reach the output once, when its task succeeds.

``ray`` (the ``[ray]`` extra) is imported only when one of these functions runs, so importing
this module costs nothing. See docs/distributed.md.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .caption_io import expand_inputs
from .errors import EdgecapError, ImageError
from .options import DEFAULT_BATCH_SIZE, check_generation
from .results import RECORD_KEYS, CaptionFailure, record_keys

if TYPE_CHECKING:
    import pyarrow
    import ray.data

# The record's keys (docs/options.md) as one table schema: ok rows leave ``error`` null, error
# rows leave the caption fields null. Every block and Parquet file has exactly this schema, so
# files written by different tasks and runs read back as one table.
RECORD_FIELDS = record_keys("ok", "error")
# Columns a user's Ray Dataset may name its inputs by (read_binary_files gives bytes + path).
PATH_COLUMNS = ("path", "source", "item")

log = logging.getLogger("edgecap")


def record_schema() -> pyarrow.Schema:
    """The Arrow schema of caption records (one column per record key)."""
    import pyarrow as pa

    schemas = {key.name: key.schema for key in RECORD_KEYS}
    return pa.schema([(name, _arrow_type(schemas[name])) for name in RECORD_FIELDS])


def _arrow_type(schema: dict[str, Any]) -> pyarrow.DataType:
    """The Arrow type of a record key's JSON Schema (``results.RECORD_KEYS``)."""
    import pyarrow as pa

    kind = schema["type"]
    if kind == "array":
        return pa.list_(_arrow_type(schema["items"]))
    if kind == "object":
        return pa.struct([(name, _arrow_type(sub)) for name, sub in schema["properties"].items()])
    return {"string": pa.string(), "number": pa.float64(), "integer": pa.int64()}[kind]


def row_to_record(row: dict[str, Any]) -> dict[str, Any]:
    """A dataset row back to the exact record ``caption --out`` writes (null keys dropped)."""
    return {key: row[key] for key in RECORD_FIELDS if row.get(key) is not None}


def caption_items(captioner: Any, items: list[tuple[str, Any]], batch_size: int,
                  generation: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per ``(source, path or bytes)`` item, in order, whatever fails.

    Bad images are already error records (``caption_stream``). Anything else that escapes (a
    runtime failure inside onnxruntime, say) is narrowed down item by item, so only the input
    that causes it becomes an error record and the batch's other captions are kept.
    """
    try:
        stream = captioner.caption_stream(items, batch_size=batch_size, **generation)
        return [outcome.to_record() for outcome in stream]
    except Exception as exc:  # noqa: BLE001 - one item's failure must not fail the task
        if len(items) > 1:
            return [record for item in items
                    for record in caption_items(captioner, [item], batch_size, generation)]
        source = items[0][0]
        reason = f"captioning failed ({type(exc).__name__}: {exc})"
        return [CaptionFailure(source, ImageError(source, reason)).to_record()]


def batch_items(batch: pyarrow.Table) -> list[tuple[str, Any]]:
    """``(source, input)`` pairs from a batch: bytes with their path, or paths to read."""
    columns = set(batch.column_names)
    name_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if "bytes" in columns:
        data = batch.column("bytes").to_pylist()
        names = (batch.column(name_column).to_pylist() if name_column
                 else [f"<{len(d or b'')} bytes>" for d in data])
        return [(str(name), d or b"") for name, d in zip(names, data)]
    paths = [str(p) for p in batch.column(name_column).to_pylist()]
    return list(zip(paths, paths))  # the worker reads the file (load_image's safe path)


class CaptionActor:
    """One actor of the pool: loads its ``Captioner`` once, captions batch after batch."""

    def __init__(self, model: str | None, device: str, batch_size: int,
                 generation: dict[str, Any], exact_preprocessing: bool = False):
        import ray

        from .captioner import Captioner

        # Threads = the CPUs Ray reserved for this actor, so actors on a node never oversubscribe.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self.captioner = Captioner(model, device=device, cpu_threads=max(1, round(cpus)),
                                   exact_preprocessing=exact_preprocessing)
        self.captioner.options(**generation)  # a combination this model rejects fails here
        self.batch_size, self.generation = batch_size, generation

    def __call__(self, batch: pyarrow.Table) -> pyarrow.Table:
        import pyarrow as pa

        records = caption_items(self.captioner, batch_items(batch), self.batch_size,
                                self.generation)
        rows = [{key: record.get(key) for key in RECORD_FIELDS} for record in records]
        return pa.Table.from_pylist(rows, schema=record_schema())


def caption_dataset(inputs: str | Path | Iterable[str | Path] | ray.data.Dataset,
                    model: str | Path | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
                    actors: int | tuple[int, int | None] = (1, None), cpus_per_actor: int = 1,
                    device: str = "cpu", skip: Iterable[str] = (),
                    exact_preprocessing: bool = False, **generation: Any) -> ray.data.Dataset:
    """Caption many images on the Ray cluster this process is connected to (lazily).

    Args:
        inputs: files, folders or globs, expanded as ``edgecap caption`` expands them (paths
            must be readable on every node); or a Ray Dataset with a ``bytes`` column (and
            ``path`` as the source name, as ``ray.data.read_binary_files(include_paths=True)``
            gives) or a ``path``/``source``/``item`` column of paths.
        model: export directory on every node; None for the embedded model.
        batch_size: images per actor call, captioned together (captions do not depend on it).
        actors: the pool size, ``n`` or ``(min, max)``; ``max`` None lets Ray grow the pool as
            far as the cluster's CPUs allow.
        cpus_per_actor: CPUs Ray reserves for each actor; it runs that many threads.
        device: as for ``Captioner``.
        skip: sources to leave out (inputs already captioned by an earlier run).
        exact_preprocessing: as for ``Captioner``.
        **generation: as for ``Captioner.caption``.
    Returns:
        A lazy ``ray.data.Dataset`` of caption records, one row per input (columns
        ``RECORD_FIELDS``; a key the record lacks is null). Rows come in completion order.
    Raises:
        OptionsError: unknown or out-of-bounds generation options (before anything runs).
    """
    import ray.data

    generation = check_generation(generation)
    low, high = (actors, actors) if isinstance(actors, int) else actors
    dataset = _input_dataset(inputs, set(skip))
    model = str(model) if model is not None else None
    # Ray Data's actor pools restart a dead actor and retry its batch without limit
    # (max_restarts=-1, max_task_retries=-1 are its defaults; docs/distributed.md).
    return dataset.map_batches(
        CaptionActor, batch_size=batch_size, batch_format="pyarrow", num_cpus=cpus_per_actor,
        fn_constructor_args=(model, device, batch_size, generation, exact_preprocessing),
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
    )


def _input_dataset(inputs: Any, skip: set[str]) -> ray.data.Dataset:
    """The inputs as a dataset of rows, without those in ``skip``."""
    import ray.data

    if isinstance(inputs, ray.data.Dataset):
        columns = inputs.columns() or []
        name_column = next((c for c in PATH_COLUMNS if c in columns), None)
        if "bytes" not in columns and name_column is None:
            raise EdgecapError(f"input dataset needs a 'bytes' or 'path' column (has {columns})")
        if skip and name_column:
            inputs = inputs.filter(lambda row: str(row[name_column]) not in skip)
        return inputs
    patterns = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    sources = [s for s in expand_inputs(str(p) for p in patterns) if s not in skip]
    return ray.data.from_items([{"path": source} for source in sources])


def connect(address: str) -> bool:
    """Join a Ray cluster; returns True when this call made the connection (so close it).

    ``auto``: ``RAY_ADDRESS``, else the cluster ``ray start`` recorded on this machine, else a
    new private cluster here. ``local``: always a new private cluster. Anything else is a
    cluster's address (``HOST:PORT``, ``ray://HOST:PORT``).

    Raises:
        EdgecapError: nothing answers at the address (Ray itself would retry for minutes).
    """
    import ray

    if ray.is_initialized():  # an embedding program (or a test) already chose the cluster
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address == "auto":
        recorded = recorded_address()
        if recorded and answers(recorded):
            address = recorded
        else:
            if recorded:  # a `ray start` that has since stopped leaves its address behind
                log.warning("no Ray cluster answers at %s; starting a local one", recorded)
            address = "local"
    if address == "local":
        ray.init(address="local", include_dashboard=False, **quiet)
        return True
    if not answers(address):
        raise EdgecapError(f"no Ray cluster answers at {address} (start one with `ray start "
                           "--head`, or use --ray local)")
    ray.init(address=address, **quiet)
    return True


def recorded_address() -> str | None:
    """``RAY_ADDRESS``, else the address the last ``ray start --head`` here recorded."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.utils import read_ray_address  # where `ray start` records it

        return read_ray_address()
    except (ImportError, OSError):  # a Ray that keeps it elsewhere: start a local cluster
        return None


def answers(address: str, timeout_s: float = 3.0) -> bool:
    """Whether something accepts connections at ``HOST:PORT`` (``ray://`` too)."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def paths_dataset(sources: list[str]) -> ray.data.Dataset:
    """Already-expanded input paths as a dataset (one ``path`` row each)."""
    import ray.data

    return ray.data.from_items([{"path": source} for source in sources])
