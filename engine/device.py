"""The device a model runs on: `cpu` (default), `cuda` or `cuda:N`, checked once, up front.

Weights, the KV pool and every op of a forward live on this device; a device that this process
cannot use is one clear error before any weight is read. Importing this module does not import
torch (the topology checks device names without it).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ruyiflow.engine.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def check_device_name(name: str) -> str:
    """The name if it is `cpu`, `cuda` or `cuda:N` (no CUDA needed to check), else a ValueError."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"device {name!r}: expected cpu, cuda or cuda:N")
    return name


def resolve_device(name: str | torch.device = "cpu") -> torch.device:
    """`name` as a torch.device this process can use; ModelLoadError saying why not."""
    import torch

    text = str(name)
    try:
        check_device_name(text)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    device = torch.device(text)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        build = torch.version.cuda
        why = (
            f"this PyTorch ({torch.__version__}) is a CPU-only build"
            if build is None
            else f"no CUDA device is visible (PyTorch built for CUDA {build})"
        )
        raise ModelLoadError(f"device {text!r} asked, but {why}; use --device cpu")
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise ModelLoadError(f"device {text!r} asked, but this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def free_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device right now."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return int(free)
