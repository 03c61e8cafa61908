"""Synchronized BatchNorm in the fused modules (csp_kernels.distributed, ops/sync_batch_norm.py,
ops/sync_dense.py).

Two gloo processes (one spawn per device for the whole file, `results`): each rank trains the
fused module, its BatchNorms converted to nn.SyncBatchNorm (by the library's converter or
torch's), for a few SGD steps on its half of one batch; the reference twin with plain
BatchNorm2d trains in each process on the whole batch. Outputs, input gradients, parameter
gradients (summed over the ranks by hand, or averaged by DDP), parameters and running statistics
must match (float64: to rounding; float32: against a float32 reference, or against the float64
one by the repository's relative-error rule). DDP without synchronized BatchNorms must match DDP
of the reference (per-rank statistics), and so must both under torch.compile. The collectives of
each training step are counted by wrapping torch.distributed.all_reduce / all_gather in the
children (benchmarks.collectives' counter) and compared with what eager nn.SyncBatchNorm would
issue. On the CPU and, where there is one, on a CUDA device: both ranks on cuda:0 (NCCL refuses
two ranks on one device; gloo all-reduces CUDA tensors through the host). The cases in one
process (world size 1, conversion, the stage check) need no spawn.
"""
from __future__ import annotations

import datetime
import json
import traceback
import warnings
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import csp_kernels
from benchmarks import collectives
from benchmarks.collectives import CollectiveCounter
from csp_kernels import reference
from csp_kernels.distributed import check_sync_batch_norm, convert_sync_batchnorm
from csp_kernels.ops import routing
from helpers import assert_matches_reference, randomize_

WORLD_SIZE = 2
STEPS = 3
BATCH = 4  # 2 samples per rank
# float64: rounding only; float32 (Winograd 3x3s and the AVX-512 1x1 GEMMs where the CPU has them):
# the fused and the reference module each round their own way.
TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
# Inductor's code generation costs about twice aot_eager's compile time on 2 cores; what the
# compiled cases check is the capture (Dynamo through the synchronizing Function and its
# collectives, AOTAutograd, DDP's graph splitting), which aot_eager runs as inductor would.
COMPILE_BACKEND = "aot_eager"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here (the CUDA variant runs both gloo ranks on cuda:0)"))]


class Case(NamedTuple):
    fused: type
    reference: type
    args: tuple
    kwargs: dict
    shape: tuple  # of one sample
    # "sync": SyncBatchNorm, gradients summed over the ranks by hand; "sync-ddp": SyncBatchNorm
    # under DDP; "local-ddp": plain BatchNorm2d under DDP (per-rank statistics), against DDP of
    # the reference.
    mode: str = "sync"
    dtype: torch.dtype = torch.float64
    reference_dtype: torch.dtype | None = None  # None: `dtype`
    convert: str = "library"  # or "torch": torch.nn.SyncBatchNorm.convert_sync_batchnorm
    compile: bool = False  # torch.compile of the (DDP-wrapped) fused module
    batches: tuple[int, ...] = (BATCH // WORLD_SIZE,) * WORLD_SIZE  # each rank's samples of the BATCH
    # Both modules under a non-reentrant torch.utils.checkpoint, whose recomputation stops early:
    # each BatchNorm counts the batch twice, the fused one's update made before its op saves.
    checkpointed: bool = False


CASES = {
    "conv1x1": Case(csp_kernels.ConvBNAct, reference.ConvBNAct, (6, 8, 1), dict(act="silu"), (6, 5, 5)),
    "conv3x3": Case(csp_kernels.ConvBNAct, reference.ConvBNAct, (6, 8, 3), dict(act="leaky_relu"), (6, 5, 5)),
    "c2f": Case(csp_kernels.C2f, reference.C2f, (6, 8), dict(n=2, shortcut=True), (6, 5, 5)),
    "c2f-float32": Case(csp_kernels.C2f, reference.C2f, (6, 8), dict(n=1, shortcut=True), (6, 5, 5),
                        dtype=torch.float32),
    "c2f-ddp": Case(csp_kernels.C2f, reference.C2f, (6, 8), dict(n=1, shortcut=True), (6, 5, 5), "sync-ddp"),
    # stride 2: conv_down is a 3x3 stride-2 ConvBNAct
    "cross_stage": Case(csp_kernels.CrossStage, reference.CrossStage, (6, 8, 2, 1, 1), dict(block_ratio=0.5),
                        (6, 6, 6)),
    "c2f-local-ddp": Case(csp_kernels.C2f, reference.C2f, (6, 8), dict(n=1, shortcut=True), (6, 5, 5), "local-ddp"),
    "c2f-torch-convert": Case(csp_kernels.C2f, reference.C2f, (6, 8), dict(n=1, shortcut=True), (6, 5, 5),
                              convert="torch"),
    "c2f-compile-ddp": Case(csp_kernels.C2f, reference.C2f, (6, 8), dict(n=1, shortcut=True), (6, 5, 5), "sync-ddp",
                            compile=True),
    "c2f-compile-local-ddp": Case(csp_kernels.C2f, reference.C2f, (6, 8), dict(n=1, shortcut=True), (6, 5, 5),
                                  "local-ddp", compile=True),
    # (in_channels, num_layers, growth_rate)
    "pdb-first": Case(csp_kernels.PartialDenseBlock, reference.PartialDenseBlock, (8, 2, 4), dict(fusion="first"),
                      (8, 6, 6)),
    "pdb-last": Case(csp_kernels.PartialDenseBlock, reference.PartialDenseBlock, (8, 3, 4), dict(fusion="last"),
                     (8, 6, 6)),
    "pdb-csp": Case(csp_kernels.PartialDenseBlock, reference.PartialDenseBlock, (8, 3, 4), dict(fusion="csp"),
                    (8, 6, 6)),
    "pdb-csp-ddp": Case(csp_kernels.PartialDenseBlock, reference.PartialDenseBlock, (8, 2, 4), dict(fusion="csp"),
                        (8, 6, 6), "sync-ddp"),
    "pdb-csp-float32": Case(csp_kernels.PartialDenseBlock, reference.PartialDenseBlock, (8, 3, 4), dict(fusion="csp"),
                            (8, 6, 6), dtype=torch.float32, reference_dtype=torch.float64),
    "pdb-local-ddp": Case(csp_kernels.PartialDenseBlock, reference.PartialDenseBlock, (8, 2, 4), dict(fusion="csp"),
                          (8, 6, 6), "local-ddp"),
    "pdb-torch-convert": Case(csp_kernels.PartialDenseBlock, reference.PartialDenseBlock, (8, 2, 4),
                              dict(fusion="last"), (8, 6, 6), convert="torch"),
    "pdb-compile-ddp": Case(csp_kernels.PartialDenseBlock, reference.PartialDenseBlock, (8, 2, 4), dict(fusion="csp"),
                            (8, 6, 6), "sync-ddp", compile=True),
    "dense-block": Case(csp_kernels.DenseBlock, reference.DenseBlock, (8, 2, 4), {}, (8, 6, 6)),
    "conv3x3-checkpoint": Case(csp_kernels.ConvBNAct, reference.ConvBNAct, (6, 8, 3), dict(act="leaky_relu"),
                               (6, 5, 5), checkpointed=True),
    "pdb-csp-checkpoint": Case(csp_kernels.PartialDenseBlock, reference.PartialDenseBlock, (8, 2, 4),
                               dict(fusion="csp"), (8, 6, 6), checkpointed=True),
    # An empty rank joins the collectives (as torch's CUDA SyncBatchNorm lets it).
    "conv3x3-empty-rank": Case(csp_kernels.ConvBNAct, reference.ConvBNAct, (6, 8, 3), dict(act="leaky_relu"),
                               (6, 5, 5), batches=(BATCH, 0)),
    "c2f-empty-rank": Case(csp_kernels.C2f, reference.C2f, (6, 8), dict(n=1, shortcut=True), (6, 5, 5),
                           batches=(0, BATCH)),
    # Every rank empty: no batch statistics, the running ones stay (as nn.BatchNorm2d's on an empty batch).
    "conv3x3-all-empty": Case(csp_kernels.ConvBNAct, reference.ConvBNAct, (6, 8, 3), dict(act="leaky_relu"),
                              (6, 5, 5), batches=(0, 0)),
    "c2f-all-empty": Case(csp_kernels.C2f, reference.C2f, (6, 8), dict(n=1, shortcut=True), (6, 5, 5),
                          batches=(0, 0)),
}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal to rounding in a shared dtype; float32 against a float64 reference by the
    repository's relative-error rule (helpers.assert_matches_reference)."""
    if actual.dtype != expected.dtype and actual.is_floating_point():
        assert_matches_reference(actual, expected, name=what)
        return
    torch.testing.assert_close(actual, expected, **TOLERANCES.get(expected.dtype, dict(rtol=0, atol=0)),
                               msg=lambda message: f"{what}: {message}")


def _batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _convert(model: nn.Module, how: str) -> None:
    """Every BatchNorm2d of `model` (a module or its DDP wrapper) to nn.SyncBatchNorm over WORLD,
    in place, by the library's converter or torch's (which builds new modules around the same
    parameters and buffers)."""
    if how == "torch":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        convert_sync_batchnorm(model)


def _build(case: Case, device: str) -> tuple[nn.Module, nn.Module]:
    """(fused, reference) twins on `device` with the same randomized state, in their dtypes."""
    ref = randomize_(case.reference(*case.args, **case.kwargs)).to(device, case.reference_dtype or case.dtype)
    fused = case.fused(*case.args, **case.kwargs).to(device, case.dtype)
    fused.load_state_dict(ref.state_dict())
    return fused, ref


def _call(model: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    return checkpoint(model, x, use_reentrant=False) if checkpointed else model(x)


def _run_case(name: str, rank: int, device: str, counter: CollectiveCounter) -> dict:
    """Trains the case's fused module on this rank's half and the reference beside it; raises
    on a mismatch. Returns the collectives of each step (none counted under torch.compile), the
    synchronized BatchNorms' number and channels, and the first BatchNorm's running mean."""
    case = CASES[name]
    mode = case.mode
    torch.manual_seed(0)  # the same modules and data on every rank
    fused, ref = _build(case, device)
    ref_dtype = case.reference_dtype or case.dtype
    model = DistributedDataParallel(fused) if mode.endswith("ddp") else fused
    if mode != "local-ddp":
        # After DDP: its constructor refuses SyncBatchNorm in a CPU module; the conversion keeps
        # the parameters and buffers DDP registered.
        _convert(model, case.convert)
    ref_model = DistributedDataParallel(ref) if mode == "local-ddp" else ref
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    if case.compile:
        model = torch.compile(model, backend=COMPILE_BACKEND)
    half = slice(sum(case.batches[:rank]), sum(case.batches[:rank + 1]))
    steps = []
    for _ in range(STEPS):
        x_all = torch.randn(sum(case.batches), *case.shape, dtype=ref_dtype).to(device)
        # The reference sees the whole batch, except under local-ddp, where it is DDP'd itself.
        x_ref = (x_all[half] if mode == "local-ddp" else x_all).clone().requires_grad_()
        y_ref = _call(ref_model, x_ref, case.checkpointed)
        weight = torch.randn(y_ref.shape[1:], dtype=ref_dtype).to(device)  # a loss that weighs every output
        (y_ref * weight).sum().backward()

        x = x_all[half].to(case.dtype, copy=True).requires_grad_()
        # Dynamo would trace the counter's bookkeeping into the graph: compiled steps go uncounted.
        counter.active = not case.compile
        y = _call(model, x, case.checkpointed)
        # DDP averages the ranks' gradients; the reference's are the sum of the ranks' losses'.
        scale = WORLD_SIZE if mode == "sync-ddp" else 1
        ((y * weight.to(case.dtype)).sum() * scale).backward()
        counter.active = False
        steps.append(counter.take())
        if mode == "sync":
            for p in fused.parameters():
                dist.all_reduce(p.grad)

        _assert_close(y, y_ref if mode == "local-ddp" else y_ref[half], "output")
        _assert_close(x.grad, x_ref.grad if mode == "local-ddp" else x_ref.grad[half] * scale, "input gradient")
        for (pname, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
            _assert_close(p.grad, p_ref.grad, f"gradient of {pname}")
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    for key, value in ref.state_dict().items():
        _assert_close(fused.state_dict()[key], value, key)
    synced = [m for m in _batch_norms(fused) if isinstance(m, nn.SyncBatchNorm)]
    assert len(synced) == (0 if mode == "local-ddp" else len(_batch_norms(ref)))
    if case.compile:
        torch._dynamo.reset()  # the next cases compile their own modules
    return {"steps": steps, "batch_norms": len(synced), "channels": _reduced_channels(fused),
            "running_mean": _batch_norms(fused)[0].running_mean.tolist()}


def _reduced_channels(module: nn.Module) -> int:
    """Channels whose statistics the fused module all-reduces once per pass: every BatchNorm's,
    except that a dense block's norm1s read growing prefixes of one buffer, whose channels are
    reduced once each (the last norm1's channels; the last layer's new ones feed no norm1)."""
    norm1s = [m for name, m in module.named_modules() if name.endswith(".norm1")]
    return sum(m.num_features for m in _batch_norms(module) if m not in norm1s) + (
        norm1s[-1].num_features if norm1s else 0)


def _run_unsynchronizable_partial_dense_blocks() -> dict:
    """PartialDenseBlocks whose BatchNorms would not share one process group's statistics: one
    not converted, one over another group. Each falls back with the reason; the reference
    (torch's SyncBatchNorm) then refuses the CPU."""
    mixed = convert_sync_batchnorm(csp_kernels.PartialDenseBlock(8, num_layers=2, growth_rate=4).double())
    mixed.dense.denselayer2.norm2 = nn.BatchNorm2d(16).double()
    two_groups = convert_sync_batchnorm(csp_kernels.PartialDenseBlock(8, num_layers=2, growth_rate=4).double())
    two_groups.transition.bn.process_group = dist.new_group(list(range(WORLD_SIZE)))
    found = {}
    for name, block in (("mixed", mixed), ("two_groups", two_groups)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                block(torch.randn(2, 8, 6, 6, dtype=torch.float64))
                error = ""
            except ValueError as e:
                error = str(e)
        found[name] = {"warnings": [str(w.message) for w in caught
                                    if w.category is csp_kernels.ReferenceFallbackWarning], "error": error}
    return found


def _worker(rank: int, port: int, device: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(0)  # both ranks: the GPU machine has one device
        # float32 without TF32 (cuDNN's and the Triton GEMM's default), which would miss the float32
        # tolerances (conftest's full_float32_precision; this process is the worker's own).
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    warnings.simplefilter("error", csp_kernels.ReferenceFallbackWarning)  # the fused path must not fall back
    counter = CollectiveCounter()
    results = {}
    try:
        for name in CASES:
            try:
                results[name] = _run_case(name, rank, device, counter)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
        if device == "cpu":  # what it checks is torch's SyncBatchNorm refusing the CPU
            results["unsynchronizable"] = _run_unsynchronizable_partial_dense_blocks()
    finally:
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def results(device, tmp_path_factory) -> list[dict]:
    """Every rank's results of the spawned cases on `device`: [rank 0's, rank 1's]."""
    out_dir = tmp_path_factory.mktemp(f"distributed-{device}")
    mp.spawn(_worker, args=(collectives.free_port(), device, str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("case", CASES)
def test_training_steps_match_the_reference_on_the_whole_batch(results, case):
    """Outputs, input and parameter gradients, parameters and running statistics of each rank
    equal the reference's on the whole batch (sync modes) or on the rank's half (local-ddp)."""
    for rank, rank_results in enumerate(results):
        assert "error" not in rank_results[case], f"rank {rank}:\n{rank_results[case].get('error')}"


@pytest.mark.parametrize("case", CASES)
def test_running_statistics_are_the_groups_or_each_ranks(results, case):
    """Synchronized BatchNorms end with the same running statistics on every rank; under
    local-ddp each rank's follow its own half (DDP broadcasts rank 0's buffers before each
    forward, then each rank updates them from its own batch)."""
    first, second = (torch.tensor(rank_results[case]["running_mean"]) for rank_results in results)
    if CASES[case].mode == "local-ddp":
        assert not torch.allclose(first, second), "the ranks' running statistics agree without synchronization"
    else:
        torch.testing.assert_close(first, second, rtol=0, atol=0)


# Synchronized and counted (compiled steps are not; a checkpoint's recomputation synchronizes again).
COUNTED = [name for name, case in CASES.items() if case.mode != "local-ddp" and not case.compile
           and not case.checkpointed]


@pytest.mark.parametrize("case", COUNTED)
def test_one_all_reduce_per_layer_and_pass(results, case):
    """Fused: one all_reduce per synchronized layer in forward (3C + 1 values) and one in backward
    (2C), no all_gather; in a dense block each buffer channel's statistics once, so per pass 2L + T
    all_reduces (L layers, T transitions: x's channels, per layer its bottleneck and, but for the
    last layer, its new channels, each transition), as many as its BatchNorms
    (ops/sync_dense.py). Eager nn.SyncBatchNorm would run one all_gather (W·(2C + 1) values) per
    layer in forward and one all_reduce (2C) per layer in backward, a dense layer's norm1 over the
    whole prefix it reads: as many collectives, more values."""
    case_spec = CASES[case]
    ref = case_spec.reference(*case_spec.args, **case_spec.kwargs).to(case_spec.dtype)
    eager = collectives.eager_collectives(ref, torch.randn(BATCH // WORLD_SIZE, *case_spec.shape,
                                                           dtype=case_spec.dtype), WORLD_SIZE)
    eager_values = eager["all_reduce"][1] + eager["all_gather"][1]
    for rank_results in results:
        case_results = rank_results[case]
        assert "error" not in case_results, case_results.get("error")
        layers, channels = case_results["batch_norms"], case_results["channels"]
        for step in case_results["steps"]:
            assert {name: counts[:2] for name, counts in step.items()} == {
                "all_reduce": [2 * layers, 5 * channels + layers], "all_gather": [0, 0]}
            assert step["all_reduce"][0] == eager["all_reduce"][0] + eager["all_gather"][0]
            fused_values = step["all_reduce"][1]
            dense = case.startswith(("pdb", "dense"))  # eager's norm1s each send their whole prefix
            assert fused_values < eager_values if dense else fused_values <= eager_values


def test_unsynchronizable_partial_dense_block_falls_back_naming_the_reason(results, device):
    if device != "cpu":
        pytest.skip("checks the fallback to torch's SyncBatchNorm refusing CPU tensors")
    for rank_results in results:
        found = rank_results["unsynchronizable"]
        mixed, two_groups = found["mixed"], found["two_groups"]
        assert any("dense.denselayer2.norm2 (BatchNorm2d) does not synchronize" in w and "PartialDenseBlock" in w
                   for w in mixed["warnings"]), mixed
        assert any("over different process groups" in w and "transition.bn" in w
                   for w in two_groups["warnings"]), two_groups
        for what in (mixed, two_groups):
            assert "SyncBatchNorm expected input tensor to be on GPU" in what["error"], what


def test_benchmark_counts_collectives_fused_and_eager():
    """benchmarks.collectives: per step as many collectives as eager's (2 per BatchNorm), fewer
    values for the dense block, whose eager norm1s each reduce their whole prefix."""
    rows = {row["module"]: row for row in collectives.measure(WORLD_SIZE)}
    assert rows.keys() == set(collectives.MODULES)
    for row in rows.values():
        fused, eager = row["fused"], row["eager"]
        assert fused["all_reduce"][0] == eager["all_reduce"][0] + eager["all_gather"][0] == 2 * row["batch_norms"]
        assert fused["all_gather"] == [0, 0, 0]
    dense = rows["PartialDenseBlock"]
    assert dense["fused"]["all_reduce"][1] < (dense["eager"]["all_reduce"][1] + dense["eager"]["all_gather"][1]) / 2
    assert "PartialDenseBlock" in collectives.format_rows(list(rows.values()), WORLD_SIZE)


# -- in one process -----------------------------------------------------------------------------

@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("side", [5, 4], ids=["5x5", "4x4-eager-small-maps"])
@pytest.mark.parametrize("module", ["ConvBNAct", "C2f", "PartialDenseBlock"])
def test_sync_batch_norm_alone_in_its_group_is_batch_norm(module, side, process_group, monkeypatch):
    """A group of one process has nothing to synchronize: the fused modules compute BatchNorm2d
    (on the CPU too, where torch's SyncBatchNorm raises), without a collective or a warning; a
    dense block on maps the CPU would run as plain PyTorch (4x4, `routing.eager_is_faster`)
    too."""
    monkeypatch.setattr(routing, "_SMALL_MAPS", "eager")
    build = {"ConvBNAct": lambda m: m.ConvBNAct(6, 8, 3), "C2f": lambda m: m.C2f(6, 8, n=1),
             "PartialDenseBlock": lambda m: m.PartialDenseBlock(6, num_layers=2, growth_rate=4)}[module]
    ref = randomize_(build(reference)).double()
    fused = build(csp_kernels).double()
    fused.load_state_dict(ref.state_dict())
    convert_sync_batchnorm(fused)
    x = torch.randn(2, 6, side, side, dtype=torch.float64)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x_ref), fused(x_fused)
    y_ref.sum().backward(), y.sum().backward()
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.float64])
    torch.testing.assert_close(x_fused.grad, x_ref.grad, **TOLERANCES[torch.float64])
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, **TOLERANCES[torch.float64], msg=key)
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        convert_sync_batchnorm(ref)(x)


def test_convert_sync_batchnorm_keeps_tensors_settings_and_keys():
    model = nn.Sequential(csp_kernels.C2f(6, 8, n=1), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, eps=1e-3, momentum=None),
                          nn.Flatten(), nn.BatchNorm1d(8 * 25))
    model[0].cv2.bn.eval()
    model[2].weight.requires_grad_(False)
    before = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    keys = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    group = object()  # any process group object; nothing runs here
    assert convert_sync_batchnorm(model, group) is model
    after = dict(model.named_modules())
    assert keys.keys() == model.state_dict().keys()
    assert all(model.state_dict(keep_vars=True)[k] is v for k, v in keys.items())  # the same tensors
    for name, old in before.items():
        new = after[name]
        if isinstance(old, nn.BatchNorm1d):
            assert new is old  # the fused kernels synchronize 2-D BatchNorms only
            continue
        assert type(new) is nn.SyncBatchNorm and new.process_group is group
        assert (new.eps, new.momentum, new.training) == (old.eps, old.momentum, old.training)
    assert not model[2].weight.requires_grad and not after["0.cv2.bn"].training
    assert isinstance(convert_sync_batchnorm(nn.BatchNorm2d(3)), nn.SyncBatchNorm)


def test_check_sync_batch_norm_names_mixed_and_mismatched_stages(process_group):
    stage = csp_kernels.C2f(6, 8, n=1)
    check_sync_batch_norm(stage)  # plain BatchNorms throughout
    convert_sync_batchnorm(stage.m)
    with pytest.raises(ValueError, match=r"C2f \(the model\) mixes SyncBatchNorm \(m\.0\.cv1\.bn\) with "
                                         r"BatchNorm2d \(cv1\.bn\)"):
        check_sync_batch_norm(stage)
    model = nn.Sequential(convert_sync_batchnorm(stage, dist.new_group([0])))
    stage.m[0].cv2.bn.process_group = None  # WORLD: another group
    with pytest.raises(ValueError, match=r"C2f 0 holds SyncBatchNorms over different process groups "
                                         r"\(0\.cv1\.bn and 0\.m\.0\.cv2\.bn\)"):
        check_sync_batch_norm(model)
    convert_sync_batchnorm(model)
    check_sync_batch_norm(model)
