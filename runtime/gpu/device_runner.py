"""The decode loop with the cache kept where the graphs run (onnxruntime IO binding).

``GraphRunner`` hands numpy arrays to every run, so on a GPU each step would copy the whole
self-attention cache and every layer's cross K/V to the device and the grown cache back. Here
they stay as ``OrtValue``s on the session's device from the encoder's output to the last step:
only the token ids go in and the logits come out. Beam reordering and dropping finished images
gather rows on the device too (``gather_graph.py``), so decoding.py, which only calls ``start``,
``step`` and ``select``, is the same on every device.

Used on cuda and tensorrt; ``io_binding="on"`` uses it on the CPU as well, which is how the
tests check it gives the plain path's tokens.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .gather_graph import ROWS, gather_rows_model
from .providers import CPU, CUDA, TENSORRT, cuda_options
from ..manifest import GROUNDING_OUTPUTS, LOGITS, PIXEL_VALUES, Manifest
from ..sessions import build_helper_session
from ..runner import GraphRunner

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class DeviceTensor:
    """An ``OrtValue`` left where onnxruntime put it, with the ``shape`` decoding reads."""

    __slots__ = ("value",)

    def __init__(self, value: ort.OrtValue):
        self.value = value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.value.data_type()])


class RowGather:
    """Takes the same rows of several device tensors in one run of a Gather graph."""

    def __init__(self, providers: list, device: str):
        self.providers = providers
        self.device = device
        self._sessions: dict[tuple, ort.InferenceSession] = {}  # by (dtype, rank) per input

    def __call__(self, tensors: list[DeviceTensor], rows: np.ndarray) -> list[DeviceTensor]:
        if not tensors:
            return []
        key = tuple((t.dtype, len(t.shape)) for t in tensors)
        if key not in self._sessions:
            self._sessions[key] = build_helper_session(gather_rows_model(list(key)), self.providers)
        session = self._sessions[key]
        binding = session.io_binding()
        binding.bind_cpu_input(ROWS, np.ascontiguousarray(rows, dtype=np.int64))
        for i, tensor in enumerate(tensors):
            binding.bind_ortvalue_input(f"x{i}", tensor.value)
            binding.bind_output(f"y{i}", self.device)
        session.run_with_iobinding(binding)
        return [DeviceTensor(value) for value in binding.get_outputs()]


class DeviceGraphRunner(GraphRunner):
    """``GraphRunner`` whose cache and cross K/V never leave the decoder session's device."""

    def __init__(self, encoder: ort.InferenceSession, decoder: ort.InferenceSession,
                 manifest: Manifest):
        super().__init__(encoder, decoder, manifest)
        on_gpu = decoder.get_providers()[0] in (CUDA, TENSORRT)
        self.device = "cuda" if on_gpu else "cpu"
        # Gathers are copies: TensorRT would build an engine per row count for nothing.
        providers = [(CUDA, cuda_options("fp32")), CPU] if on_gpu else [CPU]
        self.gather = RowGather(providers, self.device)

    def encode(self, pixel_values: np.ndarray) -> list:
        """Cross K/V as device tensors; a prefix model's embeddings stay on the host (they are
        small and feed one prefill)."""
        if self.prefix:
            return super().encode(pixel_values)
        return self._run_encoder(pixel_values)

    def encode_grounded(self, pixel_values: np.ndarray) -> tuple[list, list[np.ndarray]]:
        """Cross K/V as device tensors, the (small) grounding outputs on the host."""
        if self.prefix:
            return super().encode_grounded(pixel_values)
        values = self._run_encoder(pixel_values, GROUNDING_OUTPUTS)
        layers = len(self.encoder_names)
        return values[:layers], [np.array(v.value.numpy()) for v in values[layers:]]

    def _run_encoder(self, pixel_values: np.ndarray, host_outputs: tuple[str, ...] = ()) -> list:
        """Every cross K/V bound on the device, then ``host_outputs`` on the host, in order."""
        binding = self.encoder.io_binding()
        binding.bind_cpu_input(PIXEL_VALUES, np.ascontiguousarray(pixel_values))
        for name in self.encoder_names:
            binding.bind_output(name, self.device)
        for name in host_outputs:
            binding.bind_output(name, "cpu")
        self.encoder.run_with_iobinding(binding)
        return [DeviceTensor(value) for value in binding.get_outputs()]

    def _empty_cache(self, rows: int) -> list[DeviceTensor]:
        m = self.manifest
        empty = ort.OrtValue.ortvalue_from_shape_and_type(
            [rows, m.num_heads, 0, m.head_dim], self._float_type, self.device, 0)
        return [DeviceTensor(empty)] * len(self.past_names)

    def _run_decoder(self, feeds: dict) -> tuple[np.ndarray, list[DeviceTensor]]:
        binding = self.decoder.io_binding()
        for name, tensor in feeds.items():
            if isinstance(tensor, DeviceTensor):
                binding.bind_ortvalue_input(name, tensor.value)
            else:  # token ids, an (empty) prefix: copied in by onnxruntime
                binding.bind_cpu_input(name, np.ascontiguousarray(tensor))
        binding.bind_output(LOGITS, "cpu")  # the one output decoding reads on the host
        for name in self.output_names[1:]:
            binding.bind_output(name, self.device)
        self.decoder.run_with_iobinding(binding)
        logits, *past = binding.get_outputs()
        # A copy: on the CPU, numpy() shares memory that onnxruntime frees with the OrtValue.
        return np.array(logits.numpy()), [DeviceTensor(value) for value in past]

    def _take_rows(self, tensors: list, rows: np.ndarray) -> list:
        if not tensors:
            return []
        if len(rows) == tensors[0].shape[0] and np.array_equal(rows, np.arange(len(rows))):
            return list(tensors)  # every row in place: nothing to move
        # Host arrays (cross K/V a caller encoded elsewhere) move to the device once, here.
        return self.gather([self._on_device(t) for t in tensors], rows)

    def _on_device(self, tensor) -> DeviceTensor:
        if isinstance(tensor, DeviceTensor):
            return tensor
        array = np.ascontiguousarray(tensor)
        return DeviceTensor(ort.OrtValue.ortvalue_from_numpy(array, self.device, 0))


def make_runner(encoder: ort.InferenceSession, decoder: ort.InferenceSession,
                manifest: Manifest, io_binding: str = "auto") -> GraphRunner:
    """The runner for these sessions: device-resident on a GPU provider (``io_binding`` "auto"),
    always ("on") or never ("off").

    Raises:
        ValueError: an unknown ``io_binding``.
    """
    if io_binding not in ("auto", "on", "off"):
        raise ValueError(f"io_binding must be auto, on or off (got {io_binding!r})")
    on_gpu = decoder.get_providers()[0] in (CUDA, TENSORRT)
    if io_binding == "on" or (io_binding == "auto" and on_gpu):
        return DeviceGraphRunner(encoder, decoder, manifest)
    return GraphRunner(encoder, decoder, manifest)
