"""Stage 2 and stage 1 at the paper's scale on one GPU, side by side, in one short call.

    python bench/gpu_scale.py [--parts 1 2 3] [--levers base checkpointing] [--json]
    python bench/gpu_scale.py --parts 1 --levers foreach compile --json    # the slower levers, a second call
    python bench/gpu_scale.py --smoke [--json]      # every part at tiny sizes on the CPU: ~2 minutes with a
                                                    # cold inductor cache (part 3 compiles), ~15 s warm

0. The ceiling: a dense bf16 n x n matmul (n = 8192), FLOP/s = 2 n^3 / time.
1. LI-DiT-1B's training step (configs/lidit-1b.yaml, 256 px only: 16 x 32 x 32 latents, 256 image
   tokens; batch 32; bf16-mixed) with the real Trainer (bench/train.py: measure_side) on a synthetic
   cache (bench/synthetic_cache.py: two encoders, 4096 wide, 32 prefix + 120 caption tokens).
   Per lever (`--levers`: "base", the config as is; "checkpointing", train.activation_checkpointing;
   "foreach", AdamW's foreach kernel instead of the default; "compile", train.compile: default):
   samples/s, the GPU's peak allocated memory beside the plan's
   (train/plan.py, one GPU, no DDP buckets, the actual 120 caption tokens), and
   train_flops_fraction = step FLOPs x steps/s / part 0's rate. Also: the data loader alone
   (bench/loader.py: rows/s, train.num_workers of the config) and SDPA's cross-attention with a key
   mask against none (a text padded to a fixed length, or packed, needs no mask; flash then runs).
   Step FLOPs, model FLOPs (the recomputation of activation checkpointing not counted), per sample
   x 3 (forward + backward), b rows, N image tokens, T = sum of caption tokens, L_i = P_i + C_i
   tokens and E_i width of encoder i, Lo_i = sum of the other L_j, D width, r mlp_ratio, d depth,
   C latent channels, p patch:
     LI-DiT block   N D^2 (12 + 4r) + 4 T D^2 + 4 N^2 D + 4 N T D + 18 D^2   (q, kv, proj of self-
                    and cross-attention; the scores and values; MLP; adaLN)
     refiner block  L_i (24 D^2) + 4 L_i^2 D + 4 D^2; input projection 2 L_i E_i D
     collaborative  L_i (20 D^2) + 4 Lo_i D^2 + 4 L_i Lo_i D + 12 D^2, per branch
     stem, head     2 N C p^2 D (patches) + 36 N D^2 (the position ResBlock's two 3x3 convs)
                    + 2 N D p^2 C (final Linear) + 2 (256 D + D^2) + 2 D^2 + 4 D^2 (timestep MLP,
                    pooled text, final adaLN)
   and it is checked against torch's FlopCounterMode on one real step (`counted_over_formula`).
2. Stage 1 with a Llama-3-8B-shaped model (transformers LlamaConfig: hidden 4096, 32 layers,
   intermediate 14336, 32 heads / 8 KV heads, vocab 128256; random weights from the config, bf16,
   saved with save_pretrained beside a word-level tokenizer): the project's PromptEncoder
   (embed/encoder.py: the path to the saved model, layer -3 = 30 blocks run, the instruction prefix
   run once and its KV cache reused) against a plain transformers loop (the whole causal LM on
   instruction + caption, `output_hidden_states=True`, hidden_states[-3]) on the same captions of
   120 words (one token each): captions/s, the encoder's speed-up, its fraction of part 0's rate,
   and the rel-L2 of its caption states against the loop's. Encoder FLOPs per caption:
   30 x [2 C (2 h^2 + 2 h h_kv + 3 h m) + 4 h (C P + C^2 / 2)], h = 4096, h_kv = 1024, m = 14336,
   P prefix and C caption tokens (causal attention: the queries of the caption see P + i keys).
3. The default model (configs/default.yaml, 3.7M) on a synthetic cache of its two encoders'
   widths: steps/s eager against `train.compile: reduce-overhead` (CUDA graphs), one process, the
   compile happening in the untimed warm-up steps.
Each part records an error instead of its numbers if it fails, so one call yields what it can.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent  # keep bench/ from shadowing the `train` and `embed` packages
ROOT = BENCH_DIR.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]

from store import cli  # noqa: E402  (first: process defaults before torch loads)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.loader import rows_per_s  # noqa: E402
from bench.synthetic_cache import write_synthetic_cache  # noqa: E402
from bench.train import measure_side, register_cpu_attention_flops  # noqa: E402
from store.config import Config, EncoderConfig, load_config  # noqa: E402
from store.hardware import cpu_model  # noqa: E402
from train.model import TextToImageModel, build_kwargs  # noqa: E402
from train.plan import Shapes, activation_bytes, meta_model, parameter_counts, state_bytes  # noqa: E402

LIDIT_1B, DEFAULT = "configs/lidit-1b.yaml", "configs/default.yaml"
LEVERS = {"base": [], "checkpointing": ["train.activation_checkpointing=true"],
          "foreach": ["train.adamw_kernel=foreach"], "compile": ["train.compile=default"]}


@dataclasses.dataclass
class Size:
    matmul: int
    rows: int  # of the LI-DiT-1B cache
    hidden: int  # encoder width in that cache
    tokens: int  # caption tokens per encoder
    prefix: int
    batch: int
    steps: int
    warmup: int
    workers: int
    model: list[str]  # LI-DiT-1B overrides (none at full size)
    llama: dict  # LlamaConfig of part 2
    captions: int
    encode_batch: int
    default_rows: int
    default_steps: int
    default_warmup: int
    default_model: list[str]


FULL = Size(matmul=8192, rows=1024, hidden=4096, tokens=120, prefix=32, batch=32, steps=20, warmup=5, workers=4,
            model=[], llama=dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
            captions=1024, encode_batch=64, default_rows=2048, default_steps=100, default_warmup=40, default_model=[])
SMOKE = Size(matmul=256, rows=16, hidden=64, tokens=8, prefix=4, batch=4, steps=2, warmup=1, workers=0,
             model=["model.dim=64", "model.depth=2", "model.heads=4"],
             llama=dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1000),
             captions=8, encode_batch=4, default_rows=32, default_steps=2, default_warmup=1,
             default_model=["model.dim=32", "model.depth=1", "model.heads=2"])


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: str, n: int, repeats: int = 10) -> float:
    """Dense bf16 n x n matmul, TFLOP/s (after two untimed products)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b, a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


# -- 1. LI-DiT-1B ------------------------------------------------------------------------------

def lidit_step_flops(s: Shapes, config: Config) -> float:
    """Model FLOPs of one training step (the docstring's formula), forward + backward."""
    N, T, D, r, C, p = s.image_tokens, s.text_tokens, s.dim, s.mlp_ratio, s.latent[0], s.patch
    block = N * D**2 * (12 + 4 * r) + 4 * T * D**2 + 4 * N**2 * D + 4 * N * T * D + 18 * D**2
    lengths = [prefix + caption for _, prefix, caption in s.encoders]
    refiners = 0
    for (width, _, _), L in zip(s.encoders, lengths):
        refiners += 2 * L * width * D + s.refiner_depth * (24 * L * D**2 + 4 * L**2 * D + 4 * D**2)
        others = sum(lengths) - L
        refiners += s.collab_depth * (20 * L * D**2 + 4 * others * D**2 + 4 * L * others * D + 12 * D**2)
    if config.model.pos_conv != "dense":
        raise ValueError("the FLOP formula counts the paper's dense position convs only")
    ends = 2 * N * C * p**2 * D + 36 * N * D**2 + 2 * N * D * p**2 * C + 2 * (256 * D + D**2) + 6 * D**2
    return 3 * s.batch * (s.depth * block + refiners + ends)


def counted_step_flops(config: Config, device: str) -> float:
    """FlopCounterMode over one forward + backward of the config's model on a batch of its cache."""
    from torch.utils.flop_counter import FlopCounterMode

    from store.reader import CacheReader

    register_cpu_attention_flops()
    reader = CacheReader(config.cache_path)
    by_name = {e["name"]: e for e in reader.meta["encoders"]}
    model = TextToImageModel(**build_kwargs(config.model, [by_name[e.name] for e in config.encoders],
                                            reader.meta["codec"])).to(device)
    batch = reader.take(range(config.train.batch_size))
    features = [batch["text"][e.name].states.to(device) for e in config.encoders]
    masks = [batch["text"][e.name].mask.to(device) for e in config.encoders]
    x = batch["latents"].to(device)
    with FlopCounterMode(display=False) as counter, torch.autocast(device, dtype=torch.bfloat16):
        F.mse_loss(model(x, torch.rand(len(x), device=device) * 1000, features, masks).float(), x).backward()
    return counter.get_total_flops()


def checkpointing_reaches_the_model(overrides: list[str]) -> bool:
    """Whether the LightningModule builds its model with train.activation_checkpointing (on the meta device)."""
    from store.reader import CacheReader
    from train.module import LIDiTModule

    config = load_config(LIDIT_1B, [*overrides, "train.activation_checkpointing=true"])
    with torch.device("meta"):
        module = LIDiTModule(config.to_dict(), CacheReader(config.cache_path).meta)
    return bool(module.model.dit.activation_checkpointing)


def planned_bytes(config: Config, s: Shapes, checkpointing: bool) -> int:
    """train/plan.py's count for one GPU without DDP: states (no buckets) + activations."""
    from store.reader import CacheReader

    meta = CacheReader(config.cache_path).meta
    counts = parameter_counts(meta_model(config, meta["encoders"], meta["codec"]))
    states = state_bytes(counts, "ddp", 1)
    states.pop("DDP gradient buckets (fp32)")  # one process: no DDP wrapper
    return sum(states.values()) + sum(activation_bytes(s, checkpointing).values())


def attention_mask_cost(device: str, s: Shapes) -> dict:
    """LI-DiT's cross-attention shape, bf16, forward + backward: with a key mask, and without one."""
    H, Dh = s.heads, s.dim // s.heads
    q = torch.randn(s.batch, H, s.image_tokens, Dh, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(s.batch, H, s.text_tokens, Dh, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    lengths = torch.randint(s.text_tokens // 2, s.text_tokens + 1, (s.batch,), device=device)
    mask = (torch.arange(s.text_tokens, device=device)[None] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, T]
    out = {}
    for label, attn_mask in (("key_mask_ms", mask), ("no_mask_ms", None)):
        step = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).sum().backward()  # noqa: E731
        step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(10):
            step()
        synchronize(device)
        out[label] = (time.perf_counter() - start) / 10 * 1000
    return out


def lidit_1b_part(size: Size, device: str, rate: float, work: Path, levers: list[str]) -> dict:
    accelerator = "gpu" if device == "cuda" else "cpu"
    overrides = [f"cache_dir={work / 'lidit-1b-cache'}", f"run_dir={work / 'lidit-1b-run'}",
                 "codec.buckets=[[256, 256]]",
                 f"train.batch_size={size.batch}", f"train.num_workers={size.workers}", "train.precision=bf16-mixed",
                 f"train.accelerator={accelerator}", "train.eval_every=0", "train.max_minutes=null", *size.model]
    config = load_config(LIDIT_1B, overrides)
    written = write_synthetic_cache(config, str(config.cache_path), size.rows, {"*": size.hidden}, size.tokens,
                                    size.prefix, log=lambda _: None)
    m = config.model
    s = Shapes(batch=size.batch, latent=tuple(written["latents"][0]), patch=m.patch, dim=m.dim, heads=m.heads,
               depth=m.depth, mlp_ratio=m.mlp_ratio, encoders=((size.hidden, size.prefix, size.tokens),) * 2,
               refiner_depth=m.refiner_depth, collab_depth=m.collab_depth, gate=m.gate, mlp_conv=m.mlp_conv,
               pos_conv=m.pos_conv)
    flops = lidit_step_flops(s, config)
    out = {"cache_seconds": written["seconds"], "step_flops": flops,
           "counted_over_formula": counted_step_flops(config, device) / flops, "levers": {},
           "checkpointing_reaches_the_model": checkpointing_reaches_the_model(overrides)}
    print(f"1. LI-DiT-1B step, batch {size.batch}, {s.image_tokens} image + {s.text_tokens} text tokens: "
          f"{flops / 1e12:.2f} TFLOP a step (FlopCounterMode / formula {out['counted_over_formula']:.3f})", flush=True)
    for lever in levers:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            side = measure_side(LIDIT_1B, "cached", size.steps, size.warmup, (*overrides, *LEVERS[lever]))
        except Exception as err:  # a lever that fails is a result too; the other parts still run
            out["levers"][lever] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            print(f"   {lever:<14} failed: {out['levers'][lever]['error'][:200]}", flush=True)
            continue
        steps_per_s = side["samples_per_s"] / size.batch
        row = {"samples_per_s": side["samples_per_s"], "train_flops_fraction": flops * steps_per_s / (rate * 1e12),
               "planned_gib": planned_bytes(config, s, lever == "checkpointing") / 2**30}
        if device == "cuda":
            row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["levers"][lever] = row
        memory = (f", peak {row['peak_allocated_gib']:.1f} GiB (plan {row['planned_gib']:.1f})"
                  if "peak_allocated_gib" in row else f" (plan {row['planned_gib']:.2f} GiB)")
        print(f"   {lever:<14} {side['samples_per_s']:8.1f} samples/s, fraction {row['train_flops_fraction']:.3f}"
              f"{memory}", flush=True)
    out["loader_rows_per_s"] = rows_per_s(config, 2 * size.warmup + size.steps)
    out["attention"] = attention_mask_cost(device, s)
    print(f"   data loader alone ({config.train.num_workers} workers): {out['loader_rows_per_s']:.0f} rows/s; "
          f"cross-attention fwd + bwd with a key mask {out['attention']['key_mask_ms']:.2f} ms, "
          f"without {out['attention']['no_mask_ms']:.2f} ms", flush=True)
    return out


# -- 2. stage 1 with a Llama-3-8B-shaped model ------------------------------------------------------

def save_llama(folder: Path, shape: dict, device: str) -> Path:
    """A random Llama-3-8B-shaped causal LM (bf16) and a word-level tokenizer (one token per word,
    a BOS first), saved as a transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    specials = ["[UNK]", "<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(shape["vocab_size"] - 4)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="[UNK]").save_pretrained(folder)
    config = LlamaConfig(**shape, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
                         rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    return folder


def encoder_flops(shape: dict, prefix: int, caption: int, blocks: int) -> float:
    h, m = shape["hidden_size"], shape["intermediate_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return blocks * (2 * caption * (2 * h * h + 2 * h * kv + 3 * h * m) + 4 * h * (caption * prefix + caption**2 / 2))


def stage1_part(size: Size, device: str, rate: float, work: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from embed.encoder import PromptEncoder

    started = time.perf_counter()
    folder = save_llama(work / "llama-3-8b-shaped", size.llama, device)
    saved = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(size.llama["vocab_size"] - 4, (size.captions, size.tokens), generator=generator)
    captions = [" ".join(f"w{i}" for i in row.tolist()) for row in words]
    encoder_config = EncoderConfig(name="llama3", path=str(folder), kind="causal", layer=-3, max_tokens=size.tokens,
                                   compute_dtype="bfloat16", store_dtype="bfloat16")
    out = {"save_seconds": saved}

    # the plain loop: the whole model on instruction + caption, every hidden state returned
    tokenizer = AutoTokenizer.from_pretrained(folder)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device).eval()
    instruction = encoder_config.instruction.rstrip()

    @torch.inference_mode()
    def plain_states(batch: list[str]) -> torch.Tensor:
        inputs = tokenizer([f"{instruction} {c}" for c in batch], return_tensors="pt", padding=True).to(device)
        hidden = plain(**inputs, output_hidden_states=True).hidden_states[-3]  # [B, P + C, h]
        return hidden[:, -size.tokens:].cpu()  # the caption's tokens (equal lengths: no padding)

    reference = plain_states(captions[: size.encode_batch])  # also the warm-up
    synchronize(device)
    start = time.perf_counter()
    for i in range(0, size.captions, size.encode_batch):
        plain_states(captions[i : i + size.encode_batch])
    synchronize(device)
    out["plain_captions_per_s"] = size.captions / (time.perf_counter() - start)
    del plain
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    # the project's encoder: 30 blocks, the prefix once
    encoder = PromptEncoder(encoder_config, device=device)
    first = encoder.encode(captions[: size.encode_batch], batch_size=size.encode_batch)  # also the warm-up
    synchronize(device)
    start = time.perf_counter()
    encoder.encode(captions, batch_size=size.encode_batch)
    synchronize(device)
    out["encoder_captions_per_s"] = size.captions / (time.perf_counter() - start)
    ours = torch.stack([e.states for e in first]).float()
    out["rel_l2_vs_plain"] = ((ours - reference.float()).norm() / reference.float().norm()).item()
    out["prefix_tokens"] = len(encoder.prefix_ids)
    flops = encoder_flops(size.llama, out["prefix_tokens"], size.tokens, encoder.blocks)
    out["encoder_flops_fraction"] = flops * out["encoder_captions_per_s"] / (rate * 1e12)
    out["speedup_over_plain"] = out["encoder_captions_per_s"] / out["plain_captions_per_s"]
    print(f"2. stage 1, Llama-3-8B-shaped ({encoder.blocks} of {encoder.num_blocks} blocks, prefix "
          f"{out['prefix_tokens']} + caption {size.tokens} tokens): PromptEncoder {out['encoder_captions_per_s']:.1f} "
          f"captions/s, plain loop {out['plain_captions_per_s']:.1f} (x{out['speedup_over_plain']:.2f}), fraction "
          f"{out['encoder_flops_fraction']:.3f}, rel L2 {out['rel_l2_vs_plain']:.4f}", flush=True)
    return out


# -- 3. the default model, eager against CUDA graphs ---------------------------------------------------

def default_part(size: Size, device: str, work: Path) -> dict:
    accelerator = "gpu" if device == "cuda" else "cpu"
    overrides = [f"cache_dir={work / 'default-cache'}", f"run_dir={work / 'default-run'}",
                 f"train.accelerator={accelerator}",
                 "train.eval_every=0", "train.max_minutes=null", *size.default_model]
    config = load_config(DEFAULT, overrides)
    write_synthetic_cache(config, str(config.cache_path), size.default_rows, {}, tokens=12, log=lambda _: None)
    out = {}
    for mode in ("off", "reduce-overhead"):
        try:
            side = measure_side(DEFAULT, "cached", size.default_steps, size.default_warmup,
                                (*overrides, f"train.compile={mode}"))
        except Exception as err:  # a compile mode that fails here is a result too
            out[mode] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            continue
        out[mode] = {"steps_per_s": side["samples_per_s"] / config.train.batch_size, "precision": side["precision"],
                     "parameters": side["parameters"]}
    if all("steps_per_s" in out[m] for m in ("off", "reduce-overhead")):
        out["reduce_overhead_over_eager"] = out["reduce-overhead"]["steps_per_s"] / out["off"]["steps_per_s"]
    print(f"3. default model, batch {config.train.batch_size}: " + ", ".join(
        f"{m} {v['steps_per_s']:.1f} steps/s" if "steps_per_s" in v else f"{m} failed: {v['error'][:120]}"
        for m, v in out.items() if isinstance(v, dict)), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks that every part runs")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--levers", nargs="+", choices=list(LEVERS),
                        help="part 1's settings (default: base checkpointing)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    cli.quiet_libraries()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_scale.py: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 2
    size = SMOKE if args.smoke else FULL
    levers = args.levers or ["base", "checkpointing"]
    started = time.perf_counter()
    results = {"device": torch.cuda.get_device_name(0) if device == "cuda" else cpu_model(), "torch": torch.__version__,
               "smoke": args.smoke}
    results["matmul_bf16_tflops"] = rate = matmul_tflops(device, size.matmul)
    print(f"{results['device']}: dense bf16 matmul {size.matmul}^3 at {rate:.2f} TFLOP/s", flush=True)
    parts = {1: lambda work: lidit_1b_part(size, device, rate, work, levers),
             2: lambda work: stage1_part(size, device, rate, work), 3: lambda work: default_part(size, device, work)}
    with tempfile.TemporaryDirectory(prefix="lidit-gpu-scale-") as work:
        for number in args.parts:
            name = {1: "lidit_1b", 2: "stage1_llama3_8b", 3: "default_model"}[number]
            begun = time.perf_counter()
            try:
                results[name] = parts[number](Path(work) / name)
            except Exception as err:  # record it and go on: one call must bring back every part it can
                results[name] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
                print(f"{number}. failed: {results[name]['error']}", flush=True)
            results[name]["part_seconds"] = time.perf_counter() - begun
            print(f"   ({results[name]['part_seconds']:.0f} s)", flush=True)
    results["seconds"] = time.perf_counter() - started
    print(f"bench/gpu_scale.py: {results['seconds']:.0f} s")
    if args.json:
        print(json.dumps(results))
    return 0 if not any(isinstance(v, dict) and "error" in v for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
