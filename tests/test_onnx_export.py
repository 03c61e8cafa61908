"""Deployment to ONNX: `torch.onnx.export(model, args)` as users call it (the default exporter,
dynamo=True) writes every fused module, and every forward custom op, as standard ONNX whose
onnxruntime output matches the module's eager output; the decompositions that make this
possible (csp_kernels.ops.decompositions) leave torch.compile and torch.export graphs alone.

Tolerance (float32): onnxruntime's convolutions (MLAS) and the eager kernels (oneDNN, csp_kernels'
GEMM and Winograd, ATen) sum in different orders, so outputs of order 1 differ by a few ulps of
their partial sums (a few 1e-7 measured, up to about 1e-6 through a dense block's chain of
convolutions and batch statistics). rtol 1e-4 / atol 1e-5 leave about 10x margin over that, while
a semantic slip (a missing bias, a wrong slope, eps or statistic; the BatchNorms here have
eps 0.01 so that eps shows) moves outputs by 1e-3 or more. Selections (Maxout, nearest resize)
must match exactly.
"""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._functorch.aot_autograd import aot_module_simplified

import csp_kernels
from csp_kernels.ops import batch_norm_act as bn_ops
from csp_kernels.ops import conv3x3, decompositions
from csp_kernels.ops import transition as transition_ops
from helpers import randomize_
from test_cspdensenet_training import TinyCSPDenseNet

FLOAT32_TOL = {"rtol": 1e-4, "atol": 1e-5}
EXACT = {"rtol": 0.0, "atol": 0.0}
STANDARD_DOMAINS = ("", "ai.onnx")
_ops = torch.ops.csp_kernels


def deployable(module: nn.Module) -> nn.Module:
    """`module` with non-trivial BatchNorm parameters, running statistics and eps."""
    randomize_(module)
    for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.eps = 1e-2
    return module


def export_to_onnx(module: nn.Module, args: tuple, **kwargs) -> onnx.ModelProto:
    """The default exporter; asserts the model holds standard-domain nodes only."""
    model = torch.onnx.export(module, args, **kwargs).model_proto
    onnx.checker.check_model(model, full_check=True)
    domains = {node.domain for node in model.graph.node}
    assert domains <= set(STANDARD_DOMAINS), f"non-standard node domains {domains - set(STANDARD_DOMAINS)}"
    assert not model.functions, f"custom functions {[f.name for f in model.functions]}"
    assert {o.domain for o in model.opset_import} <= set(STANDARD_DOMAINS)
    return model


def run_onnx(model: onnx.ModelProto, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})


def flat_inputs(args: tuple) -> list[torch.Tensor]:
    return [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]


def assert_outputs_match(got: list[np.ndarray], want, tol: dict, labels: list[str] | None = None) -> None:
    want = list(want) if isinstance(want, (list, tuple)) else [want]
    assert len(got) == len(want)
    labels = labels or [f"output {i}" for i in range(len(want))]
    for label, g, w in zip(labels, got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, **tol, msg=lambda m, label=label: f"{label}: {m}")


def check_module(make_module, make_args, training: bool = False, tol: dict = FLOAT32_TOL, labels=None):
    """Exports a fresh module in `training` mode (under no_grad: inference, where the fused
    kernels run) and compares onnxruntime with the eager output of a twin in the same state; the
    export must leave the module's state as it was."""
    module = deployable(make_module()).train(training)
    twin = copy.deepcopy(module)
    args = make_args()
    with torch.no_grad():
        model = export_to_onnx(module, args)
        want = twin(*args)
    assert_outputs_match(run_onnx(model, flat_inputs(args)), want, tol, labels)
    for (key, value), before in zip(module.state_dict().items(), copy.deepcopy(module).state_dict().values()):
        assert torch.equal(value, before), f"{key} changed by the export"


# -- modules in eval, the deployment target ------------------------------------------------------

class Parallel(nn.Module):
    """Every child applied to the same input (one export for all of them): the tuple of their
    outputs, tuples flattened.

    x: (batch, channels, height, width)
    """

    def __init__(self, children):
        super().__init__()
        self.branches = nn.ModuleList(children)

    def forward(self, x):
        outputs = [branch(x) for branch in self.branches]
        return tuple(t for out in outputs for t in (out if isinstance(out, (list, tuple)) else [out]))


ACTIVATIONS = [("relu", 0.1), ("leaky_relu", 0.1), ("leaky_relu", 0.2), ("silu", 0.1), ("mish", 0.1),
               ("hardswish", 0.1), ("identity", 0.1)]
GEOMETRIES = [(1, 1), (3, 1), (1, 2), (3, 2)]  # (kernel_size, stride)
CONV_BN_ACT_CASES = [(act, slope, k, s) for act, slope in ACTIVATIONS for k, s in GEOMETRIES]


def test_conv_bn_act_eval_every_activation_kernel_and_stride():
    labels = [f"ConvBNAct({k}x{k}, stride {s}, {act}, slope {slope})" for act, slope, k, s in CONV_BN_ACT_CASES]
    check_module(lambda: Parallel(csp_kernels.ConvBNAct(6, 5, k, s, act=act, negative_slope=slope)
                                  for act, slope, k, s in CONV_BN_ACT_CASES),
                 lambda: (torch.randn(2, 6, 7, 7),), labels=labels)


def test_partial_dense_block_eval_every_fusion():
    fusions = ["last", "first", "csp"]
    check_module(lambda: Parallel(csp_kernels.PartialDenseBlock(8, 2, 4, fusion=f) for f in fusions),
                 lambda: (torch.randn(2, 8, 6, 6),), labels=[f"PartialDenseBlock(fusion={f!r})" for f in fusions])


def test_exact_fusion_and_maxout_eval():
    # Three levels: down- and upsampling by 2 and by a non-integer ratio (8 -> 3, 3 -> 4).
    def args():
        return ([torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4), torch.randn(1, 4, 3, 3)],)

    check_module(lambda: csp_kernels.ExactFusion([4, 8, 4], 4, grouping="contiguous"), args, tol=EXACT)
    check_module(lambda: csp_kernels.ExactFusion([4, 8, 4], 4, transition=True), args)
    check_module(lambda: csp_kernels.Maxout(3), lambda: (torch.randn(2, 9, 4, 5),), tol=EXACT)


def test_csp_dense_net_eval_with_dynamic_batch():
    module = deployable(TinyCSPDenseNet(csp_kernels)).eval()
    batch = torch.export.Dim("batch", min=1, max=16)
    with torch.no_grad():
        model = export_to_onnx(module, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
        for n in (1, 3):
            x = torch.randn(n, 3, 16, 16)
            assert_outputs_match(run_onnx(model, [x]), module(x), FLOAT32_TOL)


def test_eval_export_with_grad_mode_on():
    """Exported as users often do, without torch.no_grad: ConvBNAct folds through autograd and
    the dense blocks run their reference (frozen BatchNorms while autograd records); the ONNX
    model still gives the module's output."""
    module = deployable(TinyCSPDenseNet(csp_kernels)).eval()
    x = torch.randn(2, 3, 16, 16)
    model = export_to_onnx(module, (x,))
    with torch.no_grad():
        assert_outputs_match(run_onnx(model, [x]), module(x), FLOAT32_TOL)


# -- training mode -------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")
def test_training_mode_exports_the_batch_statistics_forward():
    """A training module exports its training forward: normalized by the batch's statistics,
    as eager computes it. The running-statistics update is not in the ONNX model (it has no
    state to write) and the export leaves the module's own statistics as they were."""
    check_module(lambda: Parallel([csp_kernels.ConvBNAct(8, 5, 3, 2, act="mish"),
                                   csp_kernels.PartialDenseBlock(8, 2, 4, fusion="csp")]),
                 lambda: (torch.randn(2, 8, 6, 6),), training=True, labels=["ConvBNAct", "PartialDenseBlock"])


# -- every forward op, including arguments the modules never pass --------------------------------

class OpCall(nn.Module):
    """forward(x) = fn(x, *constants), the constants held as buffers."""

    def __init__(self, fn, *constants):
        super().__init__()
        self.fn = fn
        for i, c in enumerate(constants):
            self.register_buffer(f"c{i}", c)

    def forward(self, x):
        return self.fn(x, *self.buffers())


def _into_slice(op, channels: int):
    """Calls the `*_out` op `op(x, ..., out)` into a channel slice of a zeroed buffer; returns
    the buffer (and what the op returns)."""
    def call(x, *args):
        buf = x.new_zeros(x.shape[0], channels + 2, x.shape[2], x.shape[3])
        returned = op(x, *args, buf[:, 2:])
        return (buf, *returned) if isinstance(returned, (list, tuple)) else buf
    return call


def _op_cases():
    c, o = 6, 5
    scale, shift = torch.rand(c) + 0.5, torch.randn(c)
    w3, w1 = torch.randn(o, c, 3, 3) * 0.2, torch.randn(o, c, 1, 1) * 0.3
    bn_w, bn_b, bias = torch.rand(o) + 0.5, torch.randn(o), torch.randn(o)
    strided, same = ([2, 2], [1, 1], [1, 1], 1), ([1, 1], [1, 1], [1, 1], 1)  # 3x3 geometries
    return {
        "scale_shift_act": (lambda x, s, t: _ops.scale_shift_act(x, s, t, "silu"), (scale, shift), None),
        "scale_shift_act_out": (_into_slice(lambda x, s, t, out: _ops.scale_shift_act_out(
            x, s, t, "leaky_relu:0.3", out), c), (scale, shift), None),
        "channel_stats": (lambda x: _ops.channel_stats(x), (), None),
        "batch_norm_act": (lambda x, w, b: bn_ops.batch_norm_act(x, w, b, 1e-2, "hardswish"), (scale, shift), None),
        "conv_bias_act-scale": (lambda x, w, b, s: transition_ops.conv_bias_act(
            x, w, b, *strided, "mish", "aten", None, s), (w3, bias, bn_w), None),
        "conv_bias_act_out": (_into_slice(lambda x, w, b, out: transition_ops.conv_bias_act_out(
            x, w, b, *same, "relu", "aten", out), o), (w3, bias), None),
        "conv_bn_act_train": (lambda x, w, g, b: transition_ops.conv_bn_act_train(
            x, w, g, b, *strided, 1e-2, "silu", "aten"), (w3, bn_w, bn_b), None),
        "conv_bn_act_train_out": (_into_slice(lambda x, w, g, b, out: transition_ops.conv_bn_act_train_out(
            x, w, g, b, [1, 1], [0, 0], [1, 1], 1, 1e-2, "relu", "aten", out), o), (w1, bn_w, bn_b), None),
        "conv1x1_fused_out-stats": (_into_slice(lambda x, w, s, t, b, out: _ops.conv1x1_fused_out(
            x, w, s, t, "relu", b, "hardswish", True, out), o), (w1.flatten(1), scale, shift, bias), None),
        # Winograd's kernel needs AVX-512, and the modules always pass the 3x3 weight: the
        # decomposition recovers it from the transform, so this compares with the convolution
        # the op computes.
        "conv3x3_winograd_out-transform-only": (
            _into_slice(lambda x, u, out: _ops.conv3x3_winograd_out(x, u, out), o),
            (conv3x3.winograd_weight(w3),),
            lambda x: torch.cat([x.new_zeros(x.shape[0], 2, *x.shape[2:]), F.conv2d(x, w3, padding=1)], 1)),
    }


def test_every_forward_op_exports_what_it_computes():
    cases = _op_cases()
    module = Parallel(OpCall(fn, *constants) for fn, constants, _ in cases.values()).eval()
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        model = export_to_onnx(module, (x,))
        want, labels = [], []
        for (name, (_, _, expected)), branch in zip(cases.items(), module.branches):
            out = branch(x) if expected is None else expected(x)
            out = list(out) if isinstance(out, (list, tuple)) else [out]
            want += out
            labels += [f"{name} output {i}" for i in range(len(out))]
    assert_outputs_match(run_onnx(model, [x]), want, FLOAT32_TOL, labels)


def test_every_op_is_decomposed_or_backward_only():
    names = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("csp_kernels::")]
    assert {"conv_bias_act", "conv1x1_fused_out", "partial_dense_block", "maxout_pyramid_backward"} <= set(names)
    cia = torch._C.DispatchKey.CompositeImplicitAutograd
    for name in names:
        op = getattr(_ops, name).default
        decomposed = op in torch._decomp.decomposition_table or cia in op.py_kernels
        assert decomposed != (name in decompositions.BACKWARD_OPS), name


# -- torch.compile and torch.export keep the fused kernels ---------------------------------------

def compiled_forward_code(module, args, dynamic: bool) -> str:
    codes = []

    def backend(gm, example_inputs):
        def keep(graph, _):
            codes.append(graph.code)
            return graph.forward
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep)

    torch._dynamo.reset()
    torch.compile(module, backend=backend, fullgraph=True, dynamic=dynamic)(*args)
    return "\n".join(codes)


def test_compile_and_export_graphs_keep_the_fused_ops():
    """torch.compile with dynamic shapes (whose fake tensors run the functional ops'
    decompositions), torch.export and its core-ATen `run_decompositions` keep the fused ops."""
    transition = deployable(csp_kernels.ConvBNAct(6, 5, 3, act="silu")).eval()
    block = deployable(csp_kernels.PartialDenseBlock(8, 2, 4, fusion="csp")).eval()
    cases = [(transition, (torch.randn(2, 6, 6, 6),), "csp_kernels.conv_bias_act.default"),
             (block, (torch.randn(2, 8, 6, 6),), "csp_kernels.conv1x1_fused_out.default")]
    with torch.no_grad():
        for module, args, op in cases:
            assert op in compiled_forward_code(module, args, dynamic=True)
            program = torch.export.export(module, args)
            assert op in program.graph_module.code
            assert op in program.run_decompositions().graph_module.code
