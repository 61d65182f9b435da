"""The GPU paths, measured on one CUDA device: bf16, SDPA's kernels, and the training step.

Everything runs in one process, side by side, so the ratios compare like with like:
  1. the device and its matmul rates (8192^3 bf16, fp32 without TF32, TF32), the ceilings;
  2. `F.scaled_dot_product_attention` on the default model's attention shapes (self-attention
     over the 8x8 token grid without a mask; cross-attention to a padded text with a key
     mask), forced to each backend (flash, memory-efficient, cuDNN, math): which accept the
     call, forward + backward time, and which kernel the default dispatch ran;
  3. the real Trainer's training step (`make_trainer`: EMA, grad clipping, the data module on
     the real cache) at several batch sizes in bf16-mixed and 32-true: steps/s, samples/s, and
     `train_flops_fraction`, the step's model FLOPs (bench/train.py: step_flops, forward +
     backward, attention included) per second over part 1's matmul rate in that precision.

     With `--compile off reduce-overhead`, part 3 runs each setting eager and compiled
     (`train.compile`; the compile happens in the untimed warm-up steps, so give it enough).

    python bench/gpu.py [--config configs/long-plain.yaml] [--batches 16 64 128] [--steps 60] [--parts 1 2 3]
                        [--compile off reduce-overhead] [--json]

It needs a CUDA device and the config's cache (`make embed`). No test runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.train import measure_side, step_flops  # noqa: E402
from store.config import load_config  # noqa: E402


def cuda_time(fn, repeats: int, warmup: int = 3) -> float:
    """Seconds per call of fn on the current CUDA stream (events, after warm-up)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def matmul_rates(n: int = 8192) -> dict:
    """TFLOP/s of an n^3 matmul in bf16, fp32 (TF32 off) and TF32, on random data."""
    rates = {}
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp32", torch.float32, False),
                              ("tf32", torch.float32, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        rates[name] = 2 * n**3 / cuda_time(lambda: a @ b, repeats=10) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    return rates


def sdpa_backends(batch: int, heads: int, head_dim: int, grid: int, text: int) -> dict:
    """Each SDPA backend on the model's self- and cross-attention shapes, bf16, fwd + bwd."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    def tensors(lq: int, lk: int):
        q = torch.randn(batch, heads, lq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(batch, heads, lk, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        return q, k, v

    lengths = torch.randint(text // 4, text + 1, (batch,), device="cuda")
    key_mask = torch.arange(text, device="cuda")[None, :] < lengths[:, None]  # [B, Lk], True = real
    cases = {"self_no_mask": (tensors(grid, grid), None),
             "cross_key_mask": (tensors(grid, text), key_mask[:, None, None, :])}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    out = {}
    for case, ((q, k, v), mask) in cases.items():
        def step():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

        row = {}
        for name, backend in backends.items():
            try:
                with sdpa_kernel(backend):
                    row[name] = {"ms": 1000 * cuda_time(step, repeats=20)}
            except RuntimeError as err:  # the backend refuses these inputs
                row[name] = {"error": str(err).splitlines()[0][:160]}
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = sorted({e.key for e in prof.key_averages() if any(
            w in e.key.lower() for w in ("flash", "fmha", "efficient", "cudnn", "attention", "sdpa"))})
        row["default"] = {"ms": 1000 * cuda_time(step, repeats=20), "kernels": kernels[:6]}
        out[case] = row
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/long-plain.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--precisions", nargs="+", default=["bf16-mixed", "32-true"])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], help="which parts to run")
    parser.add_argument("--compile", nargs="+", default=["off"], help="part 3: train.compile modes to compare")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device", file=sys.stderr)
        return 2
    started = time.time()
    props = torch.cuda.get_device_properties(0)
    results = {"device": torch.cuda.get_device_name(0), "capability": f"sm_{props.major}{props.minor}",
               "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
               "cuda": torch.version.cuda, "bf16_supported": torch.cuda.is_bf16_supported()}
    print(f"gpu: {results['device']} ({results['capability']}), torch {results['torch']}, CUDA {results['cuda']}")

    # the ceilings: part 3's fraction needs them, so they are measured whatever --parts says
    results["matmul_tflops"] = rates = matmul_rates()
    print("1. matmul 8192^3, TFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    config = load_config(args.config)
    if 2 in args.parts:
        model = config.model
        grid = (config.data.height // model.patch) * (config.data.width // model.patch)
        text = max(e.max_tokens for e in config.encoders) + 25  # the caption plus an instruction prefix
        results["sdpa"] = sdpa_backends(128, model.heads, model.dim // model.heads, grid, text)
        print(f"2. SDPA, bf16, batch 128, {model.heads} heads of {model.dim // model.heads}, fwd + bwd (ms):")
        for case, row in results["sdpa"].items():
            cells = [f"{k} {v['ms']:.3f}" if "ms" in v else f"{k} refused" for k, v in row.items()]
            print(f"   {case}: " + ", ".join(cells) + f"; default ran {row['default']['kernels']}")
    if 3 in args.parts:
        train_steps(args, rates, results)
    results["seconds"] = time.time() - started
    print(f"bench/gpu.py: {results['seconds']:.0f} s")
    if args.json:
        print(json.dumps(results))
    return 0


def train_steps(args, rates: dict, results: dict) -> None:
    print("3. the Trainer's training step on the cache (steps/s, samples/s, train_flops_fraction):")
    results["train_step"] = []
    for batch in args.batches:
        flops = step_flops(load_config(args.config, [f"train.batch_size={batch}"]))
        for precision in args.precisions:
            for mode in args.compile:
                overrides = (f"train.batch_size={batch}", f"train.precision={precision}", "train.accelerator=gpu",
                             f"train.compile={mode}")
                try:
                    side = measure_side(args.config, "cached", args.steps, args.warmup, overrides)
                except Exception as err:  # a compile mode that fails here is a result too
                    results["train_step"].append({"batch": batch, "precision": precision, "compile": mode,
                                                  "error": f"{type(err).__name__}: {str(err)[:300]}"})
                    print(f"   batch {batch:4d} {precision:>10} compile {mode:>15}: failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''}", flush=True)
                    continue
                steps_per_s = side["samples_per_s"] / batch
                rate = rates["bf16"] if precision.startswith("bf16") else rates["fp32"]
                row = {"batch": batch, "precision": precision, "compile": mode, "steps_per_s": steps_per_s,
                       "samples_per_s": side["samples_per_s"], **flops,
                       "train_flops_fraction": flops["step_flops"] * steps_per_s / (rate * 1e12)}
                results["train_step"].append(row)
                print(f"   batch {batch:4d} {precision:>10} compile {mode:>15}: {steps_per_s:6.1f} steps/s, "
                      f"{side['samples_per_s']:8.0f} samples/s, {flops['step_flops'] / 1e9:.1f} GFLOP/step, "
                      f"fraction {row['train_flops_fraction']:.4f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
