"""Can the configured text path put each named object on its side? A supervised probe, no diffusion.

The diffusion model learns where things go only near t = 1, where its input is pure noise
and the caption alone must say it (docs/RESULTS.md, session 15). This probe poses that task
without the noise: a fresh LLM-infused diffuser (the config's refiners and fusion, reading
the cached caption states of the relation scenes) is read by one learned query per token of
the image grid, through two blocks of cross-attention and FFN, and the probe regresses the
image average-pooled to that grid (8 x 8 at 32 px and patch 4). Every `--every` steps, on
the held-out relation scenes:

  mse:   against the pooled image;
  gain:  the mse against the image mirrored along its relation's axis minus the mse against
         the image. A probe that ignores the relation words paints each object on both sides
         (gain about 0); one that reads them paints it on its side (gain > 0).

    python bench/binding_probe.py [--config configs/default.yaml] [--cache DIR] [--steps 1500] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from embed.shapes import MIRRORED  # noqa: E402
from store.config import load_config  # noqa: E402
from store.reader import CacheReader  # noqa: E402
from train.layers import Attention, Mlp  # noqa: E402
from train.model import TextToImageModel, build_kwargs  # noqa: E402

class GridReader(nn.Module):
    """One learned query per grid token; cross-attention to the text + FFN, twice; -> [B, C, h, w]."""

    def __init__(self, dim: int, heads: int, channels: int, h: int, w: int, blocks: int = 2):
        super().__init__()
        self.hw = (h, w)
        self.queries = nn.Parameter(torch.randn(h * w, dim) * 0.02)
        self.attn = nn.ModuleList([Attention(dim, heads, context_dim=dim) for _ in range(blocks)])
        self.mlp = nn.ModuleList([Mlp(dim) for _ in range(blocks)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2 * blocks)])
        self.out = nn.Linear(dim, channels)

    def forward(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
        x = self.queries.expand(len(cond), -1, -1)  # [B, h * w, D]
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            x = x + attn(self.norms[2 * i](x), context=cond, key_mask=cond_mask)
            x = x + mlp(self.norms[2 * i + 1](x), self.hw)
        return self.out(x).transpose(1, 2).reshape(len(cond), -1, *self.hw)  # [B, C, h, w]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--cache", help="the feature cache (default: the config's)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=250, help="held-out mse and gain every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the curve as one JSON line at the end")
    args = parser.parse_args()
    config = load_config(args.config, [f"cache_dir={args.cache}"] if args.cache else [])
    torch.manual_seed(args.seed)

    reader = CacheReader(config.cache_path, encoders=config.model.encoders)
    if reader.meta["source"]["kind"] != "shapes":
        raise SystemExit(f"{config.cache_path}: the probe needs a shapes cache (scenes with relations)")
    split = reader.column("split")
    relations = [json.loads(t)["relations"] for t in reader.column("truth")]
    train = [i for i in np.flatnonzero(split == "train") if relations[i]]
    held_out = [i for i in np.flatnonzero(split == "eval") if relations[i]]
    if not train or not held_out:
        raise SystemExit(f"{config.cache_path}: no relation scenes in the train or eval split")
    model, names = config.model, [e["name"] for e in reader.encoders]  # model.encoders, or all of the cache's
    diffuser = TextToImageModel(**build_kwargs(model, reader.encoders, reader.meta["codec"])).diffuser
    probe = GridReader(model.dim, model.heads, reader.meta["codec"]["channels"],
                       config.data.height // model.patch, config.data.width // model.patch)
    parameters = [*diffuser.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.95))
    print(f"binding probe: {len(train)} training and {len(held_out)} held-out relation scenes of "
          f"{config.cache_path}; {sum(p.numel() for p in parameters) / 1e6:.2f}M parameters", flush=True)

    def read(rows) -> tuple[list, torch.Tensor]:
        """The rows' cached caption states (one TextFeatures per encoder) and pooled images."""
        batch = reader.take([int(r) for r in rows])
        return [batch["text"][name] for name in names], F.avg_pool2d(batch["latents"], model.patch)

    def predict(texts: list) -> torch.Tensor:
        t_emb = torch.zeros(len(texts[0].states), model.dim)  # no timestep: the probe has no noise
        cond, cond_mask = diffuser([x.states.float() for x in texts], [x.mask for x in texts], t_emb)
        return probe(cond, cond_mask)

    held_out_texts, held_out_target = read(held_out)  # read once, scored at every --every
    mirrored = torch.stack([y.flip(-1) if relations[r][0]["rel"] in MIRRORED["horizontal"] else y.flip(-2)
                            for y, r in zip(held_out_target, held_out)])

    def held_out_scores() -> tuple[float, float]:
        with torch.no_grad():
            predicted = predict(held_out_texts)
        mse = F.mse_loss(predicted, held_out_target).item()
        return mse, F.mse_loss(predicted, mirrored).item() - mse

    rng = np.random.default_rng(args.seed)
    curve, started = [], time.time()
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            mse, gain = held_out_scores()
            curve.append({"step": step, "mse": round(mse, 5), "gain": round(gain, 5),
                          "seconds": round(time.time() - started, 1)})
            print(f"step {step:5d}  held-out mse {mse:.4f}  relation gain {gain:+.4f}  "
                  f"({curve[-1]['seconds']:.0f} s)", flush=True)
        if step == args.steps:
            break
        texts, target = read(rng.choice(train, args.batch, replace=False))
        loss = F.mse_loss(predict(texts), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    best = max(curve, key=lambda point: point["gain"])
    print(f"binding probe: best relation gain {best['gain']:+.4f} at step {best['step']} "
          f"({args.batch} rows a step); about 0 means the relation words were not read")
    if args.json:
        print(json.dumps({"cache": str(config.cache_path), "train_scenes": len(train), "held_out_scenes": len(held_out),
                          "batch": args.batch, "lr": args.lr, "curve": curve}))


if __name__ == "__main__":
    main()
