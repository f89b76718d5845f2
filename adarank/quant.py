"""Low-bit storage for Q-GaLore (arXiv 2407.08296): INT4 projectors, INT8 weights.

Three pieces, all plain torch on any device:

- **Packing**: ``pack_int4`` / ``unpack_int4`` store two 4-bit codes per byte
  (element ``2i`` in the low nibble, ``2i+1`` in the high one).
- **Group-wise asymmetric min/max quantisation**: ``quantize`` splits the
  row-major flattened tensor into groups of ``group_size`` consecutive elements
  and maps each group's range ``[min, max]`` onto the codes ``0 … 2ᵇ−1``:
  ``scale = (max − min)/(2ᵇ − 1)``, ``zero = min``, ``x̂ = zero + scale·q``. The
  result is a ``QTensor``: a plain ``dict`` of tensors and ints, so it can sit in
  optimizer state and load with ``torch.load(weights_only=True)``.
- **INT8 linear layers**: ``Int8Linear`` keeps its weight as int8 codes plus
  per-group scales and zeros, runs the forward pass on the dequantised weight,
  hands the float32 weight gradient to the optimizer (``weight.weight_grad``) and
  applies updates with stochastic rounding (``apply_update_``);
  ``quantize_linears`` swaps a model's ``nn.Linear`` layers for it.

Zero point. The reference code rounds the zero point to an integer in
``[0, 2ᵇ−1]``; for a group that does not contain 0 (all positive, say) that
zero point is clamped and elements are clamped with it, so the error can reach
the whole range. Here the zero point is the float group minimum, which keeps the
round-to-nearest error at most ``scale/2`` for every group. Scales and zeros are
float32 (bf16 would add up to 2⁻⁹ relative error to both and void the bound).

Stochastic rounding (Q-GaLore; Gupta et al. 2015, arXiv 1502.02551) rounds ``x`` up with
probability ``x − ⌊x⌋``, so ``E[round(x)] = x``: many small updates, each far
below one quantisation step, still move an INT8 weight on average.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "Int8Linear",
    "clip_grad_norm_",
    "QTensor",
    "dequantize",
    "flatten_qtensor",
    "is_int8_weight",
    "pack_int4",
    "qtensor_nbytes",
    "quantize",
    "quantize_linears",
    "stochastic_round",
    "unflatten_qtensor",
    "unpack_int4",
]

_BITS = (4, 8)
_QTENSOR_KEYS = ("codes", "scale", "zero", "bits", "group_size", "shape")


class QTensor(TypedDict):
    """A group-quantised tensor; at run time a plain ``dict`` (``weights_only``-safe).

    Keys:
        codes: ``torch.uint8``, 1-D. ``bits=8``: one code per element (``numel``
            bytes); ``bits=4``: two codes per byte (``ceil(numel/2)`` bytes, see
            ``pack_int4``).
        scale: float32, ``(num_groups,)``, ``(max − min)/(2ᵇ − 1)`` per group.
        zero: float32, ``(num_groups,)``, the value of code 0 (the group minimum).
        bits: 4 or 8. group_size: elements per group (the last group may be short).
        shape: the original shape, a tuple of ints.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    shape: tuple[int, ...]


# ----------------------------------------------------------------- packing


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    flat = q.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte.

    Args:
        q: ``torch.uint8`` tensor of any shape with values in ``0 … 15``; an odd
            number of elements is padded with one zero code.

    Returns:
        1-D ``torch.uint8`` of ``ceil(q.numel()/2)`` bytes; byte ``i`` holds
        element ``2i`` (row-major) in its low nibble and ``2i+1`` in its high one.
        ``unpack_int4(pack_int4(q), q.numel())`` equals ``q.reshape(-1)`` exactly.

    Raises:
        ValueError: ``q`` is not uint8 or holds a value above 15 (checking the
            values costs one device synchronisation).
    """
    if q.dtype != torch.uint8:
        raise ValueError(f"pack_int4 needs torch.uint8 codes, got {q.dtype}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"pack_int4 needs codes in 0..15, got a maximum of {int(q.max())}")
    return _pack_int4(q)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: the first ``numel`` 4-bit codes as 1-D ``torch.uint8``.

    Raises ``ValueError`` when ``packed`` is not uint8 or holds fewer than
    ``numel`` codes.
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 needs torch.uint8 bytes, got {packed.dtype}")
    if not 0 <= numel <= 2 * packed.numel():
        raise ValueError(
            f"unpack_int4: numel={numel} does not fit {packed.numel()} packed bytes "
            f"(at most {2 * packed.numel()} codes)"
        )
    flat = packed.reshape(-1)
    return torch.stack([flat & 0x0F, flat >> 4], dim=1).reshape(-1)[:numel]


# ------------------------------------------------------- stochastic rounding


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round each element down or up at random, unbiased: ``E[round(x)] = x``.

    Distributed as ``⌊x + U⌋`` with ``U ~ U[0, 1)`` drawn per element, but
    computed as ``⌊x⌋ + [U < x − ⌊x⌋]``: adding ``U`` to a large ``x`` can round
    ``x + U`` up to ``x + 1`` in floating point, which this form cannot.

    Guarantees: the result is ``⌊x⌋`` or ``⌊x⌋ + 1`` (an integer ``x`` is kept
    exactly), so ``|round(x) − x| < 1``; ``P(round up) = x − ⌊x⌋`` up to the 2⁻²⁴
    granularity of ``torch.rand`` (float32; 2⁻⁵³ for float64 input).

    Args:
        x: floating tensor, any shape and device. Half-precision input is
            rounded in float32 and cast back (integers up to 256 are exact in bf16).
        generator: a ``torch.Generator`` on ``x``'s device for reproducible draws;
            the global generator when None.

    Returns:
        A tensor of ``x``'s shape and dtype holding integer values.
    """
    if not x.is_floating_point():
        raise ValueError(f"stochastic_round needs a floating tensor, got {x.dtype}")
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    low = torch.floor(work)
    u = torch.rand(work.shape, generator=generator, device=work.device, dtype=work.dtype)
    return (low + (u < work - low).to(work.dtype)).to(x.dtype)


# ----------------------------------------------------------- quantisation


def _check_quant_args(bits: int, group_size: int) -> None:
    if bits not in _BITS:
        raise ValueError(f"invalid bits={bits!r}: expected one of {_BITS}")
    if not (isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 1):
        raise ValueError(f"invalid group_size={group_size!r}: expected an integer >= 1")


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row-major flatten to ``(num_groups, group_size)`` float32; the last group is
    padded by repeating the last element, so padding never widens its range."""
    flat = x.reshape(-1).to(torch.float32)
    pad = -flat.numel() % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


def _quantize_groups(
    groups: torch.Tensor, bits: int, stochastic: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, same shape as ``groups``), scale and zero (float32, per row)."""
    qmax = (1 << bits) - 1
    low = groups.amin(dim=1)
    high = groups.amax(dim=1)
    # Halved: a group spanning ±3e38 has max − min beyond float32's range (inf, and
    # then NaN codes); halves of finite floats never overflow. Halving is exact
    # except for subnormals (it loses their last bit, 2⁻¹⁴⁹ at most).
    half_scale = (high * 0.5 - low * 0.5) / qmax
    scale = half_scale * 2
    # A constant group has scale 0: every code is 0 and x̂ = zero = x exactly.
    safe = torch.where(half_scale > 0, half_scale, torch.ones_like(half_scale))
    t = (groups * 0.5 - (low * 0.5)[:, None]) / safe[:, None]
    t = stochastic_round(t, generator) if stochastic else torch.round(t)
    # Only float rounding can push t past qmax (e.g. (max − min)/scale = 255.00002).
    codes = t.clamp_(0, qmax).to(torch.uint8)
    return codes, scale, low


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int = 256,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QTensor:
    """Group-wise asymmetric min/max quantisation of a float tensor to ``bits`` ∈ {4, 8}.

    The row-major flattened ``x`` is cut into groups of ``group_size``
    consecutive elements (a short last group is padded internally; only
    ``numel`` codes are stored). Per group: ``scale = (max − min)/(2ᵇ − 1)``,
    ``zero = min``, ``q = round((x − zero)/scale)`` ∈ ``[0, 2ᵇ − 1]``.

    Error bound (per element, against the float32 value of ``x``):
    ``|x̂ − x| ≤ scale/2`` with round-to-nearest, ``< scale`` with stochastic
    rounding (exact arithmetic; float32 evaluation adds a few ulps of the group's
    largest magnitude). A constant group (scale 0) is reproduced exactly.
    With ``stochastic=True``, ``E[x̂] = x`` (see ``stochastic_round``).

    Args:
        x: floating tensor of any shape and device; finite values (a NaN or Inf
            poisons its group). Computed in float32.
        bits: 4 (codes packed two per byte) or 8.
        group_size: elements per group; Q-GaLore uses 256.
        stochastic: stochastic instead of nearest rounding.
        generator: ``torch.Generator`` on ``x``'s device for the stochastic draws.

    Returns:
        A ``QTensor`` dict (codes uint8, scale/zero float32 on ``x``'s device).
        Storage: ``numel·bits/8`` bytes of codes plus 8 bytes per group.
    """
    _check_quant_args(bits, group_size)
    if not x.is_floating_point():
        raise ValueError(f"quantize needs a floating tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"quantize needs a non-empty tensor, got shape {tuple(x.shape)}")
    codes, scale, zero = _quantize_groups(_grouped(x, group_size), bits, stochastic, generator)
    codes = codes.reshape(-1)[: x.numel()]
    # Pack, or copy out of the padded buffer so a checkpoint holds numel bytes.
    codes = _pack_int4(codes) if bits == 4 else codes.clone()
    return {"codes": codes, "scale": scale, "zero": zero, "bits": bits,
            "group_size": group_size, "shape": tuple(x.shape)}


def _codes_of(q: Mapping[str, Any]) -> torch.Tensor:
    numel = math.prod(q["shape"])
    if q["bits"] == 4:
        return unpack_int4(q["codes"], numel)
    return q["codes"].reshape(-1)[:numel]


def _dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
    shape: tuple[int, ...] | torch.Size,
) -> torch.Tensor:
    numel = codes.numel()
    pad = -numel % group_size
    flat = codes.reshape(-1)
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, group_size).to(torch.float32)
    # 2·(zero/2 + (scale/2)·q): zero + scale·q itself can pass float32's maximum on
    # the way to a finite x̂ (q·scale ≈ max − min); see ``_quantize_groups``.
    x = torch.addcmul(zero.float()[:, None] * 0.5, groups, scale.float()[:, None] * 0.5)
    return x.mul_(2).reshape(-1)[:numel].reshape(shape)


def dequantize(q: Mapping[str, Any]) -> torch.Tensor:
    """``x̂ = zero + scale·code`` per group: a float32 tensor of ``q["shape"]``.

    Accepts a ``QTensor`` (or any mapping with its keys, e.g. one rebuilt by
    ``unflatten_qtensor``). Raises ``ValueError`` when keys are missing or the
    code/group counts do not match the shape.
    """
    missing = [k for k in _QTENSOR_KEYS if k not in q]
    if missing:
        raise ValueError(f"dequantize: not a QTensor, missing keys {missing}")
    _check_quant_args(q["bits"], q["group_size"])
    shape = tuple(q["shape"])
    numel = math.prod(shape)
    groups = -(-numel // q["group_size"])
    expected_bytes = numel if q["bits"] == 8 else -(-numel // 2)
    if q["codes"].numel() != expected_bytes or q["scale"].numel() != groups or (
        q["zero"].numel() != groups
    ):
        raise ValueError(
            f"dequantize: shape {shape} with bits={q['bits']}, group_size={q['group_size']} "
            f"needs {expected_bytes} code bytes and {groups} groups; got "
            f"{q['codes'].numel()} bytes, {q['scale'].numel()} scales, "
            f"{q['zero'].numel()} zeros"
        )
    return _dequantize_codes(_codes_of(q), q["scale"], q["zero"], q["group_size"], shape)


def qtensor_nbytes(q: Mapping[str, Any]) -> int:
    """Bytes held by the tensors of a ``QTensor`` (codes, scale, zero)."""
    return sum(q[k].numel() * q[k].element_size() for k in ("codes", "scale", "zero"))


def flatten_qtensor(q: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{f"{prefix}_{key}": value}`` for every QTensor key, for flat optimizer state.

    Flat keys keep the float32 scales out of ``Optimizer.load_state_dict``'s
    recursive cast of nested dicts to the parameter's dtype (a bf16 parameter
    would otherwise get bf16 scales back from a checkpoint).
    """
    return {f"{prefix}_{k}": q[k] for k in _QTENSOR_KEYS}


def unflatten_qtensor(state: Mapping[str, Any], prefix: str) -> QTensor | None:
    """The QTensor stored by ``flatten_qtensor(q, prefix)`` in ``state``, or None."""
    if f"{prefix}_codes" not in state:
        return None
    out = {k: state[f"{prefix}_{k}"] for k in _QTENSOR_KEYS}
    out["shape"] = tuple(out["shape"])
    return out  # type: ignore[return-value]


# ---------------------------------------------------------- INT8 weights


def _to_int8(codes: torch.Tensor) -> torch.Tensor:
    # Unsigned code q ∈ [0, 255] stored as the int8 q − 128: flipping the top bit
    # and reinterpreting the byte is exactly that shift in two's complement.
    return (codes ^ 0x80).view(torch.int8)


def _from_int8(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.uint8) ^ 0x80


def is_int8_weight(p: torch.Tensor) -> bool:
    """True when ``p`` is the int8 weight of an ``Int8Linear`` (read ``p.weight_grad``
    for its gradient and ``p.int8_module`` for the layer)."""
    return getattr(p, "int8_module", None) is not None


class _Int8LinearFunction(torch.autograd.Function):
    """``y = x Ŵᵀ + b`` with Ŵ dequantised; the float32 ``∂L/∂W`` goes to the
    module (``weight.weight_grad``), since an int8 tensor cannot hold a float grad."""

    @staticmethod
    def forward(ctx, x, codes, scale, zero, bias, anchor, module):  # noqa: ARG004
        W = _dequantize_codes(_from_int8(codes), scale, zero, module.group_size, codes.shape)
        ctx.module = module
        ctx.has_bias = bias is not None
        # Ŵ is recomputed in backward rather than saved: saving it would keep an
        # m×n float copy alive per layer, which is what INT8 weights avoid.
        ctx.save_for_backward(x, codes, scale, zero)
        return F.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, codes, scale, zero = ctx.saved_tensors
        module = ctx.module
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            W = _dequantize_codes(_from_int8(codes), scale, zero, module.group_size, codes.shape)
            grad_x = grad_out @ W.to(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(torch.float32)
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        module._accumulate_weight_grad(g2.T @ x2)
        return grad_x, None, None, None, grad_bias, None, None


class Int8Linear(nn.Module):
    """A linear layer whose weight lives as INT8 codes with per-group scales and zeros.

    Storage (``out_features × in_features`` weight, row-major groups of
    ``group_size``): ``weight`` int8 codes (1 byte per weight) plus float32
    ``weight_scale`` and ``weight_zero`` of ``ceil(numel/group_size)`` each, i.e.
    ``1 + 8/group_size`` bytes per weight (1.03 at 256) against 4 for float32.
    Code ``c`` stands for ``zero + scale·(c + 128)``, so round-to-nearest is
    within ``scale/2`` of the float weight (see ``quantize``).

    Forward: dequantises the whole weight to a transient float32 m×n tensor
    (cast to the input dtype), then ``F.linear``; backward dequantises it again
    (nothing m×n is saved between the passes). Extra cost per pass: O(m·n)
    elementwise work and one m×n float temporary.

    Gradient: integer tensors cannot hold a float ``.grad``, so ``weight`` is an
    ``nn.Parameter`` with ``requires_grad=False`` and every backward pass adds the
    float32 ∂L/∂W (m×n) to the attribute ``weight.weight_grad`` (None until the
    first backward; *accumulated* across backward calls, like ``.grad``). Then
    the hooks of ``register_weight_grad_hook`` run, as a post-accumulate-grad
    hook would. The optimizer reads ``p.weight_grad``, calls
    ``p.int8_module.apply_update_(delta)`` and must set ``p.weight_grad = None``
    itself: ``Optimizer.zero_grad`` and ``Module.zero_grad`` do not know it.
    The gradient is computed whenever grad mode is on, even if neither the input
    nor the bias requires grad. ``bias`` stays a float parameter with ``.grad``.

    Why a parameter, not a buffer: it is listed by ``model.parameters()`` and
    ``named_parameters()``, so an optimizer can hold it in a param group and key
    its state by it; ``.to(device)`` keeps the same Python object (the optimizer
    state and the ``weight_grad``/``int8_module`` attributes stay attached) and
    ``.to(dtype)``/``.half()`` leave integer tensors alone (and this class keeps
    the scales and zeros float32 through them; the bias converts). It appears in
    ``state_dict()`` as ``weight`` (int8), with ``weight_scale``/``weight_zero``.
    Code that filters ``requires_grad`` skips it, and ``clip_grad_norm_`` does
    not see its gradient.

    Limitation: in layer-wise mode (the weight updated inside backward) the
    layer must be called once per forward pass; a second call's backward finds
    its saved codes modified in place and autograd raises.

    Args:
        in_features, out_features, bias: as ``nn.Linear``; the weight starts at
            zero, so build from a trained or initialised layer with ``from_linear``.
        group_size: weights per quantisation group (row-major); Q-GaLore uses 256.
        device: where the tensors live. dtype: the bias dtype (default float32).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_quant_args(8, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        groups = -(-(in_features * out_features) // group_size)
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
            requires_grad=False,
        )
        self.register_buffer("weight_scale", torch.zeros(groups, device=device))
        self.register_buffer("weight_zero", torch.zeros(groups, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._weight_grad_hooks: OrderedDict[int, Callable[[nn.Parameter], None]] = OrderedDict()
        self._attach()

    def _attach(self) -> None:
        if getattr(self.weight, "int8_module", None) is not self:
            self.weight.int8_module = self
        if not hasattr(self.weight, "weight_grad"):
            self.weight.weight_grad = None

    # Whatever builds a new Parameter object drops its tensor attributes: a
    # conversion that does not reuse the tensor, deepcopy (Parameter.__deepcopy__
    # copies data only), load_state_dict(assign=True). Re-attach after each.
    # Scales and zeros stay float32 through dtype conversions (model.bfloat16()):
    # the error bound is stated for float32 group parameters.
    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        out = super()._apply(fn, recurse)
        self._attach()
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = self.weight_scale.float()
            self.weight_zero = self.weight_zero.float()
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._attach()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._attach()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 256, *, stochastic: bool = False,
        generator: torch.Generator | None = None,
    ) -> Int8Linear:
        """An ``Int8Linear`` holding ``linear``'s weight quantised (nearest rounding by
        default) and a copy of its bias (same dtype), on the same device."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     group_size=group_size, device=weight.device,
                     dtype=None if linear.bias is None else linear.bias.dtype)
        module.set_weight_(weight, stochastic=stochastic, generator=generator)
        if linear.bias is not None:
            with torch.no_grad():
                module.bias.copy_(linear.bias)
            module.bias.requires_grad_(linear.bias.requires_grad)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses, float32 ``out_features × in_features``."""
        return _dequantize_codes(_from_int8(self.weight), self.weight_scale, self.weight_zero,
                                 self.group_size, self.weight.shape)

    @torch.no_grad()
    def set_weight_(
        self, W: torch.Tensor, *, stochastic: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        """Re-quantise the layer to ``W`` (float, ``out_features × in_features``) with
        fresh group scales, in place (same tensors, ``copy_``)."""
        if tuple(W.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"Int8Linear.set_weight_: W has shape {tuple(W.shape)}, the layer "
                f"{tuple(self.weight.shape)}"
            )
        codes, scale, zero = _quantize_groups(_grouped(W, self.group_size), 8, stochastic,
                                              generator)
        codes = codes.reshape(-1)[: W.numel()].view(self.weight.shape)
        self.weight.copy_(_to_int8(codes))
        self.weight_scale.copy_(scale)
        self.weight_zero.copy_(zero)

    @torch.no_grad()
    def apply_update_(
        self, delta: torch.Tensor, generator: torch.Generator | None = None, *,
        stochastic: bool = True,
    ) -> None:
        """``W ← Q(Ŵ + delta)``: dequantise, add the float32 ``delta`` (m×n, already
        scaled by the learning rate and signed), re-quantise with new group scales.

        With ``stochastic=True`` (Q-GaLore) the result is unbiased:
        ``E[Ŵ_new] = Ŵ + delta`` per element, each within one new scale of it.
        ``generator`` (on the layer's device) makes the draws reproducible.
        """
        if delta.numel() != self.weight.numel():
            raise ValueError(
                f"Int8Linear.apply_update_: delta has shape {tuple(delta.shape)}, the layer "
                f"{tuple(self.weight.shape)}"
            )
        W = self.dequantized_weight().add_(delta.to(torch.float32).view(self.weight.shape))
        self.set_weight_(W, stochastic=stochastic, generator=generator)

    def register_weight_grad_hook(
        self, hook: Callable[[nn.Parameter], None]
    ) -> RemovableHandle:
        """Call ``hook(self.weight)`` after each backward pass has added to
        ``weight.weight_grad`` (the analogue of ``register_post_accumulate_grad_hook``,
        which integer parameters cannot have). Returns a handle with ``.remove()``."""
        handle = RemovableHandle(self._weight_grad_hooks)
        self._weight_grad_hooks[handle.id] = hook
        return handle

    def _accumulate_weight_grad(self, grad: torch.Tensor) -> None:
        p = self.weight
        if p.weight_grad is None:
            p.weight_grad = grad
        else:
            p.weight_grad.add_(grad)
        for hook in list(self._weight_grad_hooks.values()):
            hook(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A tiny leaf that requires grad makes autograd run our backward (and so
        # produce ∂L/∂W) even when neither x nor the bias requires grad.
        anchor = (torch.empty(0, device=x.device, requires_grad=True)
                  if torch.is_grad_enabled() else None)
        return _Int8LinearFunction.apply(x, self.weight, self.weight_scale, self.weight_zero,
                                         self.bias, anchor, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


def quantize_linears(
    model: nn.Module, *, exclude: Iterable[str] = ("embed", "lm_head"), group_size: int = 256,
) -> list[str]:
    """Replace, in place, every trainable ``nn.Linear`` of ``model`` whose qualified
    name contains none of the ``exclude`` substrings by ``Int8Linear.from_linear``.

    Only modules of type exactly ``nn.Linear`` are replaced: subclasses (e.g.
    ``nn.MultiheadAttention``'s ``out_proj``, whose weight is read directly by
    its owner) are left alone.
    Frozen linears (``weight.requires_grad`` False) are left alone. A linear
    whose weight is shared with another module (tied) is refused with
    ``ValueError``: quantising one side would silently untie it.

    Returns:
        The qualified names of the replaced modules, in ``named_modules`` order.
    """
    if isinstance(exclude, str):
        raise ValueError(
            f"exclude={exclude!r} must be a sequence of substrings, e.g. ({exclude!r},)"
        )
    exclude = tuple(exclude)
    _check_quant_args(8, group_size)
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and name and module.weight.requires_grad
        and not any(x in name for x in exclude)
    ]
    for name, module in targets:
        if uses[id(module.weight)] > 1:
            raise ValueError(
                f"quantize_linears: the weight of {name} is shared with another module "
                "(tied); add it to exclude"
            )
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(module, group_size))
    return [name for name, _ in targets]


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2) that also sees INT8 weights' ``weight_grad``.

    The total norm is over every ``p.grad`` and every ``Int8Linear`` weight's
    float32 ``weight_grad``; all are scaled by ``min(1, max_norm / (norm + 1e-6))``,
    torch's formula. Returns the total norm before clipping.
    """
    grads = []
    for p in parameters:
        if p.grad is not None:
            grads.append(p.grad)
        elif is_int8_weight(p) and p.weight_grad is not None:
            grads.append(p.weight_grad)
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
