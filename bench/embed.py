"""Benchmark of stage 1's prompt encoder (SmolLM2-135M, layer -3) on shapes captions.

Measured side by side in one run, in this order:
  1. naive: one caption at a time, instruction + caption as one string, the full causal LM
     in fp32 with every hidden state and the LM head;
  0. precision: compute_dtype "auto" against float32 and bfloat16 (`auto_over_best_fixed`);
  2. ours: `PromptEncoder.encode` ("auto" dtype, prefix KV reuse, stopped at the layer, length-sorted
     batches), and its speedup over naive;
  3. ablation: from naive, add one optimisation at a time (batching, auto dtype, stop at the layer,
     prefix reuse) and print each step's gain;
  4. ours' tokens/s and FLOP rate against this CPU's 2048x2048 matmul rate;
  5. bytes per caption on disk: the real job's Lance cache against a naive padded fp32 cache;
  6. the Ray encoding path with 2 actors x 1 thread over 1 actor x 1 thread;
  7. the same path beside one spinning process over idle (`busy_neighbour_ratio`);
  8. the vLLM backend over the transformers backend (`vllm_over_transformers`), run by
     bench/vllm.py in .venv-vllm when it exists.

    python bench/embed.py [--n 2000] [--n-naive 200] [--n-ablation 500] [--n-store 500]
                          [--n-precision 256] [--precision-repeats 3] [--precision-only] [--n-busy 1000] [--n-vllm 512] [--json]
(about 4 minutes at these defaults on an idle 2-core CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# `python bench/embed.py` puts bench/ first on sys.path, where this file would shadow the
# `embed` package, here and (Ray copies the script's folder) in every Ray worker.
BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [str(BENCH_DIR.parent)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
for key, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("RAY_USAGE_STATS_ENABLED", "0"),
                   ("OMP_WAIT_POLICY", "PASSIVE")):  # as store/cli.py sets for every command
    os.environ.setdefault(key, value)

import lance  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import ray.data  # noqa: E402,F401  (its loggers exist before they are quieted)
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from embed.encoder import PromptEncoder, _convert_gguf, resolve_model_path  # noqa: E402
from embed.job import TextEncodeStage, pipeline_schema, run_embed, start_ray  # noqa: E402
from embed.shapes import make_scene  # noqa: E402
from store.config import Config, load_config, validate  # noqa: E402
from bench.threads import busy_neighbour, matmul_gflops  # noqa: E402
from bench.train import in_own_process, rotated  # noqa: E402
from store.hardware import detect  # noqa: E402
from store.writer import CONSTANTS_FILE, SAMPLES, WRITE_OPTIONS  # noqa: E402

CONFIG = "configs/default.yaml"
BATCH = 64


def rate(fn, n: int) -> float:
    """Items per second of `fn()` over `n` items (after a short warm-up by the caller)."""
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def smollm2_config(overrides: list[str]) -> Config:
    """The default recipe restricted to its SmolLM2 encoder."""
    config = load_config(CONFIG, overrides)
    config = dataclasses.replace(config, encoders=[e for e in config.encoders if e.name == "smollm2"])
    validate(config)
    return config


def padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask (1 = a real token), both [B, L]."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


def length_sorted_batches(rows: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    rows = sorted(rows, key=len)  # as PromptEncoder.encode does: little padding per batch
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


# -- 1. naive ---------------------------------------------------------------------------------

@torch.inference_mode()
def naive_encode(full, tokenizer, instruction: str, captions: list[str], layer: int) -> list[torch.Tensor]:
    """What a first script does: one joint prompt per caption, every hidden state, the LM head."""
    out = []
    for caption in captions:
        inputs = tokenizer(f"{instruction} {caption}", return_tensors="pt")
        hidden = full(**inputs, output_hidden_states=True).hidden_states  # 31 x [1, P + n, D]
        out.append(hidden[layer][0])
    return out


# -- 3. ablation: prefix + caption rows in batches, no prefix reuse ---------------------------

@torch.inference_mode()
def batched(forward, rows: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """Length-sorted padded batches through `forward(ids, mask) -> [B, L, D]`; [n_i, D] per row."""
    out = []
    for batch in length_sorted_batches(rows, BATCH):
        ids, mask = padded(batch, pad_id)
        hidden = forward(ids, mask)  # [B, L, D]
        out += [hidden[i, : len(r)] for i, r in enumerate(batch)]
    return out


# -- 5. bytes per caption ---------------------------------------------------------------------

def disk_bytes(path: Path) -> int:
    """Apparent size of a file or folder (`du -sb`)."""
    return sum(p.stat().st_size for p in [path, *path.rglob("*")] if p.is_file())


def stored_bytes(n_store: int, prefix_len: int, hidden: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = smollm2_config([f"run_dir={tmp}", f"data.num_train={n_store}", "data.num_eval=0"])
        summary = run_embed(config, progress=False)
        if summary.written != n_store:
            raise RuntimeError(f"the embed job wrote {summary.written} of {n_store} rows: {summary}")
        cache = config.cache_path
        constants = disk_bytes(cache / CONSTANTS_FILE)
        samples = lance.dataset(str(cache / SAMPLES))
        # A row also holds the caption, its truth and the 32x32 pixels, which a naive text cache
        # has not: rewrite the text columns alone, in the same format, to compare like with like.
        text = samples.to_table(columns=[f"smollm2__{c}" for c in ("ids", "states", "ntok", "truncated")])
        lance.write_dataset(text, f"{tmp}/text_only.lance", **WRITE_OPTIONS)
        ntok = text.column("smollm2__ntok").to_pylist()
        result = {"bytes_per_row_ours": (disk_bytes(cache / SAMPLES) + constants) / n_store,
                  "bytes_per_caption_ours": (disk_bytes(Path(tmp) / "text_only.lance") + constants) / n_store,
                  # fp32 states, padded to the longest caption, the prefix repeated in every row
                  "bytes_per_caption_naive": (prefix_len + max(ntok)) * hidden * 4,
                  "mean_caption_tokens": sum(ntok) / len(ntok), "max_caption_tokens": max(ntok)}
    return result


# -- 6. actor scaling -------------------------------------------------------------------------

# Ray actors are driven directly, not through a Ray Data pipeline: with 2 cores, Ray Data's read
# tasks and its lazy actor-pool start-up would share the clock with the encoders, and the
# time from the first output would depend on its scheduling. Each actor is the job's own
# TextEncodeStage (1 thread), warmed up before timing, fed the job's batches of 64 round-robin.
def ray_captions_per_s(captions: list[str], actors: int, threads: int = 1) -> float:
    config = smollm2_config([f"embed.threads_per_actor={threads}", f"embed.actors={actors}"])
    schema = pipeline_schema(config.encoders)
    stage = ray.remote(num_cpus=threads)(TextEncodeStage)
    pool = [stage.remote(config) for _ in range(actors)]

    def table(chunk: list[str]) -> pa.Table:
        return pa.Table.from_pylist([{"id": str(i), "caption": c} for i, c in enumerate(chunk)], schema=schema)

    ray.get([a.__call__.remote(table(captions[:BATCH])) for a in pool])  # model load + warm-up
    batches = [table(captions[i : i + BATCH]) for i in range(0, len(captions), BATCH)]

    def run() -> None:
        results = ray.get([pool[i % actors].__call__.remote(b) for i, b in enumerate(batches)])
        assert sum(t.num_rows for t in results) == len(captions)

    speed = rate(run, len(captions))
    for a in pool:
        ray.kill(a)
    return speed


def precision_one(enc_config, dtype: str, captions: list[str]) -> tuple[float, str]:
    """In a fresh process: PromptEncoder.encode captions/s with compute_dtype `dtype`, and what it ran in."""
    transformers.utils.logging.disable_progress_bar()  # the spawned process has not heard main()'s settings
    transformers.utils.logging.set_verbosity_error()
    encoder = PromptEncoder(dataclasses.replace(enc_config, compute_dtype=dtype))
    encoder.encode(captions[:BATCH], batch_size=BATCH)
    return rate(lambda: encoder.encode(captions, batch_size=BATCH), len(captions)), encoder.compute_dtype_name


def precision_cps(enc_config, dtypes: tuple[str, ...], captions: list[str], repeats: int) -> dict:
    """{dtype: (best captions/s over `repeats` runs, what it ran in)}.

    Each run builds its encoder in its own spawned process (as bench/train.py's part 5), the
    settings take turns in rotating order, and each keeps its best: "auto" and the fixed dtype
    it resolves to are the same computation, so their ratio is 1 but for noise. (Timed side
    by side in one process, the "auto" encoder, built first, ran at 0.91 of the fixed dtype
    it resolves to, natively and under the AVX2 mimic alike: docs/BENCHMARKS.md.)"""
    best: dict[str, tuple[float, str]] = {}
    for round_ in range(repeats):
        for dtype in rotated(dtypes, round_):
            speed, ran = in_own_process(precision_one, enc_config, dtype, captions)
            print(f"   (round {round_ + 1}: compute_dtype={dtype} {speed:.1f} captions/s)", flush=True)
            best[dtype] = max(best.get(dtype, (0.0, ran)), (speed, ran))
    return {d: best[d] for d in dtypes}


# -- the run ----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="captions for ours, tokens/s and the Ray part")
    parser.add_argument("--n-naive", type=int, default=200, help="captions for the (slow) naive loop")
    parser.add_argument("--n-ablation", type=int, default=500, help="captions for each ablation step")
    parser.add_argument("--n-store", type=int, default=500, help="rows the real embed job writes")
    parser.add_argument("--n-precision", type=int, default=256,
                        help="captions per precision (bf16 on an AVX2-only CPU: ~5 captions/s)")
    parser.add_argument("--precision-only", action="store_true", help="part 0 only, then the JSON line")
    parser.add_argument("--precision-repeats", type=int, default=3, help="alternating rounds in part 0 (best kept)")
    parser.add_argument("--n-busy", type=int, default=1000, help="captions per busy-neighbour measurement")
    parser.add_argument("--n-vllm", type=int, default=512, help="captions per backend in the vLLM comparison")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    started = time.perf_counter()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray forks its helpers before this process opens any Lance dataset, so it is safe here.
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    torch.set_num_threads(2)
    results: dict = {**{k: v for k, v in vars(args).items() if k != "json"}, "load_average": os.getloadavg()[0]}
    if results["load_average"] > 0.5:  # measured: beside one busy process, 2 threads ran 25x slower than 1
        print(f"warning: load average {results['load_average']:.1f}: 2-thread timings collapse on a busy CPU; "
              "run on an idle machine", flush=True)

    def report(label: str, key: str, value: float, unit: str, note: str = "") -> None:
        results[key] = value
        print(f"{label:<50} {value:>12,.2f} {unit:<11} {note}".rstrip(), flush=True)

    captions = [make_scene(0, i)["caption"] for i in range(max(args.n, args.n_naive, args.n_ablation))]
    enc_config = smollm2_config([]).encoders[0]
    encoder = PromptEncoder(enc_config)
    folder = _convert_gguf(resolve_model_path(enc_config.path), Path("~/.cache/lidit/models").expanduser())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    full_fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    auto_dtype = getattr(torch, encoder.compute_dtype_name)  # what "auto" runs here: bf16 or fp32
    full_auto = AutoModelForCausalLM.from_pretrained(folder, dtype=auto_dtype).eval()
    layer, instruction = enc_config.layer, enc_config.instruction.rstrip()
    caption_ids = [encoder.tokenize(c)[0] for c in captions]
    rows = [encoder.prefix_ids + ids for ids in caption_ids]  # [P + n_i] each, no prefix reuse
    print(f"SmolLM2-135M layer {layer}, prefix {len(encoder.prefix_ids)} tokens, captions "
          f"{sum(map(len, caption_ids)) / len(captions):.1f} tokens on average, batch {BATCH}, "
          f"{torch.get_num_threads()} threads")

    # 0. precision: "auto" against each fixed compute dtype, on the same captions.
    hardware = detect("cpu")
    results["cpu"] = hardware.describe()
    print(f"0. precision on {hardware.describe()}")
    measured = precision_cps(enc_config, ("auto", "float32", "bfloat16"), captions[: args.n_precision],
                             args.precision_repeats)
    for dtype, (speed, ran) in measured.items():
        report(f"   compute_dtype={dtype}" + (f" (= {ran})" if dtype == "auto" else ""), f"precision_{dtype}_cps",
               speed, "captions/s", f"(best of {args.precision_repeats} on {args.n_precision} captions)")
        if dtype == "auto":
            results["auto_compute_dtype"] = ran
    report("   auto_over_best_fixed", "auto_over_best_fixed",
           results["precision_auto_cps"] / max(results["precision_float32_cps"], results["precision_bfloat16_cps"]),
           "x", "(goal >= 0.95)")
    if args.precision_only:
        if args.json:
            print(json.dumps(results))
        return

    # 1. naive; its joint tokenisation must give our ids, or the comparison is not like for like.
    sub = captions[: args.n_naive]
    joint = [tokenizer(f"{instruction} {c}")["input_ids"] for c in sub]
    mismatched = sum(j != r for j, r in zip(joint, rows))
    if mismatched:
        raise RuntimeError(f"{mismatched}/{len(sub)} joint tokenisations differ from prefix + caption ids")
    naive_encode(full_fp32, tokenizer, instruction, sub[:2], layer)
    report("1. naive loop, fp32, full LM, all states", "naive_cps", rate(
        lambda: naive_encode(full_fp32, tokenizer, instruction, sub, layer), len(sub)), "captions/s",
        f"(on {len(sub)} captions)")

    # 2. ours
    encoder.encode(captions[:BATCH], batch_size=BATCH)
    report("2. ours: PromptEncoder.encode", "ours_cps",
           rate(lambda: encoder.encode(captions[: args.n], batch_size=BATCH), args.n), "captions/s",
           f"(on {args.n} captions)")
    report("   speedup_vs_naive", "speedup_vs_naive", results["ours_cps"] / results["naive_cps"], "x", "(goal >= 4)")
    reference = naive_encode(full_fp32, tokenizer, instruction, captions[:8], layer)
    ours = encoder.encode(captions[:8])
    error = max(((r[-len(o.ids):] - o.states.float()).norm() / r[-len(o.ids):].norm()).item()
                for r, o in zip(reference, ours))
    report("   ours vs naive caption states, max rel L2", "ours_rel_error", error, "", "(bf16 rounding)")
    if error > 0.05:
        raise RuntimeError(f"ours differs from the naive states by {error:.3f} (rel L2): not the same features")

    # 3. ablation: add one optimisation at a time, on the same captions.
    def full_lm(model):  # every block, every hidden state kept, the LM head run
        return lambda ids, mask: model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]

    def truncated(ids, mask):
        return encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state

    m = args.n_ablation
    steps = [("3a. + batching, length-sorted (fp32, full LM)", "ablation_batched",
              lambda k: batched(full_lm(full_fp32), rows[:k], encoder.pad_id)),
             (f"3b. + auto compute dtype ({encoder.compute_dtype_name})", "ablation_auto_dtype",
              lambda k: batched(full_lm(full_auto), rows[:k], encoder.pad_id)),
             ("3c. + stop at the layer (no last blocks/LM head)", "ablation_truncated",
              lambda k: batched(truncated, rows[:k], encoder.pad_id)),
             ("3d. + prefix KV reuse (= ours)", "ablation_prefix_reuse",
              lambda k: encoder.encode(captions[:k], batch_size=BATCH))]
    previous = results["naive_cps"]
    for label, key, fn in steps:
        fn(BATCH)  # warm-up
        speed = rate(lambda: fn(m), m)
        report(label, f"{key}_cps", speed, "captions/s", f"x{speed / previous:.2f} (on {m} captions)")
        results[f"{key}_gain"], previous = speed / previous, speed
    del full_fp32, full_auto

    # 4. tokens/s against the CPU's matmul rate. Attention scores are left out of the FLOPs
    # (a few % at these lengths); the embedding lookup is not a matmul.
    run_tokens = len(encoder.prefix_ids) + sum(
        len(b) * len(b[-1]) for b in length_sorted_batches(caption_ids[: args.n], BATCH))  # padded, as run
    block_params = sum(p.numel() for p in encoder.model.layers.parameters())
    report("4. ours: tokens run/s (padding, prefix once)", "ours_tokens_per_s",
           run_tokens * results["ours_cps"] / args.n, "tokens/s", f"({block_params / 1e6:.1f}M params in blocks run)")
    report("   ours: GFLOP/s = 2 * params * tokens/s", "ours_gflops",
           2 * block_params * results["ours_tokens_per_s"] / 1e9, "GFLOP/s")
    report("   matmul 2048^2 fp32", "matmul_fp32_gflops", matmul_gflops(torch.float32), "GFLOP/s")
    report("   matmul 2048^2 bf16", "matmul_bf16_gflops", matmul_gflops(torch.bfloat16), "GFLOP/s")
    in_use = "bf16" if auto_dtype == torch.bfloat16 else "fp32"
    report(f"   ours / {in_use} matmul rate (the precision in use)", "fraction_of_matmul",
           results["ours_gflops"] / results[f"matmul_{in_use}_gflops"], "")

    # 5. bytes per caption on disk. One local Ray serves parts 5 and 6: 3 CPUs (2 actors x 1
    # thread, + 1 so the job's read tasks can run); the job reuses it.
    prefix_len, hidden = len(encoder.prefix_ids), encoder.hidden_size
    del encoder
    start_ray(smollm2_config(["embed.actors=2", "embed.threads_per_actor=1"]))
    results.update(stored_bytes(args.n_store, prefix_len, hidden))
    report("5. ours: text columns on disk per caption", "bytes_per_caption_ours",
           results["bytes_per_caption_ours"], "bytes", "(bf16 states + ids; constants amortised)")
    report("   ours: whole Lance row (+ caption, truth, pixels)", "bytes_per_row_ours",
           results["bytes_per_row_ours"], "bytes")
    report(f"   naive: fp32 [{prefix_len} + {results['max_caption_tokens']}, {hidden}] per caption",
           "bytes_per_caption_naive", results["bytes_per_caption_naive"], "bytes")
    report("   naive_bytes_over_ours (text to text)", "naive_bytes_over_ours",
           results["bytes_per_caption_naive"] / results["bytes_per_caption_ours"], "x", "(goal >= 6)")
    report("   naive text bytes over our whole row", "naive_bytes_over_ours_whole_row",
           results["bytes_per_caption_naive"] / results["bytes_per_row_ours"], "x")

    # 6. actor scaling
    report("6. Ray: 1 actor x 1 thread", "ray_1_actor_cps", ray_captions_per_s(captions[: args.n], 1), "captions/s")
    report("   Ray: 2 actors x 1 thread", "ray_2_actors_cps", ray_captions_per_s(captions[: args.n], 2), "captions/s")
    report("   actor_scaling", "actor_scaling", results["ray_2_actors_cps"] / results["ray_1_actor_cps"], "x",
           "(goal >= 1.7)")

    # 7. a busy neighbour: one process spinning (on one core, as the OS places it) beside the
    # encoding path; the default pool (2 actors x 1 thread) and one 2-thread actor, both with
    # OMP_WAIT_POLICY=PASSIVE (start_ray passes it to the workers).
    default = smollm2_config([])
    actors, threads = default.embed.actors, default.embed.threads_per_actor
    sub = captions[: args.n_busy]
    for label, key, a, t in ((f"default pool, {actors} actors x {threads} thread", "default", actors, threads),
                             ("1 actor x 2 threads", "one_actor_two_threads", 1, 2)):
        idle = ray_captions_per_s(sub, a, t)
        with busy_neighbour():
            busy = ray_captions_per_s(sub, a, t)
        report(f"7. {label}: idle", f"{key}_idle_cps", idle, "captions/s")
        report("   beside one spinning process", f"{key}_busy_cps", busy, "captions/s")
        report("   busy / idle", f"{key}_busy_ratio", busy / idle, "x")
    results["busy_neighbour_ratio"] = results["default_busy_ratio"]
    report("   busy_neighbour_ratio (the default pool)", "busy_neighbour_ratio", results["busy_neighbour_ratio"], "x",
           "(goal >= 0.4)")
    ray.shutdown()

    # 8. the vLLM backend against the transformers one, where vLLM runs (bench/vllm.py, in
    # .venv-vllm: vLLM's CPU build needs an older transformers than this environment's)
    vllm_python = BENCH_DIR.parent / ".venv-vllm" / "bin" / "python"
    if vllm_python.exists():
        run = subprocess.run([str(vllm_python), str(BENCH_DIR / "vllm.py"), "--n", str(args.n_vllm), "--json"],
                             cwd=BENCH_DIR.parent, capture_output=True, text=True)
        if run.returncode == 0:
            vllm = json.loads(run.stdout.strip().splitlines()[-1])
            report("8. transformers backend (.venv-vllm)", "transformers_backend_cps",
                   vllm["transformers_captions_per_s"], "captions/s")
            report("   vLLM backend (.venv-vllm)", "vllm_backend_cps", vllm["vllm_captions_per_s"], "captions/s")
            report("   vllm_over_transformers", "vllm_over_transformers", vllm["vllm_over_transformers"], "x")
        else:
            print("8. vLLM backend: bench/vllm.py failed:\n" + run.stderr[-2000:])
    else:
        print("8. vLLM backend: skipped (no .venv-vllm; `make install-vllm`)")
    results["wall_s"] = time.perf_counter() - started
    print(f"total {results['wall_s']:.0f} s")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
