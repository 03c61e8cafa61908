"""torch.compile of the fused modules in eval: Dynamo captures each as one graph, with no graph
break (a break splits the graph and runs what lies between in Python at every call), whether
or not this process measured the kernels' choices eagerly first. The compiled results
themselves: the fullgraph=True tests of test_partial_dense_block.py, test_conv_bn_act.py and
test_inputs_outputs.py."""
import os
import subprocess
import sys

import pytest
import torch

import csp_kernels
from helpers import randomize_, unpin_kernel_choices
from test_cspdensenet_training import TinyCSPDenseNet

# Maps of 16x16: at least conv_choice's side for Winograd, so on AVX-512 CPUs the float32
# 3x3 convolutions trace the Winograd path.
MODULES = {
    "PartialDenseBlock": (lambda: csp_kernels.PartialDenseBlock(8, num_layers=2, growth_rate=4, fusion="csp"),
                          (2, 8, 16, 16)),
    "ConvBNAct-1x1": (lambda: csp_kernels.ConvBNAct(8, 12, 1, act="leaky_relu"), (2, 8, 16, 16)),
    "ConvBNAct-3x3": (lambda: csp_kernels.ConvBNAct(8, 12, 3, act="silu"), (2, 8, 16, 16)),
    "TinyCSPDenseNet": (lambda: TinyCSPDenseNet(csp_kernels), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "after-eager-call"])
@pytest.mark.parametrize("name", MODULES)
def test_eval_traces_without_graph_break(name, warm):
    torch._dynamo.reset()
    make, shape = MODULES[name]
    torch.manual_seed(0)
    module = randomize_(make()).eval()
    x = torch.randn(shape)
    with torch.no_grad(), csp_kernels.use_backend("cpu"):
        if warm:
            module(x)  # fills the eval caches and the measured kernel choices the trace then reads
        explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


INDUCTOR_UNDER_CI = """
import torch, csp_kernels
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(csp_kernels.ConvBNAct(4, 8, 3, act="silu"),
                      csp_kernels.PartialDenseBlock(8, num_layers=1, growth_rate=4, fusion="csp"))
x = torch.randn(2, 4, 8, 8)
for dynamic in (True, False):  # dynamic first: symbolic sizes run the decompositions, not the fakes
    torch._dynamo.reset()
    compiled = torch.compile(model.train(), fullgraph=True, dynamic=dynamic)
    compiled(x).sum().backward()
    with torch.no_grad():
        want = model.eval()(x)
        torch.testing.assert_close(torch.compile(model, fullgraph=True, dynamic=dynamic)(x), want)
    pyramid = torch.compile(csp_kernels.maxout_pyramid, fullgraph=True, dynamic=dynamic)
    features = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)]
    torch.testing.assert_close(pyramid(features, (8, 8), 2), csp_kernels.maxout_pyramid(features, (8, 8), 2))
"""


def test_inductor_keeps_fused_ops_when_env_ci_is_set(tmp_path):
    """CI services set the environment variable CI, under which Inductor refuses an implicit
    fallback for an op with a registered decomposition (ours are registered for torch.onnx):
    training and eval compiles, static and dynamic shapes, each op compiled for the first time
    (a fresh process and Inductor cache, hence the subprocess)."""
    env = {**os.environ, "CI": "true", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", INDUCTOR_UNDER_CI], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("name", ["ConvBNAct-1x1", "ConvBNAct-3x3", "PartialDenseBlock"])
def test_training_recompiles_for_another_batch_size(name, monkeypatch):
    """A new batch size makes Dynamo recompile with a symbolic batch (automatic dynamic shapes),
    which the measured kernel choices (unpinned here) must not try to look up: same outputs and
    gradients as eager at every batch size."""
    unpin_kernel_choices(monkeypatch)
    make, shape = MODULES[name]
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = randomize_(make())
    compiled_module = make()
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, backend="aot_eager")
    for batch in (4, 3, 5):
        x = torch.randn(batch, *shape[1:])
        x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_eager, y = eager(x_eager), compiled(x_compiled)
        torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
        y_eager.sum().backward()
        y.sum().backward()
        torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-4, atol=1e-5)
