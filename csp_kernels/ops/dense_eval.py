"""The partial dense block's inference forward (see `ops.dense` for the layout): BN1 per
layer applied on conv1's load, BN2 folded into conv1 (bias + ReLU epilogue), every transition's
BN folded into its conv (`fold_eval_params`), the concat buffer becoming the output where the
layout allows (always with fusion NO_TRANSITION, a whole DenseBlock). In float16/bfloat16 a BN
is not folded into the weight (`folds_into_weight`): its float32 scale is applied to the conv's
output with the shift, before rounding. Where conv2 runs by Winograd: `ops.routing`. Module:
csp_kernels.nn.PartialDenseBlock / DenseBlock in eval; tests: tests/test_partial_dense_block.py."""
from __future__ import annotations

import dataclasses

import torch

from . import routing
from .batch_norm_act import bn_scale_shift, stats_dtype
from .conv import conv3x3_into, eval_fold, folds_into_weight
from .conv1x1 import conv1x1_fused
from .conv3x3 import winograd_weight
from .dense import (DENSE_ACT, DENSE_PARAMS_PER_LAYER, NO_TRANSITION, Geometry, layer_params, new_buffer,
                    transition_params_of)


@dataclasses.dataclass
class EvalParams:
    """Per layer: BN1 as (scale, shift), conv1 with BN2 folded in (weight, bias, scale), conv2
    weight and, where conv2 runs by Winograd, its transform; per transition: conv with its BN
    folded in (weight, bias, scale). Each scale is None where BN is folded into the weight, else
    BN's scale for the conv's output (`ops.conv.eval_fold`)."""
    norm1: list[tuple[torch.Tensor, torch.Tensor]]
    conv1: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    conv2: list[torch.Tensor]
    transitions: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    conv2_winograd: list[torch.Tensor | None]


@torch.no_grad()
def fold_eval_params(dense_params, dense_running, transition_params, transition_running, eps,
                     dtype: torch.dtype) -> EvalParams:
    """dense_running: per layer (norm1 running mean, var, norm2 running mean, var);
    transition_running: per transition (running mean, var); dtype: the data's (the parameters'
    own, or autocast's)."""
    sdtype, folded = stats_dtype(dtype), folds_into_weight(dtype)
    norm1, conv1, conv2 = [], [], []
    for j in range(len(dense_params) // DENSE_PARAMS_PER_LAYER):
        norm1_w, norm1_b, conv1_w, norm2_w, norm2_b, conv2_w = layer_params(dense_params, j)
        rm1, rv1, rm2, rv2 = dense_running[j]
        scale1, shift1 = bn_scale_shift(rm1.to(sdtype), rv1.to(sdtype), norm1_w, norm1_b, eps)
        norm1.append((scale1.to(sdtype), shift1.to(sdtype)))
        conv1.append(eval_fold(conv1_w, norm2_w, norm2_b, rm2, rv2, eps, dtype, folded))
        conv2.append(conv2_w.detach().to(dtype))
    transitions = [eval_fold(*transition_params_of(transition_params, i), *running, eps, dtype, folded)
                   for i, running in enumerate(transition_running)]
    conv2_winograd = [winograd_weight(w) if routing.winograd_usable(w) else None for w in conv2]
    return EvalParams(norm1, conv1, conv2, transitions, conv2_winograd)


@torch.no_grad()
def partial_dense_block_eval(x: torch.Tensor, params: EvalParams, part1: int, fusion: str, act: str,
                             engine: str) -> torch.Tensor:
    """Inference forward with folded parameters (`fold_eval_params`).

    x: (batch, in_channels, height, width) -> (batch, out_channels, height, width); with fusion
    NO_TRANSITION (part1 = 0, no transitions) the concat buffer, out_channels = in_channels +
    num_layers * growth.

    Buffers. Where the 1x1 GEMM can write over its input (the CPU GEMM:
    `routing.conv1x1_writes_over_input`) and the output has at least as many channels as the
    concat buffer (the usual CSP stage, where the last transition keeps the width), the concat
    buffer is allocated with the output's channel count and becomes the output: the last
    transition writes it over its own input (sample n's output overwrites only sample n's
    inputs). With fusion "csp" the first transition also runs in place, over the dense part, so
    that the buffer then holds the second transition's input [part 1, transition1(dense)]. Why:
    besides the copies, every large fresh allocation costs page faults on its first write, which
    this saves for all but one buffer.
    The other engines (Triton, CUDA's passes) run each transition as one batched call into a
    separate tensor: "last" and "first" into a new output; "csp" its first transition into a
    new [part 1, transition1(dense)], after which the concat buffer, no longer read, takes the
    second's output where it is wide enough.
    """
    n, _, h, w = x.shape
    g = Geometry(n, h, w, part1, x.shape[1] - part1, params.conv2[0].shape[0], params.conv1[0][0].shape[0],
                 len(params.conv2))
    if fusion == NO_TRANSITION:
        buf = new_buffer(x, g)
        _dense_layers_eval(buf, params, g, engine)
        return buf
    channels = part1 + g.dense_channels
    last_weight, last_bias, last_scale = params.transitions[-1]
    out_channels = last_weight.shape[0] + (part1 if fusion == "last" else 0)
    # (every transition unscaled: BN's scale on the output, 16-bit data or a fold not finite, needs another kernel)
    in_place = routing.conv1x1_writes_over_input(x, engine, scaled=any(t[2] is not None for t in params.transitions))
    # Whether the concat buffer may become the output: written in place, or with "csp" after the
    # first transition moved the last one's input out of it.
    store_takes_output = in_place or fusion == "csp"
    store = new_buffer(x, g, max(channels, out_channels) if store_takes_output else channels)
    buf = store[:, :channels]
    dense = buf[:, part1:]
    _dense_layers_eval(dense, params, g, engine)

    inp = dense if fusion == "last" else buf
    if fusion == "csp":
        first_weight, first_bias, first_scale = params.transitions[0]
        if not in_place:
            inp = x.new_empty(n, channels, h, w)  # [part 1, transition1(dense)]
            inp[:, :part1].copy_(buf[:, :part1])
        conv1x1_fused(dense, first_weight, bias=first_bias, scale=first_scale, act=act, out=inp[:, part1:],
                      engine=engine, in_place=in_place)
    if out_channels < channels or not store_takes_output:
        out = x.new_empty(n, out_channels, h, w)
        if fusion == "last":
            out[:, :part1].copy_(buf[:, :part1])
        conv1x1_fused(inp, last_weight, bias=last_bias, scale=last_scale, act=act,
                      out=out[:, part1:] if fusion == "last" else out, engine=engine)
        return out
    conv1x1_fused(inp, last_weight, bias=last_bias, scale=last_scale, act=act,
                  out=store[:, part1:] if fusion == "last" else store, engine=engine, in_place=in_place)
    return store


def _dense_layers_eval(dense: torch.Tensor, params: EvalParams, g: Geometry, engine: str) -> None:
    """Runs the dense layers in place: dense (batch, t, height, width), the buffer's dense part
    with part 2 filled in; layer j reads its first c_j channels and writes the next growth."""
    bottleneck = g.view(g.scratch(dense, g.bottleneck), g.bottleneck)  # one for all layers: fewer page faults
    for j in range(g.num_layers):
        c = g.prefix(j)
        conv1_w, conv1_b, conv1_s = params.conv1[j]
        scale1, shift1 = params.norm1[j]
        z = conv1x1_fused(dense[:, :c], conv1_w, in_scale=scale1, in_shift=shift1, in_act=DENSE_ACT, bias=conv1_b,
                          scale=conv1_s, act=DENSE_ACT, out=bottleneck, engine=engine)
        new = dense[:, c: c + g.growth]
        conv3x3_into(z, params.conv2[j], new, params.conv2_winograd[j])
