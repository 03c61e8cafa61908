"""Which kernel runs, for (device, dtype, layout, shape): every routing decision of the fused
ops, each made here once. Op bodies ask these functions and run what they name; adding a
kernel (a CUDA twin of a CPU one, say) is an edit of the function that routes to it.

The engine is an op argument (so that a compiled graph keeps it), from the backend
(`csp_kernels.backend`: "cpu", "cuda", "triton"; "reference" never reaches an op):
`transition_engine`, `dense_engine`.

  piece (op)                    engine  device  dtype      layout / shape              kernel
  1x1 conv with prologue /      aten    CPU     f32, f64   planes contiguous; no       "cpu": csrc/cpu/conv1x1.cpp
    epilogue (`conv1x1_fused`)                             output scale                tiled GEMM
    `conv1x1_kernel`            triton  any     not bf16   any strides                 "triton": triton/conv1x1.py
                                                on CPU                                 (output scale: a pass after)
                                aten    other                                          "bmm": passes around torch.bmm
  1x1 conv + BN + act backward  any     CPU     f32, f64                               "cpu": csrc/cpu/conv1x1.cpp
    `conv1x1_backward_kernel`           other                                          "passes": bn_act_backward + bmm
  1x1 conv over its own input   aten    CPU     f32, f64   no output scale             yes: the CPU tiled GEMM
    (`conv1x1_writes_over_input`)       otherwise                                      no: the caller writes a
                                                                                       separate tensor
  dense conv1 backward          aten    CPU     f32, f64                               "cpu": csrc/cpu/dense.cpp
    (`dense_conv1_backward_     triton  any                                            "triton": triton/
    kernel`)                                                                           conv1x1_backward.py
                                aten    other                                          "passes"
  dense BN1 gradient            triton  any     f16, bf16                              float32 accumulator
    accumulator (dtype,         aten    CUDA    f16, bf16                              float32 accumulator
    `dense_grad_acc_dtype`)             otherwise                                      the data's dtype
  conv, training or eval        aten    CPU     f32, f64   1x1 stride 1, NCHW planes;  "gemm": ops/conv1x1.py
    (`conv_kernel`)                                        f32 where measured faster
                                aten    CPU     f32        3x3 s1 p1 d1, NCHW planes,  "winograd": ops/conv3x3.py
                                                           AVX-512, measured faster
                                                otherwise                              "aten": oneDNN / cuDNN
  training transition conv      triton  any                1x1 (`triton_eligible`)     "triton" (statistics in the
    (`train_conv_kernel`)                                                              epilogue), else `conv_kernel`
  training transition: z saved  CPU     <= 256 MACs per output, and x <= z / 4 owning  recomputed from x in backward
    or recomputed                       its memory; or x rebuilt from a recipe and     by the forward's kernel
    (`recomputed_conv_kernel`)          1x1 with z >= 2x, or grouped with <= 64 MACs
                                        per output; not Triton's
  training transition backward  any     after the "gemm" conv, or "triton" where       csrc conv1x1_bn_act_backward,
    (`backward_runs_as_gemm`)           `runs_as_gemm(training=True)`                  else bn_act_backward +
                                                                                       conv_backward
  conv input gradient           any     as `runs_as_winograd` for grad_z               "winograd"
    (`conv_input_grad_kernel`)  CPU     f32        3x3 stride 2 padding 1, measured    "phases": ops/conv_phases.py
                                                   faster
                                        otherwise                                      "aten"
  conv weight gradient          any     as `runs_winograd_weight_grad`                 Winograd, else ATen
  eval transition conv          triton                     1x1                         "triton" (bias + act epilogue)
    (`eval_conv_kernel`)        aten    as `runs_as_gemm_over_batch`                   "gemm over the batch"
                                aten    as `runs_as_gemm(training=False)`              "gemm" (bias + act epilogue)
                                aten    as `runs_as_winograd(transform_cached=True)`   "winograd" (cached transform)
                                aten    CPU     f32        oneDNN built, measured      "onednn" (act as post-op,
                                                           faster (`onednn_eval_...`)  prepacked weight)
                                                otherwise                              "aten": ATen's conv, BN's
                                                                                       scale in the act pass
  eval conv with BN's scale     triton                                                 Triton GEMM
    (16-bit, or "aten" above:   aten                                                   ATen
    `scaled_eval_conv_kernel`)
  a ConvBNAct's `out=`          triton eval, or the reference path: any strides; else contiguous planes
    (`out_takes_any_strides`)   written in place, other strides by a copy
  dense conv2 3x3, training     any     as `runs_as_winograd` (transform per call)     Winograd into the buffer, else
                                                                                       ATen and a copy
  dense conv2 3x3, eval         any     as `runs_as_winograd(transform_cached=True)`   Winograd into the buffer,
                                                                                       else ATen
  dense block (module level)    cpu     CPU     any        <= SMALL_MAP_PIXELS pixels  plain PyTorch (`eager_is_faster`)
  training stage or ConvBNAct   cpu     CPU     any        <= SMALL_TRAINING_MAP_PIXELS  plain PyTorch
    (module level)                                         pixels, plain BatchNorms    (`training_eager_is_faster`)
  stage without autograd        cpu     CPU     any        <= SMALL_EVAL_STAGE_PIXELS  chunk + cat, units fused
    (module level)                                         pixels                      (`eval_stage_unbuffered_...`)

"Measured faster": `ops.conv_choice` times both candidates once per shape (or an environment
variable pins the choice); the predicates here only ask it. The layout tests are
`ops.batch_norm_act.planes_contiguous` (csrc/plane_layout.h checks the same in C++).
Tests: tests/test_conv_choice.py (the measured choice), tests/test_conv_bn_act.py,
tests/test_conv1x1.py, tests/test_partial_dense_block.py (each route against the reference).
"""
from __future__ import annotations

import torch

from .. import extension
from ..checks import env_choice
from .batch_norm_act import planes_contiguous
from .conv_choice import (gemm_chosen, gemm_over_batch_chosen, onednn_eval_chosen, phases_input_grad_chosen,
                          winograd_chosen, winograd_weight_grad_chosen)

CPU_KERNEL_DTYPES = (torch.float32, torch.float64)

# CPU maps of at most this many pixels run as plain PyTorch: the dense block
# (`eager_is_faster`), and a training stage or ConvBNAct (`training_eager_is_faster`); and a
# stage called without autograd as chunk + cat (`eval_stage_unbuffered_is_faster`).
SMALL_MAP_PIXELS = 16
SMALL_TRAINING_MAP_PIXELS = 64
SMALL_EVAL_STAGE_PIXELS = 16 * 16
SMALL_MAPS_ENV_VAR = "CSP_KERNELS_CPU_SMALL_MAPS"
_SMALL_MAPS = env_choice(SMALL_MAPS_ENV_VAR, ("eager", "fused"), "eager",
                         renamed_from="CSP_KERNELS_CPU_DENSE_SMALL_MAPS")

_AVX512_RUNS: list[bool] = []  # filled on first use: build_info() may time the GEMMs, not at import


# -- engines, from the backend ----------------------------------------------------------------

def triton_eligible(kernel_size, padding, groups: int) -> bool:
    """Whether the Triton 1x1 GEMM computes this conv (any stride: it reads x[..., ::s, ::s])."""
    return tuple(kernel_size) == (1, 1) and tuple(padding) == (0, 0) and groups == 1


def transition_engine(backend_name: str, kernel_size, padding, groups: int) -> str:
    """The engine of a fused ConvBNAct on backend `backend_name`: "triton" for the 1x1 convs
    the Triton GEMM computes, else "aten"."""
    return "triton" if backend_name == "triton" and triton_eligible(kernel_size, padding, groups) else "aten"


def dense_engine(backend_name: str) -> str:
    """The engine of a fused dense block on backend `backend_name`."""
    return "triton" if backend_name == "triton" else "aten"


def eager_is_faster(x: torch.Tensor) -> bool:
    """Whether the dense block on input x runs faster as plain PyTorch than as the fused op: on
    the CPU, maps of at most SMALL_MAP_PIXELS pixels, where each (channels, height * width) plane
    GEMM of the fused kernels is a handful of columns wide and oneDNN's batched convolutions win
    (a kernel choice, not a fallback: the numbers are the reference's). The CPU backend's tests
    pin the fused op with CSP_KERNELS_CPU_SMALL_MAPS=fused, since they draw tiny maps."""
    return _SMALL_MAPS == "eager" and x.device.type == "cpu" and x.shape[2] * x.shape[3] <= SMALL_MAP_PIXELS


def training_eager_is_faster(x: torch.Tensor) -> bool:
    """Whether a training CSP stage (nn/stages.py) or ConvBNAct (nn/transition.py) with plain
    BatchNorms on input x runs faster as its reference forward, plain PyTorch, than fused: on
    the CPU, maps of at most SMALL_TRAINING_MAP_PIXELS pixels (8x8 and below: the last stage of
    a CSPNet at 256 pixels, most of it at 64), where the fused path's fixed cost per call (its
    autograd Functions, recipes and buffer slots in Python) outweighs what its kernels and saved
    memory gain. A kernel choice, not a fallback: the numbers are the reference's. Not inside a
    torch.compile trace, which traces the fused ops; pinned as `eager_is_faster` is."""
    return _small_cpu_map(x, SMALL_TRAINING_MAP_PIXELS)


def eval_stage_unbuffered_is_faster(x: torch.Tensor) -> bool:
    """Whether a CSP stage (nn/stages.py) called without autograd on input x runs faster as its
    reference forward (torch.chunk and torch.cat; its ConvBNActs stay fused) than with its concat
    buffer: on the CPU, maps of at most SMALL_EVAL_STAGE_PIXELS pixels (16x16 and below: the
    late stages of a model at small inputs), where the buffer's slots and its writers' checks
    cost more Python per call than the concat's copy saves. The same numbers either way (the
    concat is a copy). Pinned as `eager_is_faster` is."""
    return not torch.is_grad_enabled() and _small_cpu_map(x, SMALL_EVAL_STAGE_PIXELS)


def _small_cpu_map(x: torch.Tensor, max_pixels: int) -> bool:
    """Whether x is a 4-D CPU input whose maps have at most `max_pixels` pixels, with the
    small-map routes unpinned and outside a torch.compile trace (which traces the fused ops)."""
    return (_SMALL_MAPS == "eager" and x.device.type == "cpu" and x.dim() == 4
            and x.shape[2] * x.shape[3] <= max_pixels and not torch.compiler.is_compiling())


# -- what can run here ------------------------------------------------------------------------

def cpu_kernels_run(x: torch.Tensor) -> bool:
    """Whether the C++ CPU kernels of csrc/cpu (tiled GEMMs, fused backward) take x's device and
    dtype: float32 or float64 on the CPU."""
    return x.device.type == "cpu" and x.dtype in CPU_KERNEL_DTYPES


@torch.compiler.assume_constant_result  # torch.compile calls it, as it cannot trace the pybind call
def _avx512_runs() -> bool:
    """Whether the extension's AVX-512 kernels run on this CPU, fixed for the process (asked
    once, off the hot path)."""
    if not _AVX512_RUNS:
        _AVX512_RUNS.append(extension._C is not None and extension.build_info()["cpu_avx512"])
    return _AVX512_RUNS[0]


def onednn_usable(x: torch.Tensor) -> bool:
    """Whether oneDNN's fused convolution runs `x`'s dtype and device (float32 CPU)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def winograd_usable(x: torch.Tensor) -> bool:
    """Whether x can run by Winograd here: float32 on a CPU with AVX-512 (whether it should, for
    its shape, is `conv_choice.winograd_chosen`)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _avx512_runs()


# -- the 1x1 convolution with prologue and epilogue (ops/conv1x1.py, ops/dense.py) -------------

def conv1x1_kernel(x: torch.Tensor, engine: str, scaled: bool) -> str:
    """What runs `conv1x1_fused`: "cpu" (the C++ tiled GEMM, which has no output scale: `scaled`),
    "triton" (the Triton GEMM) or "bmm" (passes around torch.bmm: CUDA "aten", 16-bit CPU data)."""
    if engine == "aten" and cpu_kernels_run(x) and not scaled:
        return "cpu"
    return "triton" if engine == "triton" else "bmm"


def conv1x1_writes_over_input(x: torch.Tensor, engine: str, scaled: bool) -> bool:
    """Whether `conv1x1_fused` may write its output over its own input x (`in_place=True`, sample
    n's output covering only sample n's input), as the eval dense block's transitions do
    (`ops.dense_eval`): only the C++ CPU GEMM ("cpu"), which finishes each column tile of a sample
    in cache before storing it. The Triton GEMM's programs and the bmm passes would read input
    that others have already overwritten, so the caller gives them a separate output tensor."""
    return conv1x1_kernel(x, engine, scaled) == "cpu"


def conv1x1_backward_kernel(x: torch.Tensor) -> str:
    """What runs the backward of act(BN(conv1x1(x))): "cpu" (`csp_kernels::conv1x1_bn_act_backward`,
    grad_z tile by tile in cache) or "passes" (`bn_act_backward`, then two bmm GEMMs), on any engine."""
    return "cpu" if cpu_kernels_run(x) else "passes"


def dense_conv1_backward_kernel(x: torch.Tensor, engine: str) -> str:
    """What runs a dense layer's conv1 backward: "cpu" (`csp_kernels::dense_conv1_backward`),
    "triton" (triton/conv1x1_backward.py) or "passes"."""
    if engine == "aten" and cpu_kernels_run(x):
        return "cpu"
    return "triton" if engine == "triton" else "passes"


def dense_grad_acc_dtype(x: torch.Tensor, engine: str) -> torch.dtype:
    """The dtype of the dense backward's BN1 gradient accumulator (`ops.dense._dense_backward`),
    which sums the gradient of each buffer channel over every layer that reads it: float32 for
    float16/bfloat16 data on the GPU engines ("triton" on any device, "aten" on a GPU), so that
    it rounds to 16 bits once, when the BN correction writes the input gradient, not once per
    layer; else x's dtype (the CPU kernels', float32/float64, and the CPU's 16-bit passes)."""
    if x.dtype in (torch.float16, torch.bfloat16) and (engine == "triton" or x.device.type != "cpu"):
        return torch.float32
    return x.dtype


# -- convolutions (ops/conv.py, ops/transition.py, ops/dense_eval.py) --------------------------

def runs_as_gemm(x, weight, stride, padding, groups, training: bool) -> bool:
    """CPU 1x1 stride-1 convs of plane-contiguous x run as GEMMs on (N, C, H*W) views
    (`ops.conv1x1`), in training forward and backward or in eval (`training`): float64 always
    (ATen has no fast float64 convolution on the CPU), float32 where measured faster than
    oneDNN's for the shape (`conv_choice.gemm_chosen`; large maps, where oneDNN's reorders of
    NCHW into its blocked layout and back cost more than the GEMMs' per-plane weight reads)."""
    return (cpu_kernels_run(x)
            and tuple(weight.shape[2:]) == (1, 1) and tuple(stride) == (1, 1)
            and tuple(padding) == (0, 0) and groups == 1 and planes_contiguous(x)
            and (x.dtype == torch.float64 or gemm_chosen(x.shape, weight.shape, training)))


# The output columns of the CPU GEMM's micro-kernel panel (csrc/cpu/sgemm_avx512.cpp): a plane
# GEMM over fewer pixels leaves part of every panel idle.
GEMM_PANEL_COLUMNS = 64


def runs_as_gemm_over_batch(x, weight, stride, padding, dilation, groups) -> bool:
    """CPU eval convs (no groups) whose output maps are smaller than one GEMM panel
    (`GEMM_PANEL_COLUMNS` pixels) run as one GEMM over the whole batch's output pixels
    (`ops.conv.conv_over_batch`) where measured faster than ATen's convolution for the shape
    (`conv_choice.gemm_over_batch_chosen`)."""
    from .conv import conv_output_shape  # ops.conv routes through us
    if not cpu_kernels_run(x) or x.dim() != 4 or groups != 1:
        return False
    _, _, height, width = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return height * width < GEMM_PANEL_COLUMNS and gemm_over_batch_chosen(x.shape, weight.shape, stride, padding,
                                                                          dilation)


def runs_as_winograd(x, weight, stride, padding, dilation, groups, transform_cached: bool = False) -> bool:
    """CPU float32 3x3 stride-1 "same" convs of plane-contiguous x run by Winograd F(2x2, 3x3)
    (`ops.conv3x3`) where it was measured faster than oneDNN for their shapes
    (`conv_choice.winograd_chosen`): the training forward and input gradient, and eval with the
    weight's transform cached (`transform_cached`)."""
    return (_winograd_runs(x, weight, stride, padding, dilation, groups)
            and winograd_chosen(x.shape, weight.shape, transform_cached))


def _winograd_runs(x, weight, stride, padding, dilation, groups) -> bool:
    """Whether Winograd F(2x2, 3x3) computes conv2d(x, weight) here: a 3x3 stride-1 "same"
    conv of plane-contiguous float32 CPU data, AVX-512 present."""
    return (winograd_usable(x) and tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (1, 1)
            and tuple(padding) == (1, 1) and tuple(dilation) == (1, 1) and groups == 1 and planes_contiguous(x))


def conv_input_grad_kernel(x, grad_z, weight, stride, padding, dilation, groups) -> str:
    """What computes the input gradient of conv2d(x, weight) from grad_z: "winograd" (the
    stride-1 convs `runs_as_winograd` takes: the same convolution of grad_z with the flipped,
    transposed weight), "phases" (float32 CPU 3x3 stride-2 "same" convs, one stride-1
    convolution per input phase, `ops.conv_phases`, where measured faster than oneDNN's
    backward: `conv_choice.phases_input_grad_chosen`) or "aten"."""
    if runs_as_winograd(grad_z, weight.transpose(0, 1), stride, padding, dilation, groups):
        return "winograd"
    if (grad_z.device.type == "cpu" and grad_z.dtype == torch.float32 and tuple(weight.shape[2:]) == (3, 3)
            and tuple(stride) == (2, 2) and tuple(padding) == (1, 1) and tuple(dilation) == (1, 1) and groups == 1
            and phases_input_grad_chosen(x.shape, weight.shape)):
        return "phases"
    return "aten"


def runs_winograd_weight_grad(x, grad_z, weight, stride, padding, dilation, groups) -> bool:
    """The weight gradient of the convs `runs_as_winograd` takes (grad_z's planes contiguous too)
    runs by Winograd (`ops.conv3x3.conv3x3_winograd_weight_grad`) where it was measured faster
    than oneDNN's (`conv_choice.winograd_weight_grad_chosen`)."""
    return (_winograd_runs(x, weight, stride, padding, dilation, groups) and planes_contiguous(grad_z)
            and winograd_weight_grad_chosen(x.shape, weight.shape))


def conv_kernel(x, weight, stride, padding, dilation, groups, training: bool) -> str:
    """What runs a plain bias-free conv2d(x, weight) (`ops.conv.conv`): "gemm", "winograd" (the
    weight transformed per call) or "aten"."""
    if runs_as_gemm(x, weight, stride, padding, groups, training):
        return "gemm"
    if runs_as_winograd(x, weight, stride, padding, dilation, groups):
        return "winograd"
    return "aten"


def train_conv_kernel(x, weight, stride, padding, dilation, groups, engine: str) -> str:
    """What runs a training transition's conv and its batch statistics: "triton" (statistics in
    the GEMM's epilogue), "gemm" (likewise, the C++ tiled GEMM), else `conv_kernel`'s choice with
    a `channel_stats` pass."""
    if engine == "triton":
        return "triton"
    return conv_kernel(x, weight, stride, padding, dilation, groups, training=True)


# Grouped convs (ResNeXt's 3x3 with 4 channels per group, depthwise convs) of at most this many
# multiply-adds per output are recomputed where their input is rebuilt anyway: their output
# costs as much memory as any other, their recompute little (cspresnext50: saved 235 -> 211 MiB,
# peak 0.49 -> 0.46 of eager's, the step within the noise of interleaved runs).
RECOMPUTED_GROUPED_MACS = 64


def recomputed_conv_kernel(x, weight, z, groups: int, kernel: str, x_rebuilt: bool) -> str | None:
    """The kernel by which a training transition's backward recomputes its conv output z
    instead of saving it (`recompute.ConvOutput`), or None (z saved); `kernel` is the one that
    computed z (`train_conv_kernel`). On the CPU, for a conv of at most 256 multiply-adds per
    output element, where
      - x is at most a quarter of z and owns its memory (a network's stem on the image:
        CSPDarknet's 3->32 3x3, CSPResNet's 3->64 7x7; the first conv_exp of CSPResNet(X), on
        the stem's pooled output; x is saved instead of z);
      - x is rebuilt in backward from a recipe anyway (`x_rebuilt`: the output of another fused
        unit or stage) and either the conv is a 1x1 and z has at least twice x's elements (the
        expanding 1x1s of CSP stages: conv_exp, BottleneckBlock's conv3) or it is grouped with
        at most RECOMPUTED_GROUPED_MACS multiply-adds per output (nothing is saved for z).
    By the forward's kernel, so to the same values: for a 1x1, whichever of the GEMM and oneDNN
    won the measurement on this CPU, so that what is saved does not depend on that verdict."""
    macs = weight.shape[1] * weight.shape[2] * weight.shape[3]  # per output element
    if x.device.type != "cpu" or macs > 256 or kernel == "triton":
        return None
    if x_rebuilt and groups > 1 and macs <= RECOMPUTED_GROUPED_MACS:
        return kernel
    if x_rebuilt and z.numel() >= 2 * x.numel():
        return kernel if weight.shape[2] * weight.shape[3] == 1 else None
    if x.numel() * 4 > z.numel() or x.untyped_storage().nbytes() > x.numel() * x.element_size():
        return None  # (a view would hold its whole base)
    return kernel


def backward_runs_as_gemm(kernel: str, x, weight, stride, padding, groups) -> bool:
    """Whether a training transition whose conv ran by `kernel` (`train_conv_kernel`) runs its
    backward as `conv1x1_bn_act_backward` (grad_z tile by tile in the GEMMs' cache): after the
    CPU GEMM, and after Triton's on data the CPU kernels take (`runs_as_gemm`)."""
    return kernel == "gemm" or (kernel == "triton" and runs_as_gemm(x, weight, stride, padding, groups,
                                                                      training=True))


def scaled_eval_conv_kernel(engine: str) -> str:
    """What runs an eval transition's conv whose BN scale follows in a pass (`ops.transition.
    eval_weight_kind` "scaled": float16/bfloat16, or `eval_conv_kernel` "aten"): "triton" (the
    plain Triton GEMM) or "aten" (ATen's: where the CPU's GEMM or Winograd runs, the weight is
    folded instead)."""
    return "triton" if engine == "triton" else "aten"


def out_takes_any_strides(fused: bool, engine: str, training: bool) -> bool:
    """Whether a ConvBNAct call writes `out=` as it is, whatever its strides (else only where its
    (height, width) planes are contiguous, and by a copy where not: `ops.check_out`): the
    reference path (its copy_), and the Triton GEMM's eval epilogue, which stores through
    strides."""
    return not fused or (engine == "triton" and not training)


def eval_conv_kernel(x, weight, stride, padding, dilation, groups, engine: str) -> str:
    """What runs an eval transition's conv with BN folded in (`conv_bias_act`): "triton" or
    "gemm" (bias + act in the GEMM's epilogue), "gemm over the batch" (small maps: one GEMM for
    all samples' pixels, then the bias + act pass), "winograd" (the weight's transform cached),
    "onednn" (float32 CPU: oneDNN's post-op convolution with a prepacked weight, where measured
    faster than "aten": `conv_choice.onednn_eval_chosen`), else "aten" (`conv_kernel` for eval,
    then a bias + act pass)."""
    if engine == "triton":
        return "triton"
    if engine == "aten" and runs_as_gemm_over_batch(x, weight, stride, padding, dilation, groups):
        return "gemm over the batch"
    if runs_as_gemm(x, weight, stride, padding, groups, training=False):
        return "gemm"
    if engine != "aten":
        return "aten"
    if runs_as_winograd(x, weight, stride, padding, dilation, groups, transform_cached=True):
        return "winograd"
    if onednn_usable(x) and onednn_eval_chosen(x.shape, weight.shape, stride, padding, dilation, groups):
        return "onednn"
    return "aten"
