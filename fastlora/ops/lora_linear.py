"""``fastlora.lora_linear``: input checks, autocast, the autograd Function and backend dispatch."""

from __future__ import annotations

import numbers

import torch

from fastlora import _backend, reference

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SEED_HIGH = 2**62


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def validate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    fan_in_fan_out: bool,
) -> None:
    """Raise ValueError / TypeError naming the offending argument, with shapes and dtypes."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _check_tensor(name, t)
    if bias is not None:
        _check_tensor("bias", bias)
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension (..., in_features), got {_describe(x)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got {_describe(weight)}")
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"lora_A and lora_B must be 2-D, got lora_A {_describe(lora_A)}, lora_B {_describe(lora_B)}")
    out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
    layout = "(in_features, out_features) since fan_in_fan_out=True" if fan_in_fan_out else "(out_features, in_features)"
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must equal in_features ({in_features}); "
            f"x {_describe(x)}, weight {_describe(weight)} laid out as {layout}"
        )
    rank = lora_A.shape[0]
    if rank < 1:
        raise ValueError(f"lora_A must have rank r >= 1 rows, got {_describe(lora_A)}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must have shape (r, in_features={in_features}), got {_describe(lora_A)}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(
            f"lora_B must have shape (out_features={out_features}, r={rank}), got {_describe(lora_B)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape (out_features={out_features},), got {_describe(bias)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype; x {_describe(x)}, weight {_describe(weight)}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias must have x's dtype; x {_describe(x)}, bias {_describe(bias)}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must share a dtype; lora_A {_describe(lora_A)}, lora_B {_describe(lora_B)}")
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"lora_A / lora_B must be in x's dtype ({x.dtype}) or float32, got {lora_A.dtype}"
        )
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
    if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a real number (a Python or numpy float), got {type(scaling).__name__}")
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _python_ops_module(backend: str, family: str):
    """The module holding the ``forward`` / ``backward`` of a Python backend's op family
    (imported with plain import statements, which torch.compile traces)."""
    if backend == "triton":
        from fastlora.ops import mixed_triton, triton_ops

        return triton_ops if family == "lora" else mixed_triton
    from fastlora.ops import mixed_torch, torch_ops

    return torch_ops if family == "lora" else mixed_torch


def backend_ops(backend: str, x: torch.Tensor, family: str = "lora") -> tuple[object, object]:
    """The backend's forward and backward of an op family (``lora``: ``fastlora::lora_fwd_<backend>``
    / ``lora_bwd_<backend>``; ``mixed_lora``: mixed batches): the registered ``torch.library``
    ops while torch.compile (or any tracer) sees them, the same Python functions called
    directly in eager mode, where a round trip through the dispatcher only costs host time."""
    eager = type(x) is torch.Tensor and not torch.compiler.is_compiling()
    if backend == "cpp":
        from fastlora.ops import cpp_ops

        cpp_ops.load()
    else:
        module = _python_ops_module(backend, family)
        if eager:
            return module.forward, module.backward
    namespace = torch.ops.fastlora
    return getattr(namespace, f"{family}_fwd_{backend}"), getattr(namespace, f"{family}_bwd_{backend}")


# what a Triton piece that cannot run here raises: the launcher's error, or a failed import
TRITON_PIECE_ERRORS = (_backend.TritonPieceError, ImportError)


def run_with_fallback(run, backend: str, op: str, device: torch.device, M: int, r: int) -> torch.Tensor:
    """``run(backend)`` (a function of the backend name giving the op's output). When ``auto``
    chose Triton and a Triton piece cannot run on this device, the op's shape class moves to the
    torch path for the rest of the process (one warning, ``_backend.triton_failed``) and
    ``run("torch")`` gives the result; a forced ``triton`` backend raises."""
    if not _backend.auto_chose_triton(backend):
        return run(backend)
    try:
        return run(backend)
    except TRITON_PIECE_ERRORS as error:
        _backend.triton_failed(op, device, M, r, error)
        return run("torch")


def remember_backend(ctx, backend: str, op: str, M: int, r: int) -> None:
    """``ctx.backend``, and ``ctx.fallback`` = (op, M, r) when ``auto`` chose Triton (a backward
    that cannot run there then runs torch's, see ``backward_op_for``), else None."""
    ctx.backend = backend
    ctx.fallback = (op, M, r) if _backend.auto_chose_triton(backend) else None


def backward_op_for(ctx, dy: torch.Tensor, family: str = "lora"):
    """The backward op of ``ctx.backend``; where ``auto`` chose Triton, one that runs the torch
    backend's backward on the same saved tensors (the keep bits are the same on every backend)
    if a Triton piece cannot run, moving the op's shape class to torch (``_backend.triton_failed``)."""
    _, backward_op = backend_ops(ctx.backend, dy, family)
    if ctx.fallback is None:
        return backward_op

    op, M, r = ctx.fallback

    def backward_or_torch(*args, **kwargs):
        try:
            return backward_op(*args, **kwargs)
        except TRITON_PIECE_ERRORS as error:
            _backend.triton_failed(op, dy.device, M, r, error)
            return backend_ops("torch", dy, family)[1](*args, **kwargs)

    return backward_or_torch


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * drop(x) A^T B^T with a frozen W.

    Shapes: x (M, K), W (N, K), b (N,), A (r, K), B (N, r), dy (M, N); drop(x) = x * m / (1 - p)
    for a keep-mask m drawn from ``seed``. With S = drop(x) A^T (M, r),
    saved in float32 by the forward, and G = dy B (M, r):

      dy/dx:  y = x W^T + s * (x * m / (1-p)) A^T B^T
              => dx = dy W + s * (dy B A) * m / (1-p) = dy W + s * (G A) * m / (1-p)
      dy/dA:  y depends on A through s * drop(x) A^T B^T
              => dA = s * B^T dy^T drop(x) = s * G^T drop(x)            (r, K)
      dy/dB:  y depends on B through s * S B^T
              => dB = s * dy^T S                                       (N, r)
      db   =  sum over rows of dy                                       (N,)
      dW   is never computed: the base weight is frozen.

    Saved for backward: x, W, A, B (all already alive), S (M x r) and, with dropout, the
    keep-mask as bits (M x K / 8 bytes) and the seed it was drawn from (None on torch).

    Double backward (``create_graph=True``): the same formulas run as differentiable torch
    ops on every backend, with S recomputed from x and A (the saved S carries no graph), so
    second-order gradients flow to dy, x, A and B.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out, backend):
        forward_op, _ = backend_ops(backend, x)
        y, S, keep_bits = forward_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out)
        ctx.save_for_backward(x, weight, lora_A, lora_B, S, keep_bits, seed)
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.fan_in_fan_out = fan_in_fan_out
        remember_backend(ctx, backend, "lora_linear", x.shape[0], lora_A.shape[0])
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, S, keep_bits, seed = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable torch ops
            from fastlora.ops import torch_ops

            backward_op = torch_ops.backward
            S = torch_ops.recompute_S(x, lora_A, keep_bits, ctx.dropout_p)
        else:
            backward_op = backward_op_for(ctx, dy)
        return input_gradients(ctx, backward_op, dy, x, weight, lora_A, lora_B, S, keep_bits, seed,
                               ctx.fan_in_fan_out, trailing=5)


def input_gradients(ctx, backward_op, dy, x, weight, lora_A, lora_B, S, keep_bits, seed, fan_in_fan_out: bool,
                    trailing: int) -> tuple:
    """A LoRA-style Function's backward result for its inputs (x, weight, bias, lora_A, lora_B,
    then ``trailing`` non-tensor arguments): the backend's backward run for the gradients
    ``ctx.needs_input_grad`` asks for, None for the rest (never one for the weight)."""
    needs_dx, _, needs_dbias, needs_dA, needs_dB = ctx.needs_input_grad[:5]
    needs_dbias = needs_dbias and ctx.has_bias
    dx, dA, dB, dbias = backward_op(
        dy, x, weight, lora_A, lora_B, S, keep_bits, ctx.scaling, ctx.dropout_p, seed, fan_in_fan_out,
        needs_dx, needs_dA, needs_dB, needs_dbias,
    )
    return (
        dx if needs_dx else None,
        None,
        dbias if needs_dbias else None,
        dA if needs_dA else None,
        dB if needs_dB else None,
        *([None] * trailing),
    )


def frozen_flat_parameter_view(weight: torch.Tensor) -> bool:
    """True when ``weight`` is FSDP1's view (``use_orig_params=True``) of a frozen parameter
    inside a flat parameter: the view requires grad because the adapters sharing that flat
    parameter do, but the parameter it stands for does not, so the op treats it as frozen.
    Read from the flat parameter's own records (``_params``, ``_numels``, ``_is_padding_mask``);
    anything else (a different FSDP layout included) is not such a view."""
    base = weight._base
    params = getattr(base, "_params", None)
    numels = getattr(base, "_numels", None)
    padding = getattr(base, "_is_padding_mask", None)
    if params is None or numels is None or padding is None:
        return False
    offset = weight.storage_offset() - base.storage_offset()
    position, index = 0, 0
    for numel, is_padding in zip(numels, padding):
        if not is_padding:
            if position == offset and index < len(params):
                return not params[index].requires_grad
            index += 1
        position += numel
    return False


def plain_autograd_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why this call must run the reference math in plain autograd, or None.

    The fused op (every backend's) takes a frozen weight in float16 / bfloat16 / float32 and
    plain tensors; loralib code that trains W too, float64 models (``model.double()``,
    ``gradcheck``) and torch.func transforms (``vmap``, ``grad``) run the reference math, which
    autograd and torch.func differentiate and batch like any torch code.
    """
    if x.dtype == torch.float64:
        return "float64 tensors"
    if weight.requires_grad and torch.is_grad_enabled():
        return "a weight that requires grad (the fused op never computes dW)"
    if torch._C._are_functorch_transforms_active():
        return "a torch.func transform (vmap / grad / jacrev)"
    return None


# the autograd nodes that keep a dropout mask: the position of the keep bits among their
# saved tensors (x is the first); the QLoRA node saves no weight
KEEP_MASK_NODES = {"LoRALinearFunctionBackward": 5, "DoRALinearFunctionBackward": 5, "QLoRALinearFunctionBackward": 4}


def saved_keep_mask(y: torch.Tensor) -> torch.Tensor:
    """The dropout keep-mask (M, K) bool that the ``lora_linear`` (``dora_linear``, ``qlora_linear``) call which returned ``y`` drew
    (M = rows of its flattened x), read from the keep bits its autograd node saved for the
    backward. For tests and reports; call it before ``y.backward`` frees what was saved."""
    from fastlora.ops.torch_ops import unpack_keep_bits

    node = y.grad_fn
    while node is not None and type(node).__name__ not in KEEP_MASK_NODES:
        node = node.next_functions[0][0] if node.next_functions else None
    if node is None:
        raise ValueError("y was not made by a fused lora_linear / dora_linear / qlora_linear call that records a backward")
    saved = node.saved_tensors
    return unpack_keep_bits(saved[KEEP_MASK_NODES[type(node).__name__]], saved[0].shape[1])


def _flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) as (M, K), a view whenever the leading dimensions allow one."""
    if x.dim() == 2:
        return x
    return x.reshape(-1, x.shape[-1])


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """Fused LoRA linear: ``y = x W^T + b + scaling * dropout(x) A^T B^T``.

    Shapes: x (..., K); weight (N, K), or (K, N) when ``fan_in_fan_out``; bias (N,) or None;
    lora_A (r, K); lora_B (N, r). Returns (..., N) in x's dtype. Dropout (rate ``dropout_p``,
    only when ``training``) applies to the LoRA input only; its mask comes from torch's
    generator (directly, or through a seed drawn from it), so ``torch.manual_seed`` reproduces
    it. Gradients flow to x, bias, lora_A and lora_B; the frozen ``weight`` gets none.
    Under ``torch.autocast`` all inputs are cast to the autocast dtype, as ``nn.Linear`` does.
    A weight that requires grad, float64 tensors and torch.func transforms run the reference
    math in plain autograd (``plain_autograd_reason``) under ``auto`` and ``torch``; a forced
    ``triton`` / ``cpp`` backend raises for them.
    """
    return run_fused(LoRALinearFunction, reference.lora_linear, x, weight, bias, lora_A, lora_B, (),
                     scaling, dropout_p, training, fan_in_fan_out)


def run_fused(
    function: type[torch.autograd.Function],
    reference_fn,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    adapter_extras: tuple,
    scaling: float,
    dropout_p: float,
    training: bool,
    fan_in_fan_out: bool,
    validate_extras=None,
) -> torch.Tensor:
    """The path every fused op takes (``lora_linear``, ``dora_linear``): autocast casts, checks,
    the plain-autograd fallback (``reference_fn``), dropout's seed, backend choice, then
    ``function.apply(x (M, K), weight, bias, lora_A, lora_B, *adapter_extras, scaling,
    dropout_p, seed, fan_in_fan_out, backend)`` below autocast, reshaped to (..., N).

    ``adapter_extras``: the op's further adapter tensors (DoRA's magnitude), cast like the
    adapters under autocast and checked by ``validate_extras(x, lora_A, lora_B, *extras)``.
    """
    _check_tensor("x", x)
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, weight, lora_A, lora_B = x.to(dtype), weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        adapter_extras = tuple(t.to(dtype) if isinstance(t, torch.Tensor) else t for t in adapter_extras)
    validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)
    if validate_extras is not None:
        validate_extras(x, lora_A, lora_B, *adapter_extras)
    if weight.requires_grad and weight._base is not None and frozen_flat_parameter_view(weight):
        weight = weight.detach()
    plain_reason = plain_autograd_reason(x, weight)
    if plain_reason is not None:
        forced = _backend.current_backend()
        if forced in ("triton", "cpp"):
            raise RuntimeError(f"fastlora backend {forced!r} cannot run {plain_reason}; use 'torch' or 'auto'")
        return reference_fn(x, weight, bias, lora_A, lora_B, *adapter_extras, float(scaling), float(dropout_p),
                            training, fan_in_fan_out)
    dropout_p = float(dropout_p) if training else 0.0
    if bias is not None and not bias.is_contiguous():  # the kernels read bias as a dense (N,) vector
        bias = bias.contiguous()
    rows = _flatten_rows(x)
    op = reference_fn.__name__  # the public op's name (reference.lora_linear / dora_linear)
    backend = _backend.resolve(x.device, rows.shape[0], lora_A.shape[0], op)

    def run(backend: str) -> torch.Tensor:
        return apply_below_autocast(function, dtype is not None, x.device.type, rows, weight, bias, lora_A, lora_B,
                                    *adapter_extras, float(scaling), dropout_p,
                                    dropout_seed(dropout_p, backend, x.device), fan_in_fan_out, backend)

    y = run_with_fallback(run, backend, op, x.device, rows.shape[0], lora_A.shape[0])
    return y.reshape(*x.shape[:-1], y.shape[-1])


# The device types that have an autocast state, asked once at import: torch 2.11's Dynamo cannot
# trace torch.amp.is_autocast_available (a builtin), and a type without one (meta, lazy) makes
# torch.is_autocast_enabled raise.
AUTOCAST_DEVICE_TYPES = frozenset(
    device_type for device_type in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "maia", "privateuseone")
    if torch.amp.is_autocast_available(device_type)
)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype torch.autocast casts x's device's matmuls to, or None outside autocast."""
    if x.device.type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def apply_below_autocast(function: type[torch.autograd.Function], autocast: bool, device_type: str, *args):
    """``function.apply(*args)``, with autocast off when it was on: the inputs are cast already."""
    if autocast:
        with torch.autocast(device_type, enabled=False):
            return function.apply(*args)
    return function.apply(*args)


def dropout_seed(dropout_p: float, backend: str, device: torch.device) -> torch.Tensor | None:
    """The (1,) int64 seed a dropout mask is drawn from, drawn from torch's generator on the
    device (no sync); None without dropout or on the torch backend, which draws its mask from
    torch's generator directly."""
    if dropout_p > 0.0 and backend != "torch":
        return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)
    return None
