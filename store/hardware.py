"""What the machine runs fast: the `auto` precision (thread defaults: store/cli.py).

Precision is chosen by *capability*, not by a timed probe: a probe is noisy on a busy
2-core machine (the very case it must get right) and costs a second at every start,
while the capability is a fact the CPU and driver report.

- CUDA: bf16 where `torch.cuda.is_bf16_supported()` (Ampere and later); else fp16
  autocast for the trainer and the sampler, and fp32 for the frozen LLMs (their outlier
  activations come within 3x of fp16's range already at 135M parameters: docs/FACTS.md).
- CPU: bf16 only with AVX512-BF16 or AMX (`avx512_bf16` / `amx_bf16` in the CPU flags),
  and only if oneDNN and ATen are not capped below those ISAs by `ONEDNN_MAX_CPU_ISA` /
  `ATEN_CPU_CAPABILITY` (the way to mimic an AVX2-only CPU on a fast one). Elsewhere fp32:
  on an AVX2-only CPU torch's bf16 matmul is about 100x slower than fp32 (docs/BENCHMARKS.md).
  Training (`train_precision`) is fp32 on every CPU: the models a CPU trains are small, and
  their training step was faster in fp32 on each CPU kind measured, AMX included
  (docs/BENCHMARKS.md, "Precision").

A value set explicitly in a config always wins; `auto` is resolved once, at the start of
a run, printed, and recorded (the cache's encoder records, the run's model.json).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# oneDNN ISA names from least to most capable; bf16 dot products need AVX512_CORE_BF16 or later.
_ONEDNN_ISAS = ["SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX",
                "AVX512_CORE_AMX", "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16"]
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

# Trainer precision (Lightning) and sampler autocast for each compute dtype.
TRAIN_PRECISION = {"bfloat16": "bf16-mixed", "float16": "16-mixed", "float32": "32-true"}
SAMPLE_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class Hardware:
    """One device as far as precision is concerned."""

    device: str  # "cpu" or "cuda"
    name: str  # CPU model or GPU name
    native_bf16: bool
    fp16_ok: bool  # fp16 autocast is fast here (CUDA)
    capability: str  # what decided it, for the run's log and metadata

    def describe(self) -> str:
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        return f"{self.device} ({self.name}): {self.capability}, {bf16}"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def cpu_hardware(flags: set[str], env: dict[str, str], name: str = "cpu") -> Hardware:
    """The CPU's precision capability from its flags and the ISA caps in `env`."""
    have = sorted(f for f in _BF16_FLAGS if f in flags)
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "below avx2"
    capability = f"{isa}{''.join(' + ' + f for f in have)}"
    caps = []
    onednn = env.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if onednn in _ONEDNN_ISAS and _ONEDNN_ISAS.index(onednn) < _ONEDNN_ISAS.index("AVX512_CORE_BF16"):
        caps.append(f"ONEDNN_MAX_CPU_ISA={onednn}")
    aten = env.get("ATEN_CPU_CAPABILITY", "").lower()
    if aten and not aten.startswith("avx512"):
        caps.append(f"ATEN_CPU_CAPABILITY={aten}")
    if caps:
        capability += f", capped by {' '.join(caps)}"
    return Hardware("cpu", name, native_bf16=bool(have) and not caps, fp16_ok=False, capability=capability)


def cuda_hardware(name: str, bf16_supported: bool, compute_capability: tuple[int, int]) -> Hardware:
    major, minor = compute_capability
    return Hardware("cuda", name, native_bf16=bf16_supported, fp16_ok=True, capability=f"sm_{major}{minor}")


def detect(device: str = "cpu") -> Hardware:
    """The hardware behind `device` ("cpu", "cuda", "cuda:1", "auto", "gpu")."""
    import torch

    if device.startswith(("cuda", "gpu", "auto")) and torch.cuda.is_available():
        index = torch.device(device).index if device.startswith("cuda") else None
        index = torch.cuda.current_device() if index is None else index
        return cuda_hardware(torch.cuda.get_device_name(index), torch.cuda.is_bf16_supported(),
                             torch.cuda.get_device_capability(index))
    return cpu_hardware(cpu_flags(), dict(os.environ), cpu_model())


def compute_dtype(requested: str, hardware: Hardware, *, frozen_llm: bool = False) -> str:
    """"bfloat16" / "float16" / "float32" for `requested` ("auto" or one of those).

    `frozen_llm`: a prompt encoder; fp16 is never chosen for it (activation outliers).
    """
    if requested != "auto":
        return requested
    if hardware.native_bf16:
        return "bfloat16"
    if hardware.fp16_ok and not frozen_llm:
        return "float16"
    return "float32"


def train_precision(requested: str, hardware: Hardware) -> str:
    """A Lightning precision string; `auto` follows `compute_dtype` on a GPU, and is 32-true on a CPU.

    Decided by capability, not by model size or a timed probe: bf16-mixed autocast casts every
    weight at every step, which the small models a CPU trains do not earn back. Measured with
    `bench/train.py --precision-only`, the default model trained faster in fp32 on every CPU kind
    (docs/BENCHMARKS.md, "Precision"): 1.35x on an AMX Xeon, about 1.1x with AVX512-BF16 alone, and
    bf16 is about 100x slower without native bf16. A probe would be noisy on a busy 2-core
    machine, the very case it must get right; a model large enough for bf16 to pay trains on a GPU."""
    if requested != "auto":
        return requested
    if hardware.device == "cpu":
        return TRAIN_PRECISION["float32"]
    return TRAIN_PRECISION[compute_dtype("auto", hardware)]


def sample_precision(requested: str, hardware: Hardware) -> str:
    """The sampler's autocast: "bf16", "fp16" or "fp32"."""
    return requested if requested != "auto" else SAMPLE_PRECISION[compute_dtype("auto", hardware)]


# A CPU process's share of the batch below which its matmuls get too small to pay.
MIN_ROWS_PER_CPU_PROCESS = 8


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def train_processes(requested: int | str, batch_size: int, hardware: Hardware) -> int:
    """How many DDP processes share each training batch; an explicit number wins.

    `auto`: one per GPU on CUDA. On a CPU, one single-thread process per usable core, up to
    one per MIN_ROWS_PER_CPU_PROCESS rows of the batch: the default model's small matmuls use
    two threads of one process poorly, and two 1-thread processes at batch 8 each train 1.5x
    the samples per second of one 2-thread process at 16 (docs/BENCHMARKS.md, "Processes").
    One process where OMP_NUM_THREADS is set: the caller has chosen the threads (train.matrix
    runs one job per core that way). Always a divisor of the batch, so every process takes
    the same share."""
    if requested != "auto":
        return int(requested)
    if hardware.device == "cuda":
        import torch

        limit = torch.cuda.device_count()
    elif os.environ.get("OMP_NUM_THREADS"):
        limit = 1
    else:
        limit = min(usable_cpus(), batch_size // MIN_ROWS_PER_CPU_PROCESS)
    return max(n for n in range(1, max(1, limit) + 1) if batch_size % n == 0)
