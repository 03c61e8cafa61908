"""What the compiled extension contains, and backend selection."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import csp_kernels
from csp_kernels import backend


def test_extension_is_loaded_with_cpu_kernels():
    info = csp_kernels.build_info()
    assert info["loaded"], info["import_error"]
    assert info["cpu"] is True
    assert info["torch_version"] == torch.__version__.split("+")[0]


def test_cuda_build_matches_what_the_machine_allows():
    info = csp_kernels.build_info()
    if os.environ.get("CSP_KERNELS_REQUIRE_CUDA_BUILD") == "1":  # CI: CUDA torch + nvcc present
        assert info["cuda"], f"CUDA sources were not compiled: {info['cuda_skipped_reason']}"
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_version"], info
        assert info["cuda_skipped_reason"] == ""
    elif torch.version.cuda is None:
        assert "without CUDA" in info["cuda_skipped_reason"]
    elif shutil.which("nvcc") and os.environ.get("CSP_KERNELS_SKIP_CUDA") != "1":
        pytest.fail(f"torch has CUDA and nvcc is on PATH, but CUDA was skipped: {info['cuda_skipped_reason']}")


def test_cuda_backend_unavailable_without_gpu_says_why():
    if torch.cuda.is_available():
        assert "cuda" in csp_kernels.available_backends("cuda")
        return
    with csp_kernels.use_backend("cuda"), pytest.raises(csp_kernels.BackendUnavailable, match="cuda"):
        backend.resolve_backend(torch.device("cpu"))
    with csp_kernels.use_backend("cpu"), pytest.raises(csp_kernels.BackendUnavailable, match="CPU tensors"):
        backend.resolve_backend(torch.device("cuda"))


def test_auto_picks_the_compiled_cpu_backend_on_cpu():
    assert backend.resolve_backend(torch.device("cpu")) == "cpu"


def test_use_backend_nests_and_restores():
    with csp_kernels.use_backend("reference"):
        assert backend.requested_backend() == "reference"
        with csp_kernels.use_backend("cpu"):
            assert backend.resolve_backend(torch.device("cpu")) == "cpu"
        assert backend.resolve_backend(torch.device("cpu")) == "reference"
    assert backend.requested_backend() == "auto"


def test_use_backend_blocks_exited_out_of_order_remove_their_own_entry():
    outer, inner = csp_kernels.use_backend("reference"), csp_kernels.use_backend("cpu")
    outer.__enter__(), inner.__enter__()
    outer.__exit__(None, None, None)  # the "reference" block ends; the "cpu" one is still open
    assert backend.requested_backend() == "cpu"
    inner.__exit__(None, None, None)
    assert backend.requested_backend() == "auto"


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert backend.resolve_backend(torch.device("cpu")) == "reference"
    for bad in ("fastest", "CPU", " cpu"):  # named as the variable it came from
        monkeypatch.setenv(backend.ENV_VAR, bad)
        with pytest.raises(ValueError, match=f"CSP_KERNELS_BACKEND must be one of .* or unset; got {bad!r}"):
            backend.resolve_backend(torch.device("cpu"))
    monkeypatch.setenv(backend.ENV_VAR, "")  # empty: unset
    assert backend.requested_backend() == "auto"


def _triton_backend_in_fresh_process(env_before: str | None, env_after: str | None) -> str:
    """What `why_unavailable("triton", cpu)` says, then what a triton-backend ConvBNAct does, in a
    fresh process where TRITON_INTERPRET is `env_before` when triton is imported and `env_after`
    once csp_kernels is (None: unset)."""
    script = textwrap.dedent(f"""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        if {env_before!r} is not None:
            os.environ["TRITON_INTERPRET"] = {env_before!r}
        import triton
        os.environ.pop("TRITON_INTERPRET", None)
        if {env_after!r} is not None:
            os.environ["TRITON_INTERPRET"] = {env_after!r}
        import torch, csp_kernels
        print("reason:", csp_kernels.backend.why_unavailable("triton", torch.device("cpu")))
        try:
            with csp_kernels.use_backend("triton"):
                csp_kernels.ConvBNAct(4, 4, 1)(torch.randn(1, 4, 3, 3))
            print("ran")
        except csp_kernels.backend.BackendUnavailable as err:
            print("unavailable:", err)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("env_before, env_after, expected", [
    (None, None, r"reason: Triton kernels need a CUDA device or TRITON_INTERPRET=1.*\nunavailable:"),
    ("1", "1", r"reason: \nran"),
    ("ON", "ON", r"reason: \nran"),  # what Triton itself reads as on
    (None, "true", r"reason: TRITON_INTERPRET changed after triton was imported.*triton.language.sigmoid"
                   r".*\nunavailable:.*set it before importing triton"),
    ("1", None, r"reason: TRITON_INTERPRET changed.*csp_kernels.triton.activation was defined without it"),
])
def test_triton_backend_needs_gpu_or_interpreter_set_before_import(env_before, env_after, expected):
    pytest.importorskip("triton")  # the CPU-only torch 2.13.0 job has no triton
    if torch.cuda.is_available():
        pytest.skip("on a GPU the triton backend runs CUDA tensors")  # covered by the GPU run
    assert re.search(expected, _triton_backend_in_fresh_process(env_before, env_after), re.S)


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        csp_kernels.use_backend("tpu")  # at the call, before any block is entered
    with pytest.raises(TypeError, match="backend must be a str"):
        with csp_kernels.use_backend(3):
            pass


def test_auto_without_extension_warns_once_and_uses_reference(monkeypatch):
    from csp_kernels import extension
    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "_IMPORT_ERROR", "simulated")
    monkeypatch.setattr(backend, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="reference"):
        assert backend.resolve_backend(torch.device("cpu")) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.resolve_backend(torch.device("cpu")) == "reference"
    with csp_kernels.use_backend("cpu"), pytest.raises(csp_kernels.BackendUnavailable, match="simulated"):
        backend.resolve_backend(torch.device("cpu"))


def test_cpu_gemm_is_chosen_by_measurement():
    """Unpinned, the float32 CPU GEMM is the faster of ours and the BLAS as timed in this process
    (read once, hence a subprocess without CSP_KERNELS_CPU_SGEMM)."""
    env = {k: v for k, v in os.environ.items() if k != "CSP_KERNELS_CPU_SGEMM"}
    code = "import csp_kernels, json; i = csp_kernels.build_info(); print(json.dumps([i['cpu_sgemm'], " \
           "i['cpu_sgemm_reason'], i['cpu_avx512']]))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    choice, reason, avx512 = json.loads(run.stdout.strip().splitlines()[-1])
    if not avx512:
        assert (choice, reason) == ("blas", "this CPU has no AVX-512")
        return
    rates = re.fullmatch(r"measured on the tile GEMMs: avx512 (\d+) vs blas (\d+) GFLOP/s \(one thread\)", reason)
    assert rates, reason
    ours, blas = map(int, rates.groups())
    assert min(ours, blas) > 0
    assert choice == ("avx512" if ours > blas else "blas") or ours == blas


def test_a_renamed_variable_warns(monkeypatch):
    from csp_kernels.checks import env_choice
    monkeypatch.setenv("CSP_KERNELS_OLD_NAME", "fused")
    with pytest.warns(UserWarning, match="CSP_KERNELS_OLD_NAME is now CSP_KERNELS_NEW_NAME; .* is ignored"):
        assert env_choice("CSP_KERNELS_NEW_NAME", ("eager", "fused"), "eager",
                          renamed_from="CSP_KERNELS_OLD_NAME") == "eager"


def test_available_backends_names_a_bad_device():
    for bad in (None, 5):
        with pytest.raises(TypeError, match="device must be a torch.device or a str"):
            csp_kernels.available_backends(bad)
    with pytest.raises(ValueError, match="device must name a device such as 'cpu'"):
        csp_kernels.available_backends("bogus")
    assert "reference" in csp_kernels.available_backends(torch.device("cpu"))
