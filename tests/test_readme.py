"""The README's Python examples run as written, in order and in one namespace as a reader
would run them (documentation that cannot rot)."""
import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_readme_examples_run():
    assert len(BLOCKS) >= 3
    namespace = {}
    for index, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    assert tuple(namespace["y"].shape) == (8, 320, 56, 56)
    assert [tuple(t.shape) for t in namespace["fused_levels"]] == [(2, 64, 40, 40), (2, 64, 20, 20), (2, 64, 10, 10)]
    assert namespace["buf"].grad_fn is not None  # both ConvBNActs wrote into it with autograd
    (eager_saved, eager_traffic, eager_peak), (fused_saved, fused_traffic, fused_peak) = (
        namespace["measured"]["eager"], namespace["measured"]["fused"])  # "Measure memory and traffic"
    assert 0 < fused_saved < eager_saved and 0 < fused_traffic < eager_traffic
    if sys.platform == "linux":  # peak_cpu_memory reads /proc; elsewhere it gives None
        assert eager_peak > 0 and fused_peak > 0
