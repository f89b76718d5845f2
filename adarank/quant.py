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
- **INT8 weights**: ``Int8Weight`` is a parameter that owns int8 codes plus
  per-group scales and zeros and that the rest of PyTorch sees as a float
  weight with an ordinary ``.grad``; ``Int8Linear`` runs its forward pass on
  the dequantised weight; optimizers write updates back with stochastic
  rounding through ``requantize_``; ``quantize_linears`` swaps a model's
  ``nn.Linear`` layers for ``Int8Linear``.

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
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

__all__ = [
    "Int8Linear",
    "Int8Weight",
    "QTensor",
    "dequantize",
    "flatten_qtensor",
    "is_int8_weight",
    "pack_int4",
    "qtensor_nbytes",
    "quantize",
    "quantize_linears",
    "requantize_",
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
    return {
        "codes": codes,
        "scale": scale,
        "zero": zero,
        "bits": bits,
        "group_size": group_size,
        "shape": tuple(x.shape),
    }


def _codes_of(q: Mapping[str, Any]) -> torch.Tensor:
    numel = math.prod(q["shape"])
    if q["bits"] == 4:
        return unpack_int4(q["codes"], numel)
    return q["codes"].reshape(-1)[:numel]


def _dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
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
    if (
        q["codes"].numel() != expected_bytes
        or q["scale"].numel() != groups
        or (q["zero"].numel() != groups)
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


def is_int8_weight(p: torch.Tensor) -> TypeGuard[Int8Weight]:
    """True when ``p`` is an INT8 weight (an ``Int8Weight``, e.g. ``Int8Linear.weight``)."""
    return isinstance(p, Int8Weight)


_aten = torch.ops.aten
# Factories that read only the weight's shape, dtype and device, never its values.
_LIKE = {
    _aten.empty_like.default,
    _aten.zeros_like.default,
    _aten.ones_like.default,
    _aten.full_like.default,
    _aten.rand_like.default,
    _aten.randn_like.default,
}


class Int8Weight(torch.Tensor):
    """An INT8 weight that the rest of PyTorch sees as a float parameter.

    A tensor subclass without storage of its own (``_make_wrapper_subclass``):
    its shape, device and floating ``dtype`` (float32 unless converted, e.g. by
    ``model.bfloat16()``) are those of the weight it stands for, and it owns

    - ``codes``: ``torch.int8``, the weight's shape; code ``c`` stands for the
      unsigned ``c + 128`` of ``quantize`` (row-major groups of ``group_size``);
    - ``scale``, ``zero``: float32, one per group (float32 whatever ``dtype`` is);

    that is ``1 + 8/group_size`` bytes per weight (1.03 at 256).

    What the rest of PyTorch sees. As an ``nn.Parameter`` (``Int8Linear`` makes
    it one) it requires grad and autograd gives it a dense ``.grad`` of its
    ``dtype``, so ``model.zero_grad()``, ``torch.amp.GradScaler.unscale_``,
    ``torch.nn.utils.clip_grad_norm_``, post-accumulate-grad hooks and
    ``requires_grad`` filters (the HF Trainer's) treat it like any weight. Any
    operation that reads it (``F.linear``, ``@``, ``.norm()``, ``.t()``...) runs on
    the dequantised float weight and returns plain tensors (views are copies);
    ``zeros_like``-style factories return plain tensors without dequantising;
    ``.to(device/dtype)``, ``.clone()``, ``.detach()`` return ``Int8Weight``\\ s.
    Writing: ``copy_(W)`` re-quantises ``W`` with round-to-nearest; every other
    in-place operation raises ``RuntimeError`` — an update applied by a
    float optimizer (``torch.optim.AdamW``) would be lost to rounding, so updates
    go through ``requantize_`` (stochastic rounding), which adarank's optimizers
    call.

    Args:
        codes: int8 codes, contiguous, the weight's shape.
        scale, zero: float32 per-group scales and zeros (``ceil(numel/group_size)``).
        group_size: elements per group. dtype: the floating dtype it stands for.
        requires_grad: as for any tensor (``nn.Parameter`` sets it).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    # Plain tensors out of every torch function (the default would re-wrap them
    # as Int8Weight without codes); the work happens in __torch_dispatch__.
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        requires_grad: bool = False,
    ) -> Int8Weight:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            codes.shape,
            strides=codes.stride(),
            dtype=dtype,
            device=codes.device,
            requires_grad=requires_grad,
        )

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        requires_grad: bool = False,
    ) -> None:
        groups = -(-codes.numel() // group_size)
        if codes.dtype != torch.int8 or not codes.is_contiguous():
            raise ValueError(f"Int8Weight: codes must be contiguous torch.int8, got {codes.dtype}")
        if not dtype.is_floating_point:
            raise ValueError(f"Int8Weight: dtype must be floating, got {dtype}")
        if (
            scale.shape != (groups,)
            or zero.shape != (groups,)
            or (scale.dtype != torch.float32 or zero.dtype != torch.float32)
        ):
            raise ValueError(
                f"Int8Weight: {tuple(codes.shape)} codes in groups of {group_size} need float32 "
                f"scale and zero of shape ({groups},), got {tuple(scale.shape)} {scale.dtype} "
                f"and {tuple(zero.shape)} {zero.dtype}"
            )
        self.codes, self.scale, self.zero, self.group_size = codes, scale, zero, group_size

    def dequantized(self) -> torch.Tensor:
        """The float32 weight ``zero + scale·(code + 128)`` per group, a new tensor."""
        return _dequantize_codes(
            _from_int8(self.codes), self.scale, self.zero, self.group_size, self.shape
        )

    def stored_bytes(self) -> int:
        """Bytes this weight holds: codes, scales and zeros (the wrapper holds none)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (
            f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, group_size={self.group_size}, "
            f"requires_grad={self.requires_grad})"
        )

    def _with(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        dtype: torch.dtype | None = None,
    ) -> Int8Weight:
        return Int8Weight(codes, scale, zero, self.group_size, dtype=dtype or self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func is _aten.detach.default:
            (w,) = args
            return w._with(w.codes, w.scale, w.zero)
        if func is _aten.clone.default:
            w = args[0]
            return w._with(w.codes.clone(), w.scale.clone(), w.zero.clone())
        if func is _aten._to_copy.default:
            w = args[0]
            dtype = kwargs.get("dtype") or w.dtype
            if dtype.is_floating_point:
                device = kwargs.get("device") or w.device
                return w._with(w.codes.to(device), w.scale.to(device), w.zero.to(device), dtype)
        if func in _LIKE:
            w = args[0]
            return func(torch.empty(w.shape, dtype=w.dtype, device=w.device), *args[1:], **kwargs)
        if func is _aten.copy_.default and isinstance(args[0], Int8Weight):
            dst, src = args[0], args[1]
            W = src.dequantized() if isinstance(src, Int8Weight) else src
            requantize_(dst, W.expand(dst.shape), stochastic=False)
            return dst
        for position, argument in enumerate(func._schema.arguments):
            value = args[position] if position < len(args) else kwargs.get(argument.name)
            written = argument.alias_info is not None and argument.alias_info.is_write
            if written and isinstance(value, Int8Weight):
                raise RuntimeError(
                    f"{func} would write into an INT8 weight (adarank.quant.Int8Weight), where "
                    "an in-place float update is lost to rounding: update it with "
                    "adarank.quant.requantize_ (stochastic rounding), as adarank's optimizers "
                    "(QGaLoreAdamW, AdaRankAdamW, GaLoreAdamW) do, or copy_ a float weight in"
                )

        def unwrap(x: Any) -> Any:
            return x.dequantized().to(x.dtype) if isinstance(x, Int8Weight) else x

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


@torch.no_grad()
def requantize_(
    p: torch.Tensor,
    W: torch.Tensor,
    *,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> None:
    """Store the float weight ``W`` into the INT8 weight ``p``: ``p ← Q(W)``, in place.

    The write-back of an optimizer step: the optimizer dequantises ``p``
    (``p.dequantized()``), applies its update in float32 and hands the result
    here. Fresh per-group scales and zeros are computed from ``W``; with
    ``stochastic=True`` (Q-GaLore) each code is rounded up with probability equal
    to its fractional part, so ``E[p.dequantized()] = W`` per element, within one
    new scale of it; ``stochastic=False`` rounds to nearest (within half a scale).
    ``generator`` (on ``p``'s device) makes the draws reproducible.

    The codes, scales and zeros are written with ``copy_`` (same tensors), so
    autograd still detects a weight modified while a backward pass needs it.
    """
    if not isinstance(p, Int8Weight):
        raise ValueError(f"requantize_: p must be an Int8Weight, got {type(p).__name__}")
    if tuple(W.shape) != tuple(p.shape):
        raise ValueError(f"requantize_: W has shape {tuple(W.shape)}, the weight {tuple(p.shape)}")
    codes, scale, zero = _quantize_groups(_grouped(W, p.group_size), 8, stochastic, generator)
    p.codes.copy_(_to_int8(codes.reshape(-1)[: W.numel()].view(p.shape)))
    p.scale.copy_(scale)
    p.zero.copy_(zero)


class _Int8LinearFunction(torch.autograd.Function):
    """``y = x Ŵᵀ + b`` with Ŵ dequantised from the codes; ∂L/∂W in the weight's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: ANN001, ANN205
        codes, scale, zero = weight.codes, weight.scale, weight.zero
        W = _dequantize_codes(_from_int8(codes), scale, zero, weight.group_size, codes.shape)
        ctx.group_size = weight.group_size
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        # The codes are saved, not Ŵ: an m×n float copy per layer alive until backward
        # is what INT8 weights avoid. Saving them also lets autograd detect codes
        # rewritten in between (layer-wise mode, a layer called twice per forward).
        ctx.save_for_backward(x, codes, scale, zero)
        return F.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, codes, scale, zero = ctx.saved_tensors
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            W = _dequantize_codes(_from_int8(codes), scale, zero, ctx.group_size, codes.shape)
            grad_x = grad_out @ W.to(grad_out.dtype)
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            # Accumulated in float32 whatever the activations' dtype, then cast.
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
            grad_w = (rows.to(torch.float32).T @ x2).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_w, grad_bias


class Int8Linear(nn.Module):
    """A linear layer whose weight is an ``Int8Weight``: INT8 codes, per-group scales and zeros.

    Storage (``out_features × in_features`` weight, row-major groups of
    ``group_size``): int8 codes (1 byte per weight) plus float32 scales and
    zeros of ``ceil(numel/group_size)`` each, i.e. ``1 + 8/group_size`` bytes per
    weight (1.03 at 256) against 4 for float32. Code ``c`` stands for
    ``zero + scale·(c + 128)``, so round-to-nearest is within ``scale/2`` of the
    float weight (see ``quantize``).

    Forward: dequantises the whole weight to a transient float32 m×n tensor
    (cast to the input dtype), then ``F.linear``; backward dequantises it again
    (nothing m×n is saved between the passes). Extra cost per pass: O(m·n)
    elementwise work and one m×n float temporary.

    Gradient: ``weight`` is an ``nn.Parameter`` that requires grad, and backward
    accumulates a dense ∂L/∂W of the weight's dtype into ``weight.grad`` like
    for any parameter (computed in float32): zero_grad, GradScaler, clipping,
    hooks and parameter filters see it (``Int8Weight``). An optimizer reads
    ``p.grad``, computes the new float weight from ``p.dequantized()`` and stores
    it with ``requantize_`` (stochastic rounding); adarank's optimizers do this.
    ``requires_grad_(False)`` freezes the weight (no gradient is computed).
    ``bias`` is a float parameter of ``dtype``.

    ``state_dict()`` holds ``weight`` (the int8 codes), ``weight_scale`` and
    ``weight_zero`` (float32) and ``bias``: plain tensors, loadable with
    ``torch.load(weights_only=True)``; ``load_state_dict`` copies them into the
    existing weight in place (also under ``assign=True``), so an optimizer's
    state stays attached to the same parameter. ``.to(device)``,
    ``.to(dtype)``/``.half()`` convert the weight in place as well: same Python
    object, codes kept, scales and zeros float32, the weight's (and so its
    gradient's) dtype converted with the bias.

    Limitation: in layer-wise mode (the weight updated inside backward) the
    layer must be called once per forward pass; a second call's backward finds
    its saved codes modified in place and autograd raises.

    Args:
        in_features, out_features, bias: as ``nn.Linear``; the weight starts at
            zero, so build from a trained or initialised layer with ``from_linear``.
        group_size: weights per quantisation group (row-major); Q-GaLore uses 256.
        device: where the tensors live. dtype: the floating dtype of the weight
            (what it stands for, and its gradient's) and of the bias (float32).
    """

    weight: Int8Weight

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
        codes = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        # nn.Parameter of an Int8Weight is that Int8Weight, flagged as a parameter.
        self.weight = cast(
            Int8Weight,
            nn.Parameter(
                Int8Weight(
                    codes,
                    torch.zeros(groups, device=device),
                    torch.zeros(groups, device=device),
                    group_size,
                    dtype=dtype or torch.float32,
                )
            ),
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def weight_scale(self) -> torch.Tensor:
        """The weight's float32 per-group scales (``weight.scale``)."""
        return self.weight.scale

    @property
    def weight_zero(self) -> torch.Tensor:
        """The weight's float32 per-group zeros (``weight.zero``)."""
        return self.weight.zero

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # Converted here, in place, not by nn.Module: its ``.data =`` would change
        # the wrapper's dtype/device but keep the old codes, scales and zeros.
        weight = self._parameters["weight"]
        self._parameters["weight"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        with torch.no_grad():
            converted = fn(weight)
        if converted is not weight:
            if not isinstance(converted, Int8Weight):
                raise ValueError(
                    f"Int8Linear: this conversion turns the INT8 weight into a "
                    f"{type(converted).__name__} of {converted.dtype}; only device and "
                    "floating-dtype conversions are supported"
                )
            grad = weight.grad
            weight.grad = None  # a reference to it would block the swap
            converted = nn.Parameter(converted, requires_grad=weight.requires_grad)
            torch.utils.swap_tensors(weight, converted)  # same Python object, new contents
            if grad is not None:
                with torch.no_grad():
                    weight.grad = fn(grad)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self.weight
        destination[prefix + "weight"] = w.codes
        destination[prefix + "weight_scale"] = w.scale
        destination[prefix + "weight_zero"] = w.zero

    def _load_from_state_dict(  # noqa: ANN001
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        weight = self.weight
        self._parameters["weight"] = None  # nn.Module loads the bias; the weight is ours
        try:
            super()._load_from_state_dict(
                state_dict,
                prefix,
                local_metadata,
                strict,
                missing_keys,
                unexpected_keys,
                error_msgs,
            )
        finally:
            self._parameters["weight"] = weight  # type: ignore[assignment]
        keys = {name: prefix + name for name in ("weight", "weight_scale", "weight_zero")}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in keys.values()]
        absent = [key for key in keys.values() if key not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        codes, scale, zero = (
            state_dict[keys[n]] for n in ("weight", "weight_scale", "weight_zero")
        )
        if (
            codes.dtype != torch.int8
            or codes.shape != weight.shape
            or (scale.shape != weight.scale.shape or zero.shape != weight.zero.shape)
        ):
            error_msgs.append(
                f"{prefix}weight: an Int8Linear needs int8 codes of shape {tuple(weight.shape)} "
                f"and {weight.scale.numel()} scales and zeros; the checkpoint has "
                f"{codes.dtype} codes of shape {tuple(codes.shape)}, {scale.numel()} scales, "
                f"{zero.numel()} zeros (a float nn.Linear weight? quantise it with "
                "Int8Linear.from_linear)"
            )
            return
        with torch.no_grad():
            weight.codes.copy_(codes)
            weight.scale.copy_(scale)
            weight.zero.copy_(zero)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 256,
        *,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
    ) -> Int8Linear:
        """An ``Int8Linear`` holding ``linear``'s weight quantised (nearest rounding by
        default) and a copy of its bias, on the same device; the weight stands for
        ``linear.weight``'s dtype and requires grad as it does."""
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=group_size,
            device=weight.device,
            dtype=weight.dtype,
        )
        module.set_weight_(weight, stochastic=stochastic, generator=generator)
        module.weight.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            with torch.no_grad():
                module.bias.data = linear.bias.detach().clone()
            module.bias.requires_grad_(linear.bias.requires_grad)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses, float32 ``out_features × in_features``."""
        return self.weight.dequantized()

    def set_weight_(
        self,
        W: torch.Tensor,
        *,
        stochastic: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        """Re-quantise the layer to ``W`` (float, ``out_features × in_features``) with
        fresh group scales, in place (``requantize_``)."""
        if tuple(W.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"Int8Linear.set_weight_: W has shape {tuple(W.shape)}, the layer "
                f"{tuple(self.weight.shape)}"
            )
        requantize_(self.weight, W, stochastic=stochastic, generator=generator)

    def apply_update_(
        self,
        delta: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
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
        requantize_(self.weight, W, stochastic=stochastic, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8LinearFunction.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}"
        )


def quantize_linears(
    model: nn.Module,
    *,
    exclude: Iterable[str] = ("embed", "lm_head"),
    group_size: int = 256,
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
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and name
        and module.weight.requires_grad
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
