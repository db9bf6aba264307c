"""The modules depthbench puts into a model: parameter-free stand-ins and the linear maps surgery inserts.

Two sides read them, which is why they live apart from both: the adapters (`depthbench.modeling.adapters`)
name, per family, which stand-in replaces which part of a sub-block (`ModelAdapter.sub_block_stand_ins`) and
recognise an inserted module where a family's access must look through it (Gemma's post-FFN norm wrapped in a
`NormThenLinear`); `depthbench.modeling.surgery` puts them in place for good, and `ModelAdapter.skipping`
swaps their ``forward`` in for a while. None of them is known to transformers: a model carrying one saves
and loads through `depthbench.modeling.saving`.
"""

from __future__ import annotations

import torch
from torch import nn


class StandIn(nn.Module):
    """A parameter-free module put in place of part of a removed or skipped sub-block."""


class ZeroOutput(StandIn):
    """Returns zeros shaped like its input, with last dimension ``width`` (default: the input's), as
    ``(zeros, None)`` where the module it stands in for returns a pair (attention modules)."""

    def __init__(self, width: int | None = None, returns_pair: bool = False):
        super().__init__()
        self.width, self.returns_pair = width, returns_pair

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        zeros = x.new_zeros(*x.shape[:-1], x.shape[-1] if self.width is None else self.width)
        return (zeros, None) if self.returns_pair else zeros

    def extra_repr(self) -> str:
        return f"width={self.width}, returns_pair={self.returns_pair}"


class IdentityStandIn(StandIn):
    """Passes its input through (a removed sub-block's own norm)."""

    def forward(self, x, *args, **kwargs):
        return x


class PassThrough(StandIn):
    """A skipped decoder layer: returns its input hidden states, as ``(h, None)`` for families whose
    layers return a tuple."""

    def __init__(self, returns_tuple: bool = False):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, None) if self.returns_tuple else h


class ResidualPatch(nn.Module):
    """``h -> h @ T`` on a decoder layer's output, T stored as ``weight = T^T`` (key
    ``...layers.K.residual_patch.weight``) in float32 at least (float64 for a float64 model); the product
    runs in that dtype and is cast back to ``h``'s."""

    def __init__(self, transform: torch.Tensor, model_dtype: torch.dtype = torch.float32):
        super().__init__()
        dtype = torch.promote_types(model_dtype, torch.float32)
        self.weight = nn.Parameter(transform.detach().to(torch.float64).T.to(dtype).contiguous(), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return (hidden_states.to(self.weight.dtype) @ self.weight.T).to(hidden_states.dtype)


def apply_residual_patch(layer: nn.Module, args, output):
    """Forward hook of a patched layer (looks the patch up on the layer, so a deep copy patches itself)."""
    patch = layer.residual_patch
    if isinstance(output, tuple):
        return (patch(output[0]), *output[1:])
    return patch(output)


class NormThenLinear(nn.Module):
    """A norm after the MLP followed by an explicit ``Linear(d, d, bias=False)`` (weight ``T^T``): outputs
    ``M T``. Keys ``<norm>.norm.weight`` and ``<norm>.linear.weight`` (Gemma:
    ``post_feedforward_layernorm.norm.weight`` / ``.linear.weight``); plain ``from_pretrained`` does not know
    them, so such a model is saved and loaded by `depthbench.modeling.saving`."""

    def __init__(self, norm: nn.Module, linear: nn.Linear):
        super().__init__()
        self.norm = norm
        self.linear = linear

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(hidden_states))
