"""ClipCap's two mappers (``--mapping_type mlp | transformer``), rebuilt from a state dict.

Both keep ClipCap's parameter names, so ``clip_project.*`` of a ClipCap checkpoint loads as it
is; every size (widths, layers, clip length) is read from the weights' shapes, so a checkpoint
spec names only the file (and, for the transformer, its heads: ClipCap uses eight). Each maps
image features [B, C] to a prefix [B, prefix_length, width].
"""

from __future__ import annotations

import re

import torch
from torch import nn


class MapperWeightsError(ValueError):
    """The state dict does not describe this mapper; the message says what is off."""


def layer_indices(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted indices ``i`` of the keys that match ``pattern`` (a regex with one group)."""
    return sorted({int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))})


class ClipCapMLP(nn.Module):
    """Linear, activation, ..., Linear (keys ``model.0.weight``, ``model.2.weight``, ...), then
    the output [B, prefix_length * width] is cut into the prefix."""

    def __init__(self, sizes: list[int], prefix_length: int, activation: str = "tanh",
                 bias: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh() if activation == "tanh" else nn.ReLU())
        self.model = nn.Sequential(*layers)
        self.prefix_length = prefix_length

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix_length: int, width: int,
                   activation: str = "tanh") -> ClipCapMLP:
        indices = layer_indices(state, r"model\.(\d+)\.weight")
        if not indices:
            raise MapperWeightsError("no MLP weights (model.0.weight, model.2.weight, ...)")
        if indices != list(range(0, 2 * len(indices), 2)):
            raise MapperWeightsError(f"MLP layers at model.{indices}; ClipCap's are at "
                                     "model.0, model.2, ... (an activation between each)")
        weights = [state[f"model.{i}.weight"] for i in indices]
        sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
        if sizes[-1] != prefix_length * width:
            raise MapperWeightsError(f"the MLP writes {sizes[-1]} numbers, not prefix_length x "
                                     f"GPT-2 width = {prefix_length} x {width}")
        mapper = cls(sizes, prefix_length, activation, bias="model.0.bias" in state)
        load_exactly(mapper, state)
        return mapper

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features).reshape(features.shape[0], self.prefix_length, -1)


class ClipCapTransformer(nn.Module):
    """ClipCap's transformer mapper: the features become ``clip_length`` tokens, learned
    ``prefix_const`` tokens follow, a pre-norm transformer runs over both, and the outputs at
    the learned tokens are the prefix."""

    def __init__(self, features: int, width: int, prefix_length: int, clip_length: int,
                 layers: int, heads: int = 8, mlp_width: int | None = None):
        super().__init__()
        self.clip_length = clip_length
        self.linear = nn.Linear(features, clip_length * width)
        self.prefix_const = nn.Parameter(torch.zeros(prefix_length, width))
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(
            ClipCapLayer(width, heads, mlp_width or 2 * width) for _ in range(layers))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix_length: int, width: int,
                   heads: int = 8) -> ClipCapTransformer:
        for key in ("linear.weight", "prefix_const"):
            if key not in state:
                raise MapperWeightsError(f"no {key} (ClipCap's transformer mapper has one)")
        const, linear = state["prefix_const"], state["linear.weight"]
        if const.shape[0] != prefix_length:
            raise MapperWeightsError(f"prefix_const holds {const.shape[0]} embeddings, not "
                                     f"prefix_length={prefix_length}")
        if const.shape[1] != width:
            raise MapperWeightsError(f"prefix_const is {const.shape[1]} wide, GPT-2 is {width}")
        if width % heads or linear.shape[0] % width:
            raise MapperWeightsError(f"width {width} does not split into {heads} heads, or "
                                     f"linear.weight {tuple(linear.shape)} into tokens of it")
        layers = layer_indices(state, r"transformer\.layers\.(\d+)\.norm1\.weight")
        mlp = state.get("transformer.layers.0.mlp.fc1.weight")
        mapper = cls(linear.shape[1], width, prefix_length, linear.shape[0] // width, len(layers),
                     heads, None if mlp is None else mlp.shape[0])
        load_exactly(mapper, state)
        return mapper

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch = features.shape[0]
        clip_tokens = self.linear(features).reshape(batch, self.clip_length, -1)
        learned = self.prefix_const.unsqueeze(0).expand(batch, -1, -1)
        hidden = torch.cat([clip_tokens, learned], dim=1)
        for layer in self.transformer.layers:
            hidden = layer(hidden)
        return hidden[:, self.clip_length :]


class ClipCapLayer(nn.Module):
    """One pre-norm block: self-attention (query and key/value projections without bias),
    then a ReLU MLP."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.to_queries = nn.Linear(width, width, bias=False)
        self.attn.to_keys_values = nn.Linear(width, 2 * width, bias=False)
        self.attn.project = nn.Linear(width, width)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, mlp_width), nn.Linear(mlp_width, width)
        self.heads = heads

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        head_dim = width // self.heads
        # [B, L, heads, head_dim] -> [B, heads, L, head_dim]
        queries = self.attn.to_queries(x).reshape(batch, length, self.heads, head_dim)
        keys_values = self.attn.to_keys_values(x).reshape(batch, length, 2, self.heads, head_dim)
        queries = queries.transpose(1, 2)
        keys, values = keys_values[:, :, 0].transpose(1, 2), keys_values[:, :, 1].transpose(1, 2)
        weights = torch.softmax(queries @ keys.transpose(-1, -2) * head_dim**-0.5, dim=-1)
        return self.attn.project((weights @ values).transpose(1, 2).reshape(batch, length, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.norm1(x))
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(self.norm2(x))))


def load_exactly(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load every weight of ``module`` from ``state``; a missing, extra or reshaped one is a
    ``MapperWeightsError`` naming it."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise MapperWeightsError(f"weights do not fit the mapper: missing {missing or 'none'}, "
                                 f"unexpected {extra or 'none'}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise MapperWeightsError(f"{key} is {tuple(state[key].shape)}, the mapper its other "
                                     f"weights describe needs {tuple(tensor.shape)}")
    module.load_state_dict(state)
