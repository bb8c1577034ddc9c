"""cpu_kernels: every private op, called through the module on a tiny case, matches the portable op
wherever the build and CPU say it exists (a torch upgrade that changes a signature fails here, not
for users); the switch turns every path off; decisions are logged and reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llm_lightning import cpu_kernels

pytestmark = pytest.mark.kernels


def needs(supported: bool, what: str):
    return pytest.mark.skipif(not supported, reason=f"{what} is not on this CPU or build (cpu_kernels says so)")


@needs(cpu_kernels.onednn_supported(torch.float32), "oneDNN fp32")
def test_onednn_linear_matches_f_linear():
    assert cpu_kernels.trial_onednn_linear(), cpu_kernels.trial_onednn_linear().reason
    assert cpu_kernels.trial_onednn_transposed(), cpu_kernels.trial_onednn_transposed().reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_match_f_linear(dtype):
    if not cpu_kernels.onednn_supported(dtype):
        pytest.skip(f"oneDNN {dtype} is not on this CPU or build (cpu_kernels says so)")
    decision = cpu_kernels.trial_pack(dtype)
    assert decision, decision.reason


def test_split_linear_matches_f_linear():
    """Every row count of the vector class, with a bias, through a 3-D input and a weight that is a
    view into a stacked one (as sampling stacks projections); gradients too."""
    assert cpu_kernels.trial_split_linear(), cpu_kernels.trial_split_linear().reason
    stacked, bias = torch.randn(60, 64), torch.randn(48)
    weight = stacked[12:]
    for rows in (1, 3, cpu_kernels.VECTOR_ROWS):
        x = torch.randn(1, rows, 64)
        torch.testing.assert_close(cpu_kernels.split_linear(x, weight, bias, parts=4), F.linear(x, weight, bias),
                                   rtol=1e-5, atol=1e-5)
    weight = weight.clone().requires_grad_()
    x = torch.randn(2, 64)
    cpu_kernels.split_linear(x, weight, parts=2).square().sum().backward()
    torch.testing.assert_close(weight.grad, torch.autograd.grad(F.linear(x, weight).square().sum(), weight)[0])


@needs(cpu_kernels.int8_supported(), "the int8 weight kernel")
def test_int8_kernel_matches_the_dequantized_product():
    decision = cpu_kernels.trial_int8_linear()
    assert decision, decision.reason


@needs(cpu_kernels.int4_supported(), "the int4 CPU kernel")
def test_int4_kernel_matches_the_dequantized_product():
    decision = cpu_kernels.trial_int4_linear()
    assert decision.on, decision.reason


@needs(cpu_kernels.flash_attention_supported(), "the CPU flash-attention kernel")
def test_flash_attention_returns_the_log_sum_exp_of_the_written_out_scores():
    decision = cpu_kernels.trial_flash_attention_with_lse()
    assert decision.on, decision.reason


def test_trial_refuses_a_failing_or_wrong_kernel():
    def fails():
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert\nmore")

    refused = cpu_kernels._trial(fails, torch.bfloat16)
    assert not refused and refused.reason == ("trial failed: mkldnn_reorder_linear_weight: bf16 path needs "
                                             "the cpu support avx_ne_convert")
    wrong = cpu_kernels._trial(lambda: (torch.ones(4) * 1.001, torch.ones(4)), torch.float32)
    assert not wrong and "relative error 1.0e-03" in wrong.reason


def test_a_kernel_is_chosen_only_when_measured_faster(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_LIGHTNING_CACHE", str(tmp_path))
    slow = cpu_kernels._measured("slow", lambda: (lambda: sum(range(20000)), lambda: None))
    assert not slow and slow.reason.endswith("x the portable op")
    fast = cpu_kernels._measured("fast", lambda: (lambda: None, lambda: sum(range(20000))))
    assert fast


@pytest.mark.skipif(not (cpu_kernels.enabled() and cpu_kernels.onednn_supported(torch.float32)),
                    reason="no measured path: fast kernels switched off, or none on this CPU or build")
def test_every_process_on_a_machine_takes_the_speed_the_first_one_measured(tmp_path):
    """Processes that chose differently near the threshold would compute differently in the last
    bits (a resume would not equal the run it continues): the first one's measurement is kept."""
    describe = "from llm_lightning import cpu_kernels as k; print(k.describe())"
    first = run_python(describe, LLM_LIGHTNING_CACHE=str(tmp_path))
    cache = tmp_path / "cpu_kernels.json"
    entries = json.loads(cache.read_text())
    (entry,) = entries.values()
    plain = run_python("from llm_lightning import cpu_kernels as k; print(k.vector_kernel(2048, 1024).name)",
                       LLM_LIGHTNING_CACHE=str(tmp_path)).strip()  # packed's plain side, read from the cache
    matrix = "onednn_fp32_matrix block"
    measured = {matrix, f"packed_fp32 against {plain}", "onednn_fp32_vector 2048x1024"}
    matrix_on = entry[matrix] >= cpu_kernels.MIN_MATRIX_SPEEDUP
    assert measured <= set(entry) and f"onednn_fp32_matrix {'on' if matrix_on else 'off'} ({entry[matrix]:.2f}x" in first
    entry[matrix], entry["onednn_fp32_vector 48x64"], entry["split_fp32_vector 48x64"] = 9.0, 0.5, 0.6
    cache.write_text(json.dumps(entries))
    later = run_python(describe + "; print(k.vector_kernel(48, 64).reason)", LLM_LIGHTNING_CACHE=str(tmp_path))
    assert "onednn_fp32_matrix on (9.00x the portable op)" in later
    split = "split 0.60x" if torch.get_num_threads() > 1 else "split off (one thread)"
    assert later.endswith(f"onednn 0.50x, {split} the portable op\n")
    other_threads = "2" if torch.get_num_threads() == 1 else "1"
    other = run_python(describe, LLM_LIGHTNING_CACHE=str(tmp_path), OMP_NUM_THREADS=other_threads)
    assert "9.00x" not in other and len(json.loads(cache.read_text())) == 2  # another setting, measured anew


def run_python(code: str, **env: str) -> str:
    import os

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_switch_off_turns_every_path_off_and_says_so():
    out = run_python("from llm_lightning import cpu_kernels as k; print(k.describe())",
                     LLM_LIGHTNING_FAST_KERNELS="0")
    assert out.count("off (LLM_LIGHTNING_FAST_KERNELS=0)") == len(cpu_kernels.PATHS), out
    assert out.startswith("[cpu kernels: ") and out.count("\n") == 1


def test_report_names_the_cpu_and_every_path():
    report = cpu_kernels.report()
    assert set(report["kernel_paths"]) == set(cpu_kernels.PATHS)
    assert report["threads"] == torch.get_num_threads() and report["torch_cpu_capability"]
    for decision in report["kernel_paths"].values():
        assert isinstance(decision["on"], bool) and decision["reason"]
    with pytest.raises(KeyError, match="unknown CPU kernel path 'nope'"):
        cpu_kernels.decision("nope")


def test_each_kernel_is_used_only_by_its_decision():
    weight = torch.randn(48, 64)
    chosen = cpu_kernels.vector_kernel(48, 64)
    assert cpu_kernels.linear_function(torch.randn(3, 64), weight) is chosen.function
    assert chosen.name in ("mkl", "onednn", "split") and (chosen.function is F.linear) == (chosen.name == "mkl")
    if chosen.name == "split":  # a transposed view does not split into row blocks
        assert cpu_kernels.linear_function(torch.randn(3, 64), torch.randn(64, 48).t()) is F.linear
    assert cpu_kernels.uses_onednn(torch.randn(64, 64), weight) == bool(cpu_kernels.decision("onednn_fp32_matrix"))
    assert cpu_kernels.linear_function(torch.randn(64, 64, dtype=torch.float64), weight.double()) is F.linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.linear_function(torch.randn(3, 64), weight) is F.linear
    assert cpu_kernels.report()["fp32_vector_shapes"]["48x64"] == {"kernel": chosen.name, "reason": chosen.reason}


@pytest.mark.skipif(not (cpu_kernels.enabled() and cpu_kernels.onednn_supported(torch.float32)),
                    reason="no measured path: fast kernels switched off, or none on this CPU or build")
def test_one_row_products_are_decided_per_weight_shape(tmp_path):
    """Each shape is measured on its own, by every kernel its class decisions let in, and kept per
    machine; the fastest is taken, if it is fast enough."""
    code = ("from llm_lightning import cpu_kernels as k; a = k.vector_kernel(40, 24); "
            "b = k.vector_kernel(24, 40); print(k.decision('onednn_fp32_vector').reason); print(a)")
    out = run_python(code, LLM_LIGHTNING_CACHE=str(tmp_path), OMP_NUM_THREADS="2")
    assert out.splitlines()[0].endswith("measured per weight shape")
    (entry,) = json.loads((tmp_path / "cpu_kernels.json").read_text()).values()
    measured = {f"{kernel}_fp32_vector {shape}" for kernel in ("onednn", "split") for shape in ("40x24", "24x40")}
    assert measured <= set(entry)
    fastest = max(("onednn", "split"), key=lambda kernel: entry[f"{kernel}_fp32_vector 40x24"])
    expected = fastest if entry[f"{fastest}_fp32_vector 40x24"] >= cpu_kernels.MIN_SHAPE_SPEEDUP else "mkl"
    assert f"VectorKernel(name='{expected}'" in out.splitlines()[1]
