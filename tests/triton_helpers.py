"""Triton test kernels shared by test files; import only where Triton is usable (on a GPU, or
with TRITON_INTERPRET=1, which tests/conftest.py sets before triton is imported)."""
import torch
import triton
import triton.language as tl

from csp_kernels.triton.activation import act_constexprs, act_forward, act_grad


@triton.jit
def _act_kernel(u_ptr, g_ptr, y_ptr, d_ptr, n, ACT: tl.constexpr, SLOPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    u = tl.load(u_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, act_forward(u, ACT, SLOPE), mask=mask)
    tl.store(d_ptr + offs, act_grad(tl.load(g_ptr + offs, mask=mask), u, ACT, SLOPE), mask=mask)


def triton_act(u: torch.Tensor, act: str, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(u), dy * act'(u)) by the Triton helpers `act_forward` / `act_grad`, for 1-D u and dy."""
    y, d = torch.empty_like(u), torch.empty_like(u)
    _act_kernel[(1,)](u, dy, y, d, u.numel(), **act_constexprs(act), BLOCK=triton.next_power_of_2(u.numel()))
    return y, d
