"""Pick the Triton kernel or the torch reference for each call; import Triton only when needed.

`use_triton(t)` is the one switch. `RUYIFLOW_KERNELS` selects the mode:

- `auto` (default): Triton for CUDA tensors when Triton imports, the reference elsewhere;
- `triton`: as `auto`, and also Triton on CPU tensors when `TRITON_INTERPRET=1` (how tests run
  the kernels on a machine without a GPU);
- `reference`: the torch reference everywhere.

Triton is imported on the first launch, never by `import kernels`: a CPU process never pays for
it, a missing or broken Triton only disables the Triton path, and `TRITON_INTERPRET` needs to be
set only before the first launch. (Triton decides interpreter-or-compiler when it is imported:
its own library functions such as `tl.max` are decorated then, so one process cannot switch.)
Kernels are therefore written with `@triton_jit`, which applies `triton.jit` on first launch and
binds the module global `tl` of the kernel's module to `triton.language`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

MODES = ("auto", "triton", "reference")


def kernel_mode() -> str:
    """The mode named by `RUYIFLOW_KERNELS` (read on every call so tests can switch it)."""
    mode = os.environ.get("RUYIFLOW_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"RUYIFLOW_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def is_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


@functools.cache
def has_triton() -> bool:
    """Whether `import triton` succeeds (tried once, on first need)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # not installed, or a wheel that fails at import: references serve all
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether the op on `t` should launch its Triton kernel rather than the torch reference."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if not t.is_cuda and not (mode == "triton" and is_interpreting()):
        return False
    return has_triton()


def check_launchable(name: str, *tensors: torch.Tensor) -> None:
    """Raise ValueError unless Triton imports and `tensors` share a device a kernel can use."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{name}: tensors on different devices ({device} and {t.device})")
    if device.type != "cuda" and not is_interpreting():
        raise ValueError(
            f"{name}: tensors on {device} need a CUDA device (or TRITON_INTERPRET=1 for the CPU "
            "interpreter)"
        )
    if not has_triton():
        raise ValueError(f"{name}: triton is not importable here; use {name}_reference")


class TritonKernel:
    """A kernel function that becomes a `triton.jit` kernel on first launch: `kernel[grid](...)`."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return self.jitted()[grid]

    def jitted(self) -> Any:
        """The `JITFunction` (or `InterpretedFunction` under `TRITON_INTERPRET=1`)."""
        return _jit(self.fn, is_interpreting())


def triton_jit(fn: Callable[..., None]) -> TritonKernel:
    """`@triton.jit`, deferred to the first launch (see module docstring)."""
    return TritonKernel(fn)


@functools.cache
def _jit(fn: Callable[..., None], interpret: bool) -> Any:
    import triton
    import triton.language
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(triton.language.cdiv, InterpretedFunction) != interpret:
        raise RuntimeError(
            f"triton was imported with TRITON_INTERPRET {'unset' if interpret else '=1'} and "
            "cannot switch mode in this process; set TRITON_INTERPRET before the first launch"
        )
    fn.__globals__["tl"] = triton.language
    return InterpretedFunction(fn) if interpret else JITFunction(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether `tl.dot` operands of `dtype` must be cast to float32 first.

    Triton 3.9's interpreter keeps bfloat16 blocks as raw uint16 and `np.matmul`s the bit
    patterns (create_dot in triton/runtime/interpreter.py), so bf16 dots give garbage there.
    Compiled kernels keep bf16 operands for the tensor cores.
    """
    return dtype == torch.bfloat16 and is_interpreting()
