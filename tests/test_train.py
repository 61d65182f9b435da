"""Stage 2: Lightning trains from the cache only; resumes exactly; refuses a wrong cache."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch._dynamo.utils import counters

from store.config import Config, ConfigError, build, validate
from store.reader import CacheError
from tests.conftest import fixed_draw_loss
from train.run import check_resumable, run_train
from train.data import BucketBatchSampler, share
from train.export import load_exported


def config_for(tiny_cache: dict, tmp_path, **sections) -> Config:
    raw = copy.deepcopy(tiny_cache)
    raw["cache_dir"] = f"{tiny_cache['run_dir']}/cache"  # train many runs on one cache
    raw["run_dir"] = str(tmp_path / "run")
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    config = build(Config, raw, "")
    validate(config)
    return config


def losses(config: Config) -> pd.Series:
    frame = pd.read_csv(config.run_path / "logs" / "metrics.csv")
    frame = frame.dropna(subset=["train/loss"])
    return frame.set_index("step")["train/loss"]


def test_compiled_training_follows_the_eager_loss_curve(tiny_cache, tmp_path):
    # train.compile pads the text to a multiple of 16 tokens (masked, so the same inputs) and
    # runs the model through inductor; the checkpoint keeps the eager model's keys
    eager = config_for(tiny_cache, tmp_path / "eager", train={"steps": 4})
    run_train(eager, progress=False)
    compiled = config_for(tiny_cache, tmp_path / "compiled", train={"steps": 4, "compile": "default"})
    counters.clear()
    run_train(compiled, progress=False)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile the training forward
    np.testing.assert_allclose(losses(compiled).to_numpy(), losses(eager).to_numpy(), rtol=2e-4)
    a = load_exported(eager.run_path / "checkpoints", ema=False).model.state_dict()
    b = load_exported(compiled.run_path / "checkpoints", ema=False).model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_run_reproduces_the_uninterrupted_loss_curve(tiny_cache, tmp_path, optimizer):
    # with Muon too: the checkpoint holds both inner optimizers' state (momentum, Adam moments)
    straight = config_for(tiny_cache, tmp_path / "a", train={"steps": 8, "optimizer": optimizer})
    run_train(straight, progress=False)
    interrupted = config_for(tiny_cache, tmp_path / "b", train={"steps": 4, "optimizer": optimizer})
    run_train(interrupted, progress=False)  # stops at step 4 and leaves last.ckpt
    # A row logged after the checkpoint, before the crash: logged again by the resume, kept once
    metrics = interrupted.run_path / "logs" / "metrics.csv"
    first_part = pd.read_csv(metrics)
    pd.concat([first_part, first_part.tail(1).assign(step=4)]).to_csv(metrics, index=False)
    resumed = config_for(tiny_cache, tmp_path / "b", train={"steps": 8, "optimizer": optimizer})
    summary = run_train(resumed, progress=False)
    assert summary["steps"] == 8
    a, b = losses(straight), losses(resumed)
    # the log keeps the first part and goes on: one curve, the uninterrupted run's
    assert list(a.index) == list(range(8)) and list(b.index) == list(range(8))
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-6)
    assert list(pd.read_csv(metrics).columns) == list(first_part.columns)
    # A config whose model no longer matches the checkpoint is refused, saying what differs,
    # and the checkpoint is left as it was.
    changed = config_for(tiny_cache, tmp_path / "b", train={"steps": 10, "optimizer": optimizer},
                         model={"dim": 2 * resumed.model.dim})
    last = resumed.run_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(ConfigError, match=r"cannot resume .*model\.dim: \d+ in the checkpoint, \d+ now"):
        run_train(changed, progress=False)
    other = "muon" if optimizer == "adamw" else "adamw"  # its state would not load: refused up front
    switched = config_for(tiny_cache, tmp_path / "b", train={"steps": 10, "optimizer": other})
    with pytest.raises(ConfigError, match=rf"train\.optimizer: '{optimizer}' in the checkpoint, '{other}' now"):
        run_train(switched, progress=False)
    assert last.read_bytes() == before
    # another batch size resumes (the model and optimizer load), and says the stream changed
    batch = resumed.train.batch_size
    step, stream = check_resumable(last, config_for(tiny_cache, tmp_path / "b",
                                                    train={"optimizer": optimizer, "batch_size": 2 * batch}))
    assert step == 8 and stream == [f"train.batch_size: {batch} in the checkpoint, {2 * batch} now"]
    assert check_resumable(last, resumed) == (8, [])


@pytest.mark.parametrize(("prediction", "optimizer"), [("velocity", "adamw"), ("sample", "adamw"),
                                                       ("velocity", "muon")])
def test_training_from_the_cache_lowers_the_loss_on_fixed_draws(tiny_cache, tmp_path, prediction, optimizer):
    from store.reader import CacheReader

    config = config_for(tiny_cache, tmp_path, train={"steps": 120, "lr": 3e-3, "caption_dropout": 0.0,
                                                      "optimizer": optimizer},
                        model={"prediction": prediction})
    run_train(config, progress=False)
    trained = load_exported(config.run_path / "checkpoints", ema=False)
    assert trained.model.prediction == prediction  # the export rebuilds the head it trained
    start = config_for(tiny_cache, tmp_path / "start", train={"steps": 0}, model={"prediction": prediction})
    run_train(start, progress=False)
    initial = load_exported(start.run_path / "checkpoints", ema=False)
    batch = CacheReader(config.cache_path).take(range(48))
    names = [e["name"] for e in trained.encoders]
    before = fixed_draw_loss(initial.model, initial.objective, batch, names)
    after = fixed_draw_loss(trained.model, trained.objective, batch, names)
    assert after < 0.7 * before, (before, after)


def test_exported_weights_rebuild_the_model_without_the_cache(tiny_cache, tmp_path):
    config = config_for(tiny_cache, tmp_path, train={"steps": 2})
    run_train(config, progress=False)
    cache, hidden = Path(config.cache_path), tmp_path / "cache-moved-away"
    cache.rename(hidden)  # the session's shared cache, put back below
    try:
        exported = load_exported(config.run_path / "checkpoints")
    finally:
        hidden.rename(cache)
    assert exported.step == 2
    assert [e["name"] for e in exported.encoders] == ["llm", "bert"]
    raw = load_exported(config.run_path / "checkpoints", ema=False).model
    live = [p for p in raw.parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(exported.model.parameters(), live)), "EMA differs from raw"


def test_init_from_starts_a_run_from_another_runs_ema_weights_and_refuses_another_model(tiny_cache, tmp_path):
    first = config_for(tiny_cache, tmp_path / "first", train={"steps": 3})
    run_train(first, progress=False, log=lambda *_: None)
    source = load_exported(first.run_path / "checkpoints").model.state_dict()  # its EMA weights
    # an lr so small that one step leaves the weights where they started
    still = {"steps": 1, "lr": 1e-12, "warmup_steps": 1}
    lines = []
    second = config_for(tiny_cache, tmp_path / "second", train={**still, "init_from": str(first.run_path)})
    run_train(second, progress=False, log=lines.append)
    assert any("starting from the EMA weights in" in line and "its step 3" in line for line in lines), lines
    fresh = config_for(tiny_cache, tmp_path / "fresh", train=still)
    run_train(fresh, progress=False, log=lambda *_: None)
    for config, same in ((second, True), (fresh, False)):
        for ema in (True, False):  # the trained weights and their EMA both start there
            weights = load_exported(config.run_path / "checkpoints", ema=ema).model.state_dict()
            gap = max((weights[k] - source[k]).abs().max().item() for k in source)
            assert (gap < 1e-6) == same, (config.run_dir, ema, gap)

    deeper = config_for(tiny_cache, tmp_path / "deeper", model={"depth": first.model.depth + 1},
                        train={"steps": 1, "init_from": str(first.run_path / "checkpoints")})
    with pytest.raises(ConfigError, match=rf"train.init_from: .*\(depth: {first.model.depth} there, "
                                          rf"{first.model.depth + 1} here\)"):
        run_train(deeper, progress=False, log=lambda *_: None)
    nowhere = config_for(tiny_cache, tmp_path / "nowhere", train={"steps": 1, "init_from": str(tmp_path / "no-run")})
    with pytest.raises(ConfigError, match="train.init_from: no exported model in .*no-run"):
        run_train(nowhere, progress=False, log=lambda *_: None)


def test_a_cache_built_with_another_layer_is_refused(tiny_cache, tmp_path):
    raw = copy.deepcopy(tiny_cache)
    raw["encoders"][0]["layer"] = -2
    raw["cache_dir"] = f"{tiny_cache['run_dir']}/cache"
    raw["run_dir"] = str(tmp_path / "run")
    config = build(Config, raw, "")
    with pytest.raises(CacheError, match=r"encoders\.llm\.layer: cache has -3, config wants -2"):
        run_train(config, progress=False)


def test_an_exploding_loss_fails_early_and_clearly(tiny_cache, tmp_path):
    config = config_for(tiny_cache, tmp_path, train={"steps": 50, "lr": 1e12, "warmup_steps": 1, "grad_clip": 0.0})
    with pytest.raises(FloatingPointError, match="loss is .* at step"):
        run_train(config, progress=False)


def test_model_uses_only_the_encoders_the_config_names(tiny_cache, tmp_path):
    config = config_for(tiny_cache, tmp_path, model={"encoders": ["bert"]}, train={"steps": 1})
    run_train(config, progress=False)
    assert [e["name"] for e in load_exported(config.run_path / "checkpoints").encoders] == ["bert"]


def test_bucket_sampler_keeps_one_bucket_per_batch_and_shares_each_batch_between_ranks():
    buckets = {0: np.arange(0, 40), 1: np.arange(40, 64)}
    alone = next(iter(BucketBatchSampler(buckets, 8, seed=0)))[0]
    ranks = [iter(BucketBatchSampler(buckets, 8, seed=0, rank=r, world_size=2)) for r in range(2)]
    batches = BucketBatchSampler(buckets, 8, seed=0).epoch_batches(0)
    for batch in batches:
        assert len({int(r >= 40) for r in batch}) == 1
    assert sorted(int(r) for b in batches for r in b) == list(range(64))  # an epoch covers every row once
    for step in range(len(batches)):
        (rows0, rank0, world0), (rows1, rank1, world1) = next(ranks[0]), next(ranks[1])
        assert rows0 == rows1 == [int(r) for r in batches[step]]  # both ranks see global batch k
        assert (rank0, rank1, world0, world1) == (0, 1, 2, 2)
        assert share(rows0, 0, 2) + share(rows1, 1, 2) == rows0  # disjoint halves that make it up
    assert alone == [int(r) for r in batches[0]]  # one process trains on the same batches
    with pytest.raises(ValueError, match="cannot be shared evenly by 3"):
        BucketBatchSampler(buckets, 8, seed=0, rank=0, world_size=3)


def test_bucket_sampler_resumes_mid_stream():
    buckets = {0: np.arange(100)}
    full = BucketBatchSampler(buckets, 10, seed=3)
    stream = iter(full)
    expected = [next(stream) for _ in range(25)]
    resumed = iter(BucketBatchSampler(buckets, 10, seed=3, start_step=lambda: 17))
    assert [next(resumed) for _ in range(8)] == expected[17:25]


def test_repeat_kinds_changes_the_mix_of_scene_kinds_an_epoch_holds(tiny_cache, tmp_path):
    from train.data import CacheDataModule

    def epoch_kinds(config):
        data = CacheDataModule(config)
        data.setup()
        truth = data.reader.column("truth")
        rows = np.concatenate(list(data.buckets.values()))
        return [json.loads(truth[r])["kind"] for r in rows], rows

    plain, plain_rows = epoch_kinds(config_for(tiny_cache, tmp_path))
    assert "relation" in plain and len(set(plain_rows.tolist())) == len(plain_rows)  # each row once
    kinds, rows = epoch_kinds(config_for(tiny_cache, tmp_path, train={"repeat_kinds": {"relation": 3, "single": 0}}))
    assert kinds.count("relation") == 3 * plain.count("relation")
    assert "single" not in kinds
    assert kinds.count("counting") == plain.count("counting")
    assert set(rows.tolist()) == {r for r, k in zip(plain_rows.tolist(), plain) if k != "single"}
    with pytest.raises(ConfigError, match="train.repeat_kinds: unknown scene kind 'relations'"):
        config_for(tiny_cache, tmp_path, train={"repeat_kinds": {"relations": 2}})


@pytest.mark.slow
def test_ray_train_runs_the_lightning_trainer_on_two_workers_stage_by_stage(tiny_cache, tmp_path, local_ray):
    """A curriculum on Ray Train: one run of two workers per stage, each from the stage
    before's weights; a rerun skips them."""
    from train.ray_train import run_ray_stages

    config = config_for(tiny_cache, tmp_path, train={"accelerator": "cpu", "stages": [
        {"name": "first", "steps": 4}, {"name": "second", "steps": 2}]})
    lines = []
    assert run_ray_stages(config, workers=2, gpus=False, progress=False, log=lines.append) == 0
    assert load_exported(config.run_path / "stages" / "1-first" / "checkpoints").step == 4
    exported = load_exported(config.run_path / "checkpoints")
    assert exported.step == 2 and exported.config.train.init_from == str(config.run_path / "stages" / "1-first")
    assert [line.split(":")[0] for line in lines] == ["ray train"] * 2 and "error: None" in lines[1]
    lines.clear()
    assert run_ray_stages(config, workers=2, gpus=False, progress=False, log=lines.append) == 0
    assert len(lines) == 2 and all("done before" in line for line in lines), lines


def test_caption_dropout_substitutes_the_stored_unconditional_text(tiny_cache, tmp_path):
    from store.reader import CacheReader
    from train.data import CachedBatches, caption_dropout_mask

    config = config_for(tiny_cache, tmp_path, train={"caption_dropout": 0.5})
    reader = CacheReader(config.cache_path)
    rows = list(range(8))
    drop = caption_dropout_mask(rows, 0.5, config.seed)
    assert drop.any() and not drop.all()  # this draw has both kinds of row
    batch = CachedBatches(reader, 0.5, config.seed)[rows]
    plain = reader.take(rows)
    for name in ("llm", "bert"):
        text, original, null = batch["text"][name], plain["text"][name], reader.null[name]
        p = text.prefix_len
        for i in range(len(rows)):
            n = int(text.mask[i].sum()) - p
            if drop[i]:
                assert torch.equal(text.states[i, p:p + n], null)
            else:
                assert torch.equal(text.states[i], original.states[i])


def test_ema_moves_toward_the_live_weights_with_warm_up(tiny_cache, tmp_path):
    from store.reader import CacheReader
    from train.module import LIDiTModule

    config = config_for(tiny_cache, tmp_path)
    module = LIDiTModule(config.to_dict(), CacheReader(config.cache_path).meta)
    before = [p.detach().clone() for p in module.ema.parameters()]
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    module.on_train_batch_end(None, None, 0)  # global_step 0: decay min(0.999, 1 / 10) = 0.1
    for ema, old, live in zip(module.ema.parameters(), before, module.model.parameters()):
        torch.testing.assert_close(ema, 0.1 * old + 0.9 * live)


def test_cosine_lr_warms_up_then_falls_to_its_final_fraction_at_the_last_step(tiny_cache, tmp_path):
    config = config_for(tiny_cache, tmp_path, train={"steps": 8, "warmup_steps": 2, "lr": 1e-3,
                                                     "lr_schedule": "cosine", "lr_final": 0.1})
    run_train(config, progress=False, log=lambda *_: None)
    frame = pd.read_csv(config.run_path / "logs" / "metrics.csv").dropna(subset=["train/lr"])
    lr = frame.set_index("step")["train/lr"]
    np.testing.assert_allclose(lr.loc[[0, 1]], [5e-4, 1e-3], rtol=1e-6)  # linear warm-up
    assert all(a > b for a, b in zip(lr.loc[1:], lr.loc[2:]))  # then strictly down
    np.testing.assert_allclose(lr.loc[7], 1e-4, rtol=1e-6)  # lr * lr_final at train.steps


def test_max_minutes_stops_a_long_run_early_and_still_exports(tiny_cache, tmp_path):
    config = config_for(tiny_cache, tmp_path, train={"steps": 100_000, "max_minutes": 0.05})
    summary = run_train(config, progress=False, log=lambda *_: None)
    assert 0 < summary["steps"] < 100_000
    assert load_exported(config.run_path / "checkpoints").step == summary["steps"]


@pytest.mark.slow
def test_data_loader_workers_start_with_spawn_and_train(tiny_cache, tmp_path):
    config = config_for(tiny_cache, tmp_path, train={"steps": 3, "num_workers": 1})
    assert run_train(config, progress=False, log=lambda *_: None)["steps"] == 3


def test_progress_logs_shapeeval_beside_the_loss_and_draws_curves_a_resumed_run_extends(tiny_cache, tmp_path):
    """ShapeEval every 3 steps (and at the end) on held-out rows with the EMA weights, in the
    CSV log beside the loss; curves.png and curves.json carry on across a resume."""
    from PIL import Image

    from sample.shapeeval import CATEGORIES

    first = config_for(tiny_cache, tmp_path, train={"steps": 4, "eval_every": 3, "eval_rows": 6, "eval_steps": 2})
    summary = run_train(first, progress=False)
    assert summary["shapeeval"].startswith("ShapeEval at step 4: ") and "overall" in summary["shapeeval"]
    assert "(standard error; " in summary["shapeeval"] and ", 2 heun steps, CFG" in summary["shapeeval"]
    logs = first.run_path / "logs"
    frame = pd.read_csv(logs / "metrics.csv")
    scored = frame.dropna(subset=["eval/overall"])
    assert list(scored["step"]) == [3, 4]
    categories = {c.removeprefix("eval/") for c in frame.columns if c.startswith("eval/")} - {"overall", "overall_se"}
    assert categories and categories <= set(CATEGORIES)  # those among the 6 rows
    assert scored["eval/overall"].between(0, 1).all() and (scored["eval/overall_se"] >= 0).all()
    history = json.loads((logs / "curves.json").read_text())
    assert [e["step"] for e in history["eval"]] == [3, 4] and [p[0] for p in history["loss"]] == [1, 2, 3, 4]
    assert Image.open(logs / "curves.png").size == (1000, 380)

    resumed = config_for(tiny_cache, tmp_path, train={"steps": 6, "eval_every": 3, "eval_rows": 6, "eval_steps": 2})
    run_train(resumed, progress=False)
    history = json.loads((logs / "curves.json").read_text())
    assert [e["step"] for e in history["eval"]] == [3, 4, 6]
    assert [p[0] for p in history["loss"]] == [1, 2, 3, 4, 5, 6]
    walls = [p[1] for p in history["loss"]]
    assert walls == sorted(walls), "wall time goes on from the first run's"


@pytest.mark.slow
def test_two_ddp_processes_train_exactly_what_one_process_trains(tiny_cache, tmp_path):
    """`python -m train` with train.devices=2 (Lightning DDP over gloo, on the CPU): each process
    takes half of every global batch and its share of the step's noise, so the weights match a
    one-process run of the same config; one summary is printed."""
    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    weights, logged = {}, {}
    for devices in (1, 2):
        config = config_for(tiny_cache, tmp_path / f"p{devices}", train={
            "steps": 3, "batch_size": 8, "devices": devices, "accelerator": "cpu", "caption_dropout": 0.5,
            "warmup_steps": 1, "lr": 1e-3})
        path = tmp_path / f"p{devices}.yaml"
        path.write_text(yaml.safe_dump(config.to_dict()))
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        done = subprocess.run([sys.executable, "-m", "train", "--config", str(path), "--fresh"], cwd=root,
                              env=dict(env, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("train: 3 steps in") == 1, done.stdout
        assert f"{8 // devices} rows each of every batch of 8" in done.stdout
        weights[devices] = load_file(str(config.run_path / "checkpoints" / "model.safetensors"))
        logged[devices] = losses(config)
    assert len(logged[1]) == 3  # log_every is 1 in the tiny config
    np.testing.assert_allclose(logged[2].to_numpy(), logged[1].to_numpy(), rtol=1e-5)  # the global batch's loss
    # Adam moves every weight by about lr (1e-3) a step, whatever the gradient's size, so rows or
    # noise dealt differently would differ by ~1e-3; summing the gradients in another order
    # moves near-zero ones by a few 1e-6 (measured 2.9e-6).
    for name, one in weights[1].items():
        torch.testing.assert_close(weights[2][name], one, atol=3e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_fixed_draw_loss_reads_either_split_at_the_times_asked(tiny_cache, tmp_path):
    from train.matrix import heldout_loss

    config = config_for(tiny_cache, tmp_path, train={"steps": 2})
    run_train(config, progress=False)
    held_out = heldout_loss(config, 8)
    assert heldout_loss(config, 8) == held_out  # fixed times and noise: the same number again
    assert heldout_loss(config, 8, split="train") != held_out  # other rows
    noisy, clean = heldout_loss(config, 8, times=(0.9,)), heldout_loss(config, 8, times=(0.1,))
    assert noisy != clean and min(noisy, clean) > 0
    # the unconditional text on the same rows and draws: another number, as fixed
    null = heldout_loss(config, 8, text="null")
    assert null != held_out and null == heldout_loss(config, 8, text="null") and null > 0
    with pytest.raises(ValueError, match=r"split='test'; allowed: train, eval"):
        heldout_loss(config, 8, split="test")
    with pytest.raises(ValueError, match=r"text='empty'; allowed: caption, null"):
        heldout_loss(config, 8, text="empty")


def test_relation_gain_reverses_each_relation_on_the_same_draws(tiny_cache, tmp_path, monkeypatch):
    import train.matrix as matrix

    left = [{"a": 0, "rel": "left of", "b": 1}]
    assert matrix.reverse_relations("a red square to the left of a blue circle", left) == \
        "a red square to the right of a blue circle"
    assert matrix.reverse_relations("a small green circle above a large red square", [{"a": 0, "rel": "above", "b": 1}]) == \
        "a small green circle below a large red square"
    with pytest.raises(ValueError, match=r"does not say 'to the left of'"):
        matrix.reverse_relations("a red square above a blue circle", left)

    config = config_for(tiny_cache, tmp_path, train={"steps": 2})
    run_train(config, progress=False)
    result = matrix.relation_gain(config, 48, times=(0.5, 1.0), split="train")
    assert result["scenes"] > 0 and set(result["gain"]) == {0.5, 1.0}
    assert all(loss > 0 for loss in result["caption"].values())
    assert any(gain != 0 for gain in result["gain"].values())  # an untrained model still reads every word
    # the two captions of a scene meet the same noise: a caption "reversed" into itself gains exactly 0
    monkeypatch.setattr(matrix, "reverse_relations", lambda caption, relations: caption)
    same = matrix.relation_gain(config, 48, times=(0.5, 1.0), split="train")
    assert same["gain"] == {0.5: 0.0, 1.0: 0.0} and same["caption"] == result["caption"]
    with pytest.raises(ValueError, match=r"none of the first 0 eval scenes has a relation"):
        matrix.relation_gain(config, 0, times=(0.5,))


@pytest.mark.slow
def test_a_curriculum_trains_its_stages_in_order_each_from_the_last_and_skips_the_done_ones(tiny_cache, tmp_path):
    """`python -m train` on a config with train.stages: each stage in its own folder, from the
    EMA weights of the stage before, the last in the run folder; a rerun skips what is done,
    and a done stage trained with another recipe is refused, naming what differs."""
    from train.curriculum import pick_stage, run_curriculum, stage_done
    from store.config import load_config, stage_configs

    root = Path(__file__).resolve().parents[1]
    config = config_for(tiny_cache, tmp_path, train={"batch_size": 4, "stages": [
        {"name": "first", "steps": 3, "lr": 1e-3}, {"name": "second", "steps": 2, "batch_size": 8}]})
    path = tmp_path / "curriculum.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    done = subprocess.run([sys.executable, "-m", "train", "--config", str(path)], cwd=root,
                          env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = stage_configs(config)
    assert "stage 1/2 (first): 3 steps of 4 (12 samples)" in done.stdout, done.stdout
    assert f"starting from the EMA weights in {first.run_path / 'checkpoints'} (its step 3)" in done.stdout
    assert "train: curriculum of 2 stages, 28 samples in all; 2 trained here" in done.stdout
    assert load_exported(first.run_path / "checkpoints").step == 3
    last = load_exported(config.run_path / "checkpoints")
    assert last.step == 2 and last.config.train.init_from == str(first.run_path)
    assert last.config.train.batch_size == 8 and last.config.train.lr == 1e-3  # changed / carried on
    assert config.train.batch_size == 4

    lines = []
    records = run_curriculum(path, ["train.max_minutes=30"], log=lines.append)  # how it runs: still done
    assert [r["seconds"] for r in records] == [None, None] and len(lines) == 2 and "skipped" in lines[0]
    # stage 2 sets its own batch: another batch in stage 1 changes stage 1's recipe alone
    changed = stage_configs(load_config(path, ["train.stages.0.batch_size=8"]))
    with pytest.raises(ConfigError, match=r"holds a finished training of another recipe \(train.batch_size: 4 there, "
                                          r"8 here\)\. .*retrain it with `--stage 1 --fresh`"):
        stage_done(changed[0], "stage 1", 1)
    run_train(changed[0], fresh=True, progress=False, log=lambda *_: None)  # what `--stage 1 --fresh` runs
    assert stage_done(changed[0]) == (3, False)
    assert stage_done(changed[1]) == (2, True)  # done, but from weights that have changed since: stale
    assert pick_stage(config, "second") == pick_stage(config, "2") == 1
    with pytest.raises(ConfigError, match="no such stage; the stages are 1 first, 2 second"):
        pick_stage(config, "3")


def test_in_training_score_is_balanced_over_kinds_and_its_standard_error_matches_resampling(tiny_cache, tmp_path):
    """train/progress.py: the held-out rows are the same number of each scene kind, and the
    stated standard error of the overall score agrees with a stratified bootstrap of ShapeEval."""
    from embed.shapes import make_scene, render, world_spec
    from sample.shapeeval import shapeeval
    from store.reader import CacheReader
    from train.progress import balanced_rows, standard_error

    reader = CacheReader(f"{tiny_cache['run_dir']}/cache")
    rows = balanced_rows(reader, 100)
    kinds = [json.loads(t)["kind"] for t in reader.dataset.take(rows, columns=["truth"]).column("truth").to_pylist()]
    held_out = set(np.flatnonzero(reader.column("split") == "eval").tolist())
    assert set(rows) <= held_out and len(set(kinds)) > 1 and rows == sorted(rows)
    assert len(rows) == len(held_out)  # 100 a kind asked: every held-out row of the tiny cache
    two = balanced_rows(reader, 2 * len(set(kinds)))
    two_kinds = [json.loads(t)["kind"] for t in reader.dataset.take(two, columns=["truth"]).column("truth").to_pylist()]
    assert all(two_kinds.count(k) == min(2, kinds.count(k)) for k in set(kinds))  # at most 2 of each

    world = world_spec(32, 32)
    scenes, per_kind = [], {}
    for index in range(2000):  # 10 scenes of each kind, half of them drawn right
        scene = make_scene(7, index, 32, 32)
        if per_kind.get(scene["kind"], 0) < 10:
            per_kind[scene["kind"]] = per_kind.get(scene["kind"], 0) + 1
            scenes.append(scene)
    rng = np.random.default_rng(0)
    images = np.stack([render(s) if rng.random() < 0.5 else np.zeros((32, 32, 3), np.uint8) for s in scenes])
    result = shapeeval(images, scenes, world)
    stated = standard_error(images, scenes, world, result)
    by_kind = {}
    for i, scene in enumerate(scenes):
        by_kind.setdefault(scene["kind"], []).append(i)
    draws = []
    for _ in range(300):
        picked = np.concatenate([rng.choice(ix, len(ix)) for ix in by_kind.values()])
        draws.append(shapeeval(images[picked], [scenes[i] for i in picked], world)["overall"])
    assert 0.03 < stated < 0.2
    assert stated == pytest.approx(float(np.std(draws)), rel=0.25)


@pytest.mark.slow
def test_ray_train_takes_fsdp_from_the_config(tiny_cache, tmp_path, local_ray):
    """train.strategy fsdp on two Ray Train workers: FSDP2, the whole weights exported."""
    from train.ray_train import run_ray_stages

    config = config_for(tiny_cache, tmp_path, train={"accelerator": "cpu", "steps": 3, "strategy": "fsdp"})
    lines = []
    assert run_ray_stages(config, workers=2, gpus=False, progress=False, log=lines.append) == 0, lines
    exported = load_exported(config.run_path / "checkpoints")  # strict: shards would not load
    assert exported.step == 3 and "error: None" in lines[0]


@pytest.mark.slow
def test_fsdp_trains_what_ddp_trains_and_resumes_exactly(tiny_cache, tmp_path):
    """`python -m train` with train.strategy fsdp on 2 CPU processes (FSDP2 over gloo): the same
    losses and weights as DDP, EMA included; stopped after 2 steps and resumed to 4, the same
    weights as 4 steps at once (whole checkpoints, gathered to rank 0)."""
    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}

    def train(name: str, steps: int, strategy: str, fresh: bool = True) -> Config:
        config = config_for(tiny_cache, tmp_path / name, train={
            "steps": steps, "batch_size": 8, "devices": 2, "accelerator": "cpu", "strategy": strategy,
            "warmup_steps": 1, "lr": 1e-3, "checkpoint_every": 1000})
        path = tmp_path / f"{name}-{steps}.yaml"
        path.write_text(yaml.safe_dump(config.to_dict()))
        done = subprocess.run([sys.executable, "-m", "train", "--config", str(path), *(["--fresh"] if fresh else [])],
                              cwd=root, env=dict(env, PYTHONPATH=str(root)), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return config

    def weights(config: Config, name: str) -> dict:
        return load_file(str(config.run_path / "checkpoints" / f"{name}.safetensors"))

    ddp, fsdp = train("ddp", 4, "ddp"), train("fsdp", 4, "fsdp")
    np.testing.assert_allclose(losses(fsdp).to_numpy(), losses(ddp).to_numpy(), rtol=1e-5)
    for name in ("model", "ema"):
        for key, value in weights(ddp, name).items():
            torch.testing.assert_close(weights(fsdp, name)[key], value, atol=3e-5, rtol=1e-4,
                                       msg=lambda m: f"{name} {key}: {m}")
    train("resumed", 2, "fsdp")
    resumed = train("resumed", 4, "fsdp", fresh=False)
    for name in ("model", "ema"):
        for key, value in weights(fsdp, name).items():
            torch.testing.assert_close(weights(resumed, name)[key], value, atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"{name} {key}: {m}")
