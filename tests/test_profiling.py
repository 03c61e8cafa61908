"""The measuring instruments against counts done by hand."""
import gc
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from csp_kernels.profiling import (PeakMemory, SavedTensorsMeter, TrafficCounter, cio_bytes,
                                   cio_dense_block, cio_partial_dense_block, format_bytes,
                                   peak_cpu_memory, peak_cuda_memory)

SHAPE = (2, 3, 4, 5)  # 120 elements: 480 bytes in float32
NBYTES = 480


@torch.library.custom_op("csp_profiling_test::scaled_add", mutates_args=())
def scaled_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * 2 + y  # two inner aten ops the counter must not see


@torch.library.custom_op("csp_profiling_test::scale_into", mutates_args=("out",))
def scale_into(x: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(x, 3, out=out)


def traffic(fn) -> TrafficCounter:
    with TrafficCounter() as counter:
        fn()
    return counter


def test_binary_op_reads_both_inputs_and_writes_its_output():
    x, y = torch.randn(SHAPE), torch.randn(SHAPE)
    counter = traffic(lambda: x + y)
    assert (counter.reads, counter.writes, counter.total) == (2 * NBYTES, NBYTES, 3 * NBYTES)
    op = counter.per_op["aten.add.Tensor"]
    assert (op.reads, op.writes, op.calls) == (2 * NBYTES, NBYTES, 1)


def test_views_and_allocations_are_not_counted():
    x = torch.randn(SHAPE)
    m = torch.randn(6, 20)
    counter = traffic(lambda: (x.view(6, 20), m.t(), x.transpose(1, 2), x[:, 1:], x.detach(),
                               x[:1].expand(4, 3, 4, 5), x.reshape(120), x.unsqueeze(0),
                               torch.empty_like(x)))
    assert counter.total == 0
    assert counter.per_op == {}


def test_op_on_a_strided_view_counts_only_the_viewed_elements():
    x, y = torch.randn(SHAPE), torch.randn(2, 1, 4, 5)
    counter = traffic(lambda: x[:, :1] * y)
    assert (counter.reads, counter.writes) == (2 * 160, 160)


def test_in_place_op_reads_and_writes_self():
    x = torch.randn(SHAPE)
    counter = traffic(lambda: torch.relu_(x))
    assert (counter.reads, counter.writes) == (NBYTES, NBYTES)
    y = torch.randn(SHAPE)
    counter = traffic(lambda: x.add_(y))
    assert (counter.reads, counter.writes) == (2 * NBYTES, NBYTES)


def test_out_argument_and_overwriting_ops_write_without_reading_the_destination():
    x, y, z = torch.randn(SHAPE), torch.randn(SHAPE), torch.empty(SHAPE)
    counter = traffic(lambda: torch.add(x, y, out=z))
    assert (counter.reads, counter.writes) == (2 * NBYTES, NBYTES)
    counter = traffic(lambda: z.copy_(x))
    assert (counter.reads, counter.writes) == (NBYTES, NBYTES)
    counter = traffic(lambda: z.zero_())
    assert (counter.reads, counter.writes) == (0, NBYTES)


def test_like_factories_read_no_data():
    x = torch.randn(SHAPE)
    counter = traffic(lambda: torch.zeros_like(x))
    assert (counter.reads, counter.writes) == (0, NBYTES)


def test_matmul():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    counter = traffic(lambda: a @ b)
    assert (counter.reads, counter.writes) == ((12 + 20) * 4, 15 * 4)
    assert list(counter.per_op) == ["aten.mm.default"]


def test_conv2d_forward():
    conv = torch.nn.Conv2d(3, 4, kernel_size=3, bias=True)
    x = torch.randn(2, 3, 6, 6)
    counter = traffic(lambda: conv(x))
    input_bytes, weight_bytes, bias_bytes = 2 * 3 * 36 * 4, 4 * 3 * 9 * 4, 4 * 4
    assert counter.reads == input_bytes + weight_bytes + bias_bytes
    assert counter.writes == 2 * 4 * 4 * 4 * 4
    assert [op.calls for op in counter.per_op.values()] == [1]


def test_batch_norm_training_counts_running_statistics_as_written():
    bn = torch.nn.BatchNorm2d(3)
    x = torch.randn(SHAPE)
    counter = traffic(lambda: bn(x))
    per_channel = 3 * 4
    norm = counter.per_op["aten.native_batch_norm.default"]
    # reads input, weight, bias, running mean and var; writes output, batch mean and inverse
    # std, running mean and var
    assert (norm.reads, norm.writes) == (NBYTES + 4 * per_channel, NBYTES + 4 * per_channel)
    increment = counter.per_op["aten.add_.Tensor"]  # num_batches_tracked += 1 (int64)
    assert (increment.reads, increment.writes) == (8, 8)


def test_custom_op_is_counted_once_by_its_own_inputs_and_outputs():
    x, y = torch.randn(SHAPE), torch.randn(SHAPE)
    counter = traffic(lambda: scaled_add(x, y))
    assert list(counter.per_op) == ["csp_profiling_test.scaled_add.default"]
    assert (counter.reads, counter.writes) == (2 * NBYTES, NBYTES)
    torch.testing.assert_close(scaled_add(x, y), 2 * x + y)


def test_custom_op_argument_named_out_is_written_not_read():
    x, out = torch.randn(SHAPE), torch.empty(SHAPE)
    counter = traffic(lambda: scale_into(x, out))
    assert (counter.reads, counter.writes) == (NBYTES, NBYTES)
    torch.testing.assert_close(out, 3 * x)


def test_backward_ops_are_counted_when_backward_runs_inside():
    x = torch.randn(SHAPE, requires_grad=True)
    w = torch.randn(SHAPE, requires_grad=True)
    with TrafficCounter() as counter:
        (x * w).sum().backward()
    # forward: mul (reads x, w; writes x*w), sum (reads x*w; writes 4 B)
    # backward: ones_like seed (writes 4 B); sum's expand is a view; mul's two gradients
    # grad*w and grad*x (each reads the expanded grad and one factor, writes one gradient)
    assert counter.per_op["aten.mul.Tensor"].calls == 3
    assert counter.reads == 2 * NBYTES + NBYTES + 2 * (2 * NBYTES)
    assert counter.writes == NBYTES + 4 + 4 + 2 * NBYTES


def test_table_lists_every_op_and_the_totals():
    x, y = torch.randn(SHAPE), torch.randn(SHAPE)
    counter = traffic(lambda: torch.relu(x + y))
    table = counter.table()
    assert "aten.add.Tensor" in table and "aten.relu.default" in table
    assert table.splitlines()[-1].split()[:2] == ["total", "2"]


def test_saved_bytes_of_a_product_are_both_factors():
    x = torch.randn(SHAPE, requires_grad=True)
    w = torch.randn(SHAPE, requires_grad=True)
    with SavedTensorsMeter() as meter:
        loss = (x * w).sum()  # mul saves x and w; sum saves only a size
    assert (meter.bytes, meter.tensors) == (2 * NBYTES, 2)
    assert meter.bytes_excluding([w]) == NBYTES
    loss.backward()  # the graph still works: the hooks hand the saved tensors back unchanged
    torch.testing.assert_close(x.grad, w.detach())


def test_saved_views_of_one_storage_count_the_storage_once():
    base = torch.randn(20, requires_grad=True)
    w = torch.randn(10, requires_grad=True)
    with SavedTensorsMeter() as meter:
        first, second = base[:10], base[10:]
        (first * w).sum() + (second * w).sum()  # saves first, w, second, w
    assert meter.tensors == 4
    assert meter.bytes == 20 * 4 + 10 * 4
    assert meter.bytes_excluding([w]) == 20 * 4


def test_saved_by_a_custom_autograd_function_is_metered():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    x = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    with SavedTensorsMeter() as meter:
        Square.apply(x)
    assert meter.bytes == 2 * NBYTES


class ExpSavingItsOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x.exp()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return out * grad


def test_an_op_saving_its_own_output_is_freed_without_backward():
    """The dense block's op saves tensors it returns; a forward without backward under the
    meter once leaked its whole graph (a cycle through the packed output's grad_fn)."""
    x = torch.randn(SHAPE, requires_grad=True)
    with SavedTensorsMeter() as meter:
        out = ExpSavingItsOutput.apply(x)
    storage = StorageWeakRef(out.untyped_storage())
    assert meter.bytes == NBYTES
    del out
    gc.collect()
    assert storage.expired()


def test_backward_through_a_saved_output_after_metering():
    x = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    with SavedTensorsMeter():
        out = ExpSavingItsOutput.apply(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, x.detach().exp())


def test_nothing_is_saved_without_grad():
    x = torch.randn(SHAPE)
    with SavedTensorsMeter() as meter:
        torch.relu(x * 2)
    assert (meter.bytes, meter.tensors) == (0, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_peak_cuda_memory_is_none_without_cuda():
    with peak_cuda_memory() as peak:
        torch.randn(100)
    assert peak == PeakMemory(bytes=None, increase=None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_cuda_memory_sees_a_temporary_allocation():
    with peak_cuda_memory() as peak:
        temporary = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
        del temporary
    assert peak.increase >= 1 << 20
    assert peak.bytes >= peak.increase


def test_peak_cpu_memory_sees_a_temporary_allocation():
    # The 32 MiB temporary inside the block is what it must report, and a 64 MiB tensor freed
    # before it must not count; the small tensors a Python-level op allocates may.
    before = torch.ones(64 << 18)
    del before
    with peak_cpu_memory() as peak:
        temporary = torch.ones(32 << 18)  # 32 MiB of float32
        del temporary
    assert 32 << 20 <= peak.increase <= (32 << 20) + 4096, peak
    assert peak.bytes is None  # the CPU allocator counts nothing in use
    with peak_cpu_memory() as idle:
        pass
    assert idle.increase == 0, idle


def test_peak_cpu_memory_refuses_to_nest():
    """An inner profiler's exit would end the outer one's collection (it reported 0)."""
    with peak_cpu_memory() as outer:
        with pytest.raises(RuntimeError, match="cannot run inside another torch.profiler"):
            with peak_cpu_memory():
                pass
        temporary = torch.ones(1 << 18)  # 1 MiB
        del temporary
    assert outer.increase >= 1 << 20


def test_peak_cpu_memory_does_not_see_frees_of_earlier_tensors():
    # As documented: the profiler reports no size for a tensor allocated before it started, so
    # a 16 MiB temporary after a 32 MiB earlier tensor went counts in full.
    earlier = torch.ones(32 << 18)
    with peak_cpu_memory() as peak:
        del earlier
        temporary = torch.ones(16 << 18)
        del temporary
    assert 16 << 20 <= peak.increase <= (16 << 20) + 4096, peak


def test_peak_cpu_memory_sees_compiled_code():
    # Inductor fuses sin -> mul -> cos -> sum into one loop without intermediates; a dispatch
    # mode (which makes Dynamo run the function eagerly) would report eager's two 16 MiB ones.
    def f(x):
        return (x.sin() * 2).cos().sum()

    compiled = torch.compile(f)
    x = torch.randn(4 << 20)
    compiled(x)
    with peak_cpu_memory() as fused:
        compiled(x)
    with peak_cpu_memory() as eager:
        f(x)
    assert eager.increase >= 2 * x.nbytes
    assert fused.increase < 4096, fused


def test_cio_formulas_on_small_numbers():
    # c=2, m=3, d=4: dense 2·3 + (9+3)·4/2 = 30; partial (2·3 + (9+3)·4)/2 = 27
    assert cio_dense_block(2, 3, 4) == 30
    assert cio_partial_dense_block(2, 3, 4) == 27
    # pdb-cpu's block: c=128, m=6, d=32
    assert cio_partial_dense_block(128, 6, 32) == (768 + 42 * 32) / 2
    assert cio_bytes(27, 2, 3, 4) == 27 * 24 * 4
    assert cio_bytes(27, 2, 3, 4, torch.bfloat16) == 27 * 24 * 2


def test_format_bytes():
    assert format_bytes(None) == "-"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 1024 * 1024 / 2) == "1.5 MiB"


@pytest.mark.parametrize("meter", [TrafficCounter, SavedTensorsMeter])
def test_a_meter_is_active_once_at_a_time(meter):
    """Nesting one instance would count twice (TrafficCounter did: 2x the bytes), and leaving one
    that is not active raised torch's internal assert or an IndexError: both are named now;
    entering again after leaving adds to what it measured."""
    m = meter()
    with pytest.raises(RuntimeError, match=f"this {meter.__name__} is already active"):
        with m:
            with m:
                pass
    with pytest.raises(RuntimeError, match=f"this {meter.__name__} is not active"):
        m.__exit__(None, None, None)
    ys, measured = [], []
    for _ in range(2):
        with m:
            x = torch.randn(64, requires_grad=True)  # a new storage each time: the meter counts storages once
            ys.append(x * x)
        measured.append(m.total if meter is TrafficCounter else m.bytes)
    assert measured[1] == 2 * measured[0] > 0
