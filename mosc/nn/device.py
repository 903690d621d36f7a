"""Where training and evaluation run, and in what arithmetic.

    resolve_device("auto" | "cpu" | "cuda" | "cuda:N")   -> torch.device (auto: CUDA when present)
    Precision                                            fp32 | bf16 | fp16
    Amp(device, precision)                               autocast + loss scaling for one run
    to_device(batch, device)                             a host batch on the device
    rng_states(device) / set_rng_states(...)             the generators dropout draws from

Weights, optimizer state and RNG states always leave the device as CPU tensors (the
checkpoint code's job); this module only says which device and how to compute on it.
Knows nothing of models, data files or training loops.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
from dataclasses import fields

import torch

from mosc.errors import MoscError

DEVICE_SPEC = re.compile(r"(auto|cpu|cuda(:[0-9]{1,4})?)\Z")
CPU_RNG, CUDA_RNG = "__torch_rng__", "__cuda_rng__"  # names of the generator states in a checkpoint


class Precision(str, enum.Enum):
    """The arithmetic of the forward pass; weights, gradients and Adam stay fp32 in all three."""

    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16: fp32's range, no loss scaling needed (CPU and CUDA)
    fp16 = "fp16"  # autocast to float16 with a GradScaler: CUDA only


def check_device_spec(spec) -> str:
    """spec, which must read auto, cpu, cuda or cuda:N (whether it exists is resolve_device's question)."""
    if not isinstance(spec, str) or not DEVICE_SPEC.match(spec):
        raise MoscError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def check_precision(value) -> str:
    """value, which must name a Precision."""
    names = [p.value for p in Precision]
    if value not in names:
        raise MoscError(f"precision must be one of {', '.join(names)}, got {value!r}")
    return value


def cuda_found() -> str:
    """What this machine offers in CUDA, in a few words (for errors and reports)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "no driver or no GPU"
        return f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU ({why})"
    names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(n))
    return f"{n} CUDA device{'s' if n > 1 else ''} ({names})"


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch.device a spec names on this machine. auto: the GPU when torch sees one, else
    the CPU. local_rank (under torchrun): "cuda" and "auto" mean cuda:LOCAL_RANK, so that the
    processes of one machine take one GPU each."""
    check_device_spec(spec)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise MoscError(f"device {spec!r} asked for, but there is no CUDA device here: {cuda_found()}")
    if local_rank is not None and spec.startswith("cuda:"):
        raise MoscError(f"under torchrun each process takes cuda:LOCAL_RANK; pass device cuda or auto, not {spec!r}")
    index = int(spec[5:]) if spec.startswith("cuda:") else (local_rank or 0)
    if index >= torch.cuda.device_count():
        raise MoscError(f"device cuda:{index} does not exist: this machine has {cuda_found()}")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """The device in words: cpu, or cuda:0 (NVIDIA H200)."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def refuse_unsupported(precision: Precision, device: torch.device) -> None:
    """One line when the device cannot compute in this precision."""
    if precision is Precision.fp16 and device.type != "cuda":
        raise MoscError("precision fp16 needs a CUDA device (its loss scaling is a GPU feature); on the CPU use bf16 "
                        "or fp32")
    native_bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    if precision is Precision.bf16 and not native_bf16:  # emulated bf16 is slower than fp32
        raise MoscError(f"{describe(device)} has no native bf16 (Ampere or newer needed); use fp16 or fp32")


class Amp:
    """Mixed precision for one run: the forward under autocast, the loss scaled for fp16.

    fp32 does nothing at all (no autocast context, no scaler), so the fp32 path computes
    exactly what it computed before this class existed."""

    def __init__(self, device: torch.device, precision: str | Precision = Precision.fp32):
        self.device, self.precision = device, Precision(check_precision(getattr(precision, "value", precision)))
        refuse_unsupported(self.precision, device)
        self.dtype = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}.get(self.precision)
        # fp16's 5-bit exponent underflows small gradients: scale the loss up, unscale before the
        # step, skip steps whose gradients overflowed. bf16 has fp32's range and needs none of it.
        self.scaler = torch.amp.GradScaler("cuda") if self.precision is Precision.fp16 else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """True gradients in .grad (before clipping, whose threshold is in true units)."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> bool:
        """opt.step(), or with fp16 the scaler's step; False when it skipped an overflowed step."""
        if self.scaler is None:
            opt.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(opt)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # the scale backs off exactly when inf/nan was found

    def state_dict(self) -> dict | None:
        """The loss scale and its growth counter (JSON), or None without a scaler."""
        if self.scaler is None:
            return None
        return dict(self.scaler.state_dict())  # floats and ints only

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def to_device(batch, device: torch.device):
    """The batch (a dataclass of tensors: mosc.nn.batching.Batch, mosc.nn.mlm.MaskedBatch) on
    the device. On the CPU the very same tensors; on a GPU copied from pinned memory without
    blocking, so the copy overlaps the kernels still queued."""
    if device.type == "cpu":
        return batch
    return type(batch)(*(getattr(batch, f.name).pin_memory().to(device, non_blocking=True) for f in fields(batch)))


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The CPU generator's state and, on a GPU, that device's (dropout draws from it there)."""
    states = {CPU_RNG: torch.get_rng_state()}
    if device.type == "cuda":
        states[CUDA_RNG] = torch.cuda.get_rng_state(device)  # a CPU ByteTensor: loads anywhere
    return states


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device, cuda_seed: int) -> None:
    """Restore what rng_states saved. A CUDA state is used only on a GPU (a CPU-only machine
    ignores it); a GPU resuming a CPU run has none and seeds its generator with cuda_seed."""
    torch.set_rng_state(states[CPU_RNG])
    if device.type == "cuda":
        if CUDA_RNG in states:
            torch.cuda.set_rng_state(states[CUDA_RNG], device)
        else:
            torch.cuda.manual_seed(cuda_seed)
