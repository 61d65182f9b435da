"""`auto` precision resolves by capability, and an explicit value always wins."""

from __future__ import annotations

import pytest

from store import hardware
from store.hardware import (compute_dtype, cpu_flags, cpu_hardware, cuda_hardware, detect, sample_precision,
                            train_precision, train_processes)

AVX2 = {"sse4_2", "avx", "avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
AMX = AVX512_BF16 | {"amx_bf16", "amx_tile", "amx_int8"}

# (hardware, encoder compute dtype, train precision, sample precision) under "auto"
CASES = {
    "avx2-only cpu": (cpu_hardware(AVX2, {}), "float32", "32-true", "fp32"),
    "avx512 cpu without bf16": (cpu_hardware(AVX512, {}), "float32", "32-true", "fp32"),
    # Native bf16: bf16 for the encoders and sampling, fp32 for training, AMX or not (measured).
    "avx512-bf16 cpu": (cpu_hardware(AVX512_BF16, {}), "bfloat16", "32-true", "bf16"),
    "amx cpu": (cpu_hardware(AMX, {}), "bfloat16", "32-true", "bf16"),
    "amx cpu capped to avx2 by oneDNN": (cpu_hardware(AMX, {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
                                         "float32", "32-true", "fp32"),
    "amx cpu capped to avx2 by ATen": (cpu_hardware(AMX, {"ATEN_CPU_CAPABILITY": "avx2"}),
                                       "float32", "32-true", "fp32"),
    "amx cpu, oneDNN cap that keeps bf16 but not AMX": (
        cpu_hardware(AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}), "bfloat16", "32-true", "bf16"),
    "amx cpu, oneDNN cap that keeps AMX": (cpu_hardware(AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}),
                                           "bfloat16", "32-true", "bf16"),
    "unknown cpu (no flags)": (cpu_hardware(set(), {}), "float32", "32-true", "fp32"),
    "ampere gpu": (cuda_hardware("A100", True, (8, 0)), "bfloat16", "bf16-mixed", "bf16"),
    # Older GPUs: fp16 autocast trains and samples fast; the frozen LLM stays fp32 (outliers).
    "volta gpu": (cuda_hardware("V100", False, (7, 0)), "float32", "16-mixed", "fp16"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_auto_resolves_by_capability(case):
    hardware, encoder, train, sample = CASES[case]
    assert compute_dtype("auto", hardware, frozen_llm=True) == encoder
    assert train_precision("auto", hardware) == train
    assert sample_precision("auto", hardware) == sample


@pytest.mark.parametrize("case", ["avx2-only cpu", "amx cpu", "volta gpu"])
def test_an_explicit_value_wins_over_the_hardware(case):
    hardware = CASES[case][0]
    assert compute_dtype("bfloat16", hardware, frozen_llm=True) == "bfloat16"
    assert compute_dtype("float32", hardware) == "float32"
    assert train_precision("bf16-mixed", hardware) == "bf16-mixed"
    assert train_precision("32-true", hardware) == "32-true"
    assert sample_precision("fp32", hardware) == "fp32"


def test_the_cap_is_named_in_the_description():
    described = cpu_hardware(AMX, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "Xeon").describe()
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in described and "no native bf16" in described


def test_detect_on_this_machine_agrees_with_its_cpu_flags(monkeypatch):
    for key in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(key, raising=False)
    hardware = detect("cpu")
    assert hardware.device == "cpu"
    assert hardware.native_bf16 == bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("cores, batch, expected", [
    (2, 16, 2),  # the demo: two 1-thread processes, 8 rows each
    (2, 8, 1),  # 4 rows each would be too few
    (16, 16, 2),  # a big CPU: still at least 8 rows a process
    (16, 64, 8),
    (4, 24, 3),  # the largest count that divides the batch
    (4, 20, 2),
    (1, 16, 1),
])
def test_auto_processes_on_a_cpu(monkeypatch, cores, batch, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "usable_cpus", lambda: cores)
    assert train_processes("auto", batch, cpu_hardware(AVX512_BF16, {})) == expected


def test_auto_processes_leave_the_threads_to_a_caller_that_set_them(monkeypatch):
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # train.matrix: one job per core
    assert train_processes("auto", 64, cpu_hardware(AVX2, {})) == 1
    assert train_processes(2, 64, cpu_hardware(AVX2, {})) == 2  # an explicit number wins
