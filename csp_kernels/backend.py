"""Backend selection: which implementation runs a fused op.

Backends:
  "auto"       default: CUDA tensors -> "triton" for GEMM-shaped work and CUDA C++ for the rest;
               CPU tensors -> "cpu" (C++ kernels + ATen's oneDNN convolutions).
  "triton"     Triton kernels for GEMM-shaped work (on CPU only under TRITON_INTERPRET=1),
               the compiled extension for memory-bound work.
  "cuda"       CUDA C++ kernels + cuDNN convolutions, no Triton.
  "cpu"        C++ CPU kernels + ATen convolutions.
  "reference"  the plain-PyTorch modules of `csp_kernels.reference`.

Select with `use_backend("cpu")` (a context manager) or the environment variable
CSP_KERNELS_BACKEND. Asking for a backend that cannot run raises `BackendUnavailable` with the
reason; "auto" never raises: without the compiled extension it runs the reference and warns once.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.modules.module as _module_hooks

from . import extension

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
ENV_VAR = "CSP_KERNELS_BACKEND"

_state = threading.local()
_warned_fallback = False


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine or for this device."""


class ReferenceFallbackWarning(UserWarning):
    """A fused module ran the plain-PyTorch reference (slower, more memory) for a configuration
    or a mode its kernels do not cover. Filter it with `warnings.simplefilter("ignore",
    csp_kernels.ReferenceFallbackWarning)` where that is intended."""


def transform_reason() -> str:
    """Why a fused op must not run under the autograd transform now active, or "": a torch.func
    transform (the fused ops have no functorch rules: vmap's batching, grad's autograd.Function
    setup) or forward-mode AD (`torch.autograd.forward_ad.dual_level`: they have no jvp, and
    their outputs would carry no tangent)."""
    if torch.compiler.is_compiling():
        return ""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform (grad, vmap, jacrev, ...) is active; the fused ops have no functorch rules"
    if _forward_ad._current_level >= 0:
        return "forward-mode AD (torch.autograd.forward_ad.dual_level) is active; the fused ops have no jvp"
    return ""


def mode_reason() -> str:
    """Why a fused module must run the reference in the process's current mode, or "" when
    nothing forces it: torch.jit.trace (TorchScript cannot hold the fused ops' Python autograd,
    caches and prepacked weights), an autograd transform (`transform_reason`), or a global module hook
    (`torch.nn.modules.module.register_module_forward_hook` and its kin), which expects a call of
    every Conv2d, BatchNorm2d and activation that the fused kernels compute inside one op."""
    if torch.jit.is_tracing():
        return "torch.jit.trace records plain PyTorch ops (torch.export keeps the fused kernels)"
    if reason := transform_reason():
        return reason
    if (_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks
            or _module_hooks._global_backward_hooks or _module_hooks._global_backward_pre_hooks):
        return ("a global module hook is registered (torch.nn.modules.module.register_module_*_hook); the fused "
                "kernels compute conv, BatchNorm and activation without calling those modules")
    return ""


def warn_reference_fallback(module: torch.nn.Module, reason: str) -> None:
    """Warns that `module` runs the reference because of `reason` (Python shows each distinct
    message once per call site). Silent under torch.compile, whose trace it would break."""
    warn_reference_fallback_of(f"csp_kernels.{type(module).__name__}", reason, stacklevel=4)


def warn_reference_fallback_of(what: str, reason: str, stacklevel: int = 3) -> None:
    """`warn_reference_fallback` for `what`, a module class or a function, by name."""
    if not torch.compiler.is_compiling():
        warnings.warn(f"{what} runs the plain-PyTorch reference (slower, more memory): {reason}",
                      ReferenceFallbackWarning, stacklevel=stacklevel)


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}; got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for: the innermost `use_backend`, else $CSP_KERNELS_BACKEND, else "auto"."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1][0]
    name = os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS} or unset; got {name!r}")
    return name


def use_backend(name: str) -> contextlib.AbstractContextManager:
    """Run the fused modules inside the block with backend `name` (in this thread). Blocks
    exited out of order (an ExitStack, generators) each remove their own entry. A bad name
    raises here, at the call, not where the block is entered."""
    return _backend_block(_check_name(name))


@contextlib.contextmanager
def _backend_block(name: str):
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    entry = [name]  # a list of its own: removed by identity
    stack.append(entry)
    try:
        yield
    finally:
        del stack[next(i for i in range(len(stack) - 1, -1, -1) if stack[i] is entry)]


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on tensors of `device`, and why not."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not installed ({err})"
    if device.type == "cuda":
        return True, ""
    if device.type != "cpu":
        return False, f"Triton kernels need a CUDA device or TRITON_INTERPRET=1 for {device.type} tensors"
    interprets, jitted_before = _triton_interprets()
    if interprets:
        return True, ""
    if jitted_before:
        return False, ("TRITON_INTERPRET changed after triton was imported: Triton reads it when it defines a "
                       f"kernel, and {jitted_before} was defined without it; set it before importing triton and "
                       "leave it set")
    return False, ("Triton kernels need a CUDA device or TRITON_INTERPRET=1 for cpu tensors "
                   "(set it before triton is imported)")


def _triton_interprets() -> tuple[bool, str]:
    """(whether Triton runs csp_kernels' kernels through its interpreter, the Triton function
    that was defined compiled although TRITON_INTERPRET is set now, or ""). Triton's @jit
    reads TRITON_INTERPRET ("1", "true", "on", ...) when it defines a function: Triton's own
    library, defined at `import triton`, and csp_kernels' kernels must both be interpreted (an
    interpreted kernel cannot call a compiled function)."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    from .triton import activation
    functions = {"triton.language.sigmoid": standard.sigmoid, "csp_kernels.triton.activation": activation.act_forward}
    compiled = [name for name, fn in functions.items() if not isinstance(fn, InterpretedFunction)]
    if not compiled:
        return True, ""
    mixed = len(compiled) < len(functions)
    return False, compiled[0] if mixed or _interpret_requested() else ""


def _interpret_requested() -> bool:
    """TRITON_INTERPRET as Triton reads it now."""
    from triton import knobs
    return bool(knobs.runtime.interpret)


def why_unavailable(name: str, device: torch.device) -> str:
    """Empty string when backend `name` can run ops on `device`, else the reason it cannot."""
    _check_name(name)
    if name == "reference":
        return ""
    if name == "auto":
        return ""
    ext_reason = extension.why_unavailable(device)
    if name == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs CPU tensors; these are on {device}"
        return ext_reason
    if name == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs CUDA tensors; these are on {device}"
        return ext_reason
    ok, reason = triton_usable(device)
    return ext_reason or reason


def resolve_backend(device: torch.device) -> str:
    """The concrete backend ("triton", "cuda", "cpu" or "reference") for tensors on `device`."""
    global _warned_fallback
    name = requested_backend()
    if name == "auto":
        if device.type == "meta":
            # Shapes only (deferred init, shape inference): the reference computes them, and the
            # extension is not at fault, whatever extension.why_unavailable would say.
            warnings.warn("csp_kernels: tensors on the meta device run the plain-PyTorch reference (shapes "
                          "only; no kernels run there)", ReferenceFallbackWarning, stacklevel=3)
            return "reference"
        if extension.why_unavailable(device):
            if not _warned_fallback:
                _warned_fallback = True
                warnings.warn(
                    "csp_kernels: compiled extension unusable "
                    f"({extension.why_unavailable(device)}); running the plain-PyTorch reference "
                    "(slow path). Rebuild with `pip install --no-build-isolation -e .`.",
                    RuntimeWarning, stacklevel=3)
            return "reference"
        if device.type == "cuda":
            return "triton" if triton_usable(device)[0] else "cuda"
        return "cpu"
    reason = why_unavailable(name, device)
    if reason:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {reason}")
    return name


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The concrete backends that can run on `device` (a torch.device or a device string such
    as "cpu", "cuda:0") on this machine."""
    if not isinstance(device, (torch.device, str)):
        raise TypeError(f"device must be a torch.device or a str such as 'cpu'; got {type(device).__name__} "
                        f"{device!r}")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device must name a device such as 'cpu' or 'cuda:0'; got {device!r} ({error})") from None
    return [b for b in BACKENDS if b != "auto" and not why_unavailable(b, device)]
