"""The stage-1 Ray job: stored features, bad input, kill-and-resume, `ray job submit`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM

from embed.job import run_embed
from store.config import ConfigError, build, Config, validate
from store.reader import CacheReader

ROOT = Path(__file__).resolve().parents[1]


def raw_config(tmp_path, llama_dir, bert_dir=None, source="captions", path=None, **sections) -> dict:
    encoders = [{"name": "llm", "path": str(llama_dir), "kind": "causal", "layer": -3,
                 "compute_dtype": "float32", "store_dtype": "bfloat16", "max_tokens": 32}]
    if bert_dir is not None:
        encoders.append({"name": "bert", "path": str(bert_dir), "kind": "bidirectional", "layer": -1,
                         "instruction": None, "compute_dtype": "float32", "store_dtype": "bfloat16"})
    raw = {"name": "t", "run_dir": str(tmp_path / "run"), "encoders": encoders,
           "data": {"source": source, "path": str(path) if path else None, "num_train": 40, "num_eval": 8},
           "embed": {"actors": 1, "threads_per_actor": 1, "batch_size": 8, "shard_rows": 16},
           "codec": {"buckets": [[32, 32], [32, 48]]}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


def make_config(raw: dict) -> Config:
    config = build(Config, raw, "")
    validate(config)
    return config


def write_captions(path: Path, n: int) -> Path:
    words = ["red", "green", "blue", "circle", "square", "triangle", "left", "of", "a", "two"]
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(rng.choice(words, size=rng.integers(2, 12))) for _ in range(n)) + "\n")
    return path


def test_stored_features_equal_a_plain_forward(tmp_path, llama_dir, bert_dir, local_ray):
    captions = write_captions(tmp_path / "captions.txt", 24)
    config = make_config(raw_config(tmp_path, llama_dir, bert_dir, path=captions))
    summary = run_embed(config, progress=False)
    assert summary.written == 24 and summary.rejected == 0
    reader = CacheReader(config.cache_path)
    rows = [0, 7, 23]
    batch = reader.take(rows, with_latents=False)
    llm = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    bert = AutoModel.from_pretrained(bert_dir, dtype=torch.float32).eval()
    table = reader.dataset.take(rows, columns=["llm__ids", "bert__ids"])
    prefix_ids = reader.meta["encoders"][0]["prefix_ids"]
    for i in range(len(rows)):
        for name, model, prefix in (("llm", llm, prefix_ids), ("bert", bert, [])):
            ids = prefix + table.column(f"{name}__ids")[i].as_py()
            with torch.no_grad():
                layer = -3 if name == "llm" else -1
                reference = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
            text = batch["text"][name]
            stored = text.states[i][text.mask[i]].float()  # prefix + caption, no padding
            assert stored.shape == reference.shape
            torch.testing.assert_close(stored, reference, rtol=2**-8, atol=1e-5)


def test_text_only_rows_have_no_latent(tmp_path, llama_dir, local_ray):
    captions = write_captions(tmp_path / "captions.txt", 5)
    config = make_config(raw_config(tmp_path, llama_dir, path=captions))
    run_embed(config, progress=False)
    table = lance.dataset(str(config.cache_path / "samples.lance")).to_table(columns=["latent", "bucket"])
    assert table.column("latent").null_count == 5


def _save(path: Path, size=(40, 40), color=(200, 10, 10)):
    Image.new("RGB", size, color).save(path)


def test_bad_inputs_are_rejected_with_reasons_and_good_rows_arrive(tmp_path, llama_dir, local_ray):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        _save(data / f"good{i}.png", size=(40 + 8 * i, 40))
        (data / f"good{i}.txt").write_text(f"a red square number {i}")
    _save(data / "empty.png"); (data / "empty.txt").write_text("")
    _save(data / "blank.png"); (data / "blank.txt").write_text("  \n\t ")
    _save(data / "latin1.png"); (data / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (data / "noimage.txt").write_text("a caption without its image")
    _save(data / "nocaption.png")
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (data / "corrupt.txt").write_text("a corrupt image")
    _save(data / "tiny.png", size=(8, 8)); (data / "tiny.txt").write_text("a tiny image")
    # A 20,000 x 10,000 grey PNG of a few hundred KB: PIL's own check raises DecompressionBombError
    # (not an OSError) on open; the header says how large it is before anything is decoded.
    Image.new("L", (20_000, 10_000), 128).save(data / "bomb.png", optimize=True)
    (data / "bomb.txt").write_text("a huge grey image")
    _save(data / "big.png", size=(96, 48)); (data / "big.txt").write_text("over the configured limit")
    config = make_config(raw_config(tmp_path, llama_dir, source="folder", path=data))
    config.data.max_image_pixels = 4_000  # good5 (80 x 40 = 3,200) fits, big (96 x 48 = 4,608) does not
    summary = run_embed(config, progress=False)
    assert summary.written == 6 and summary.rejected == 9
    rejects = {r["id"]: r["reason"] for r in lance.dataset(str(config.cache_path / "rejects.lance")).to_table().to_pylist()}
    assert rejects["empty"] == "empty caption"
    assert rejects["blank"] == "empty caption"
    assert rejects["latin1"].startswith("caption is not valid UTF-8")
    assert rejects["noimage"] == "missing image"
    assert rejects["nocaption"] == "missing caption"
    assert rejects["corrupt"].startswith("corrupt image")
    assert rejects["tiny"].startswith("image too small: 8x8")
    assert rejects["bomb"].startswith("image too large: 20000x10000 = 200,000,000 pixels > data.max_image_pixels")
    assert rejects["big"].startswith("image too large: 96x48")
    good = lance.dataset(str(config.cache_path / "samples.lance")).to_table(columns=["id", "bucket", "latent_shape"])
    assert sorted(good.column("id").to_pylist()) == [f"good{i}" for i in range(6)]
    assert set(good.column("bucket").to_pylist()) == {0, 1}  # square and wide images bucketed apart
    # A rerun skips everything: accepted and rejected ids are both committed.
    again = run_embed(config, progress=False)
    assert again.written == 0 and again.rejected == 0 and again.skipped == 15


@pytest.mark.parametrize("max_chars", [None, 500])
def test_an_overlong_caption_keeps_its_row_truncated_and_flagged(tmp_path, llama_dir, local_ray, max_chars):
    data = tmp_path / "data"
    data.mkdir()
    _save(data / "long.png")
    long_caption = " ".join(["a red square beside a blue circle"] * 340)  # 11,219 characters
    (data / "long.txt").write_text(long_caption)
    config = make_config(raw_config(tmp_path, llama_dir, source="folder", path=data,
                                    data={"max_caption_chars": max_chars}))
    summary = run_embed(config, progress=False, log=lambda *_: None)
    assert summary.written == 1 and summary.rejected == 0
    row = lance.dataset(str(config.cache_path / "samples.lance")).to_table().to_pylist()[0]
    assert row["llm__truncated"] and row["llm__ntok"] == 32  # the encoder's max_tokens
    assert row["caption"] == (long_caption if max_chars is None else long_caption[:max_chars])
    assert row["latent"] is not None


def test_layer_out_of_range_stops_before_any_work(tmp_path, llama_dir):
    captions = write_captions(tmp_path / "captions.txt", 5)
    raw = raw_config(tmp_path, llama_dir, path=captions)
    raw["encoders"][0]["layer"] = 7
    with pytest.raises(ConfigError, match=r"encoders\[0\] \(llm\): layer 7 is out of range"):
        run_embed(make_config(raw), progress=False)
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_names_the_key(tmp_path, llama_dir):
    raw = raw_config(tmp_path, llama_dir, path="x")
    raw["embed"]["actorz"] = 2
    with pytest.raises(ConfigError, match=r"embed: unknown key\(s\) \['actorz'\]"):
        make_config(raw)


def test_cache_built_with_other_encoders_is_refused(tmp_path, llama_dir, qwen_dir, local_ray):
    captions = write_captions(tmp_path / "captions.txt", 4)
    run_embed(make_config(raw_config(tmp_path, llama_dir, path=captions)), progress=False)
    from store.writer import CacheMismatch

    with pytest.raises(CacheMismatch, match="encoders"):
        run_embed(make_config(raw_config(tmp_path, qwen_dir, path=captions)), progress=False)


def start_embed_until_first_commit(tmp_path, llama_dir, n: int):
    """Start `python -m embed` on n captions in its own process group; return once a shard
    is committed. Returns (process, command, env, samples path)."""
    captions = write_captions(tmp_path / "captions.txt", n)
    raw = raw_config(tmp_path, llama_dir, path=captions, embed={"shard_rows": 16, "batch_size": 8})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    samples = tmp_path / "run" / "cache" / "samples.lance"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "embed", "--config", str(config_path), "--quiet"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not samples.exists():
        time.sleep(0.2)
    return proc, command, env, samples


def test_stderr_without_drops_only_the_named_native_lines_and_keeps_the_rest_in_order(capfd):
    from store.cli import stderr_without

    with pytest.raises(RuntimeError):  # lines written before an error still come out
        with stderr_without("Set ray log level"):
            subprocess.run(["sh", "-c", "echo first >&2; echo 'x logging.cc: Set ray log level to 3' >&2; "
                                        "echo second >&2"], check=True)
            raise RuntimeError("boom")
    assert capfd.readouterr().err.splitlines() == ["first", "second"]


def test_embed_prints_its_progress_and_summary_and_none_of_rays_internal_lines(tmp_path, llama_dir):
    """What a newcomer's terminal shows: the job's own bar and summary, not Ray's C++ notices."""
    captions = write_captions(tmp_path / "captions.txt", 24)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw_config(tmp_path, llama_dir, path=captions)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_BACKEND_LOG_LEVEL", None)
    done = subprocess.run([sys.executable, "-m", "embed", "--config", str(config_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = done.stdout + done.stderr
    assert "embed: wrote 24 rows" in shown and "caption/s" in shown  # the summary and the bar
    for internal in ("logging.cc", "core_worker", "constructor arguments", "Progress bars", "ray log level"):
        assert internal not in shown, f"{internal!r} reached the terminal:\n{shown[-2000:]}"


@pytest.mark.slow
def test_killed_encoder_worker_still_gives_exactly_one_row_per_id(tmp_path, llama_dir):
    n = 1500
    proc, command, env, samples = start_embed_until_first_commit(tmp_path, llama_dir, n)
    import psutil

    # The actor of this run: a descendant of its driver (the driver's own local Ray started it).
    workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)
               if "TextEncodeStage" in " ".join(p.cmdline())]
    assert workers, "an encoder actor of this run is running"
    os.kill(workers[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=400)
    if proc.returncode != 0:  # Ray may give up on the pipeline: a rerun must finish the job
        rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
    ids = lance.dataset(str(samples)).to_table(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == n


def test_manifest_jsonl_and_parquet_sources_embed_their_rows(tmp_path, llama_dir, local_ray):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        _save(images / f"{i}.png", size=(48, 32))
    lines = [json.dumps({"id": f"j{i}", "image": f"images/{i}.png", "caption": f"a red square {i}"}) for i in range(4)]
    lines.insert(2, "{not json")
    lines.append(json.dumps({"id": "j1", "image": "images/3.png", "caption": "the same id again"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    config = make_config(raw_config(tmp_path, llama_dir, source="manifest", path=tmp_path / "pairs.jsonl"))
    summary = run_embed(config, progress=False)
    assert summary.written == 4 and summary.rejected == 2
    assert summary.reasons == {"line 3": 1, "duplicate id": 1}
    kept = lance.dataset(str(config.cache_path / "samples.lance")).to_table(columns=["id", "caption"]).to_pylist()
    assert sorted(r["id"] for r in kept) == ["j0", "j1", "j2", "j3"]  # one row per id: the first entry's
    assert {r["caption"] for r in kept if r["id"] == "j1"} == {"a red square 1"}
    assert run_embed(config, progress=False).skipped == 6  # a rerun: every entry committed, the repeat too

    # the parquet form, with a huge image and a repeated id among its rows
    Image.new("L", (20_000, 10_000), 128).save(images / "bomb.png", optimize=True)
    pq.write_table(pa.table({"id": ["p0", "p1", "p0"], "image": [str(images / "0.png"), str(images / "bomb.png"),
                                                                str(images / "1.png")],
                             "caption": ["a wide red square", "a huge grey image", "the same id again"]}),
                   tmp_path / "pairs.parquet")
    raw = raw_config(tmp_path, llama_dir, source="manifest", path=tmp_path / "pairs.parquet")
    raw["run_dir"] = str(tmp_path / "run-parquet")
    summary = run_embed(make_config(raw), progress=False)
    assert summary.written == 1 and summary.reasons == {"image too large": 1, "duplicate id": 1}
    table = lance.dataset(str(tmp_path / "run-parquet" / "cache" / "samples.lance")).to_table()
    assert table.column("id").to_pylist() == ["p0"] and table.column("caption").to_pylist() == ["a wide red square"]
    assert table.column("bucket").to_pylist() == [1]  # 48x32 is nearer the 32x48 bucket's ratio


def test_vae_codec_latents_and_factors_are_recorded(tmp_path, llama_dir, local_ray):
    diffusers = pytest.importorskip("diffusers", reason="the 'vae' extra is not installed")
    vae_dir = tmp_path / "vae"
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                  norm_num_groups=4, sample_size=32, scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(vae_dir, safe_serialization=True)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        _save(data / f"{i}.png", size=(32, 32), color=(10 * i, 100, 200))
        (data / f"{i}.txt").write_text(f"a blue square {i}")
    raw = raw_config(tmp_path, llama_dir, source="folder", path=data, codec={"kind": "vae", "path": str(vae_dir)})
    config = make_config(raw)
    assert run_embed(config, progress=False).written == 3
    reader = CacheReader(config.cache_path)
    codec = reader.meta["codec"]
    assert (codec["kind"], codec["channels"], codec["downsample"]) == ("vae", 4, 2)
    assert (codec["scaling_factor"], codec["shift_factor"]) == (0.5, 0.1)
    latents = reader.take([0, 1, 2], with_latents=True)["latents"]
    assert latents.shape == (3, 4, 16, 16)
    from embed.codecs import VAECodec

    expected = VAECodec(str(vae_dir)).encode(np.stack([np.asarray(Image.open(data / f"{i}.png")) for i in range(3)]))
    ids = reader.take([0, 1, 2], with_latents=False)["ids"]
    order = [int(i) for i in ids]
    torch.testing.assert_close(latents, expected[order], rtol=0, atol=2e-3)  # float16 storage


def test_a_caption_shared_by_five_rows_is_encoded_once_and_stored_in_each(tmp_path, llama_dir, bert_dir, local_ray):
    """40 distinct captions, each on 5 rows, shuffled. Grouped by the driver and looked up
    by the actor, each is encoded once; every row holds the same states as its caption's
    other rows. (With several actors, a group split between two calls that go to two
    actors is encoded by each.)"""
    distinct = [line for line in write_captions(tmp_path / "distinct.txt", 200).read_text().splitlines()]
    distinct = list(dict.fromkeys(distinct))[:40]
    lines = [c for c in distinct for _ in range(5)]
    np.random.default_rng(1).shuffle(lines)
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    config = make_config(raw_config(tmp_path, llama_dir, bert_dir, path=tmp_path / "captions.txt"))
    summary = run_embed(config, progress=False)
    assert summary.written == 200 and summary.encoded == 40
    assert "captions encoded" in str(summary)
    table = lance.dataset(str(config.cache_path / "samples.lance")).to_table(
        columns=["caption", "llm__states", "bert__states"]).to_pylist()
    by_caption: dict[str, dict] = {}
    for row in table:
        first = by_caption.setdefault(row["caption"], row)
        assert row["llm__states"] == first["llm__states"] and row["bert__states"] == first["bert__states"]
    assert len(by_caption) == 40


def test_caption_memo_keeps_the_most_recently_used_captions_within_its_budget():
    from embed.encoder import EncodedCaption
    from embed.job import CaptionMemo

    def encoded(n: int) -> EncodedCaption:
        return EncodedCaption(np.arange(n, dtype=np.int32), torch.zeros(n, 4)[:n], False)  # 16 bytes a token

    memo = CaptionMemo(budget_bytes=100)
    memo.put("a", encoded(2))  # 32 + 1 bytes
    memo.put("b", encoded(2))
    assert memo.get("a") is not None  # "a" is now the most recent
    memo.put("c", encoded(2))  # 99 bytes: all fit
    memo.put("d", encoded(1))  # over budget: the least recently used ("b") goes
    assert memo.get("b") is None and all(memo.get(k) is not None for k in "acd")
    memo.put("huge", encoded(10))  # larger than the whole budget: not kept, nothing evicted
    assert memo.get("huge") is None and memo.used <= 100


def test_shapes_mirrors_are_embedded_beside_their_scenes_and_only_a_turned_relation_costs_a_forward(
        tmp_path, llama_dir, local_ray):
    from embed.shapes import make_scene, mirror_scene
    from embed.sources import EVAL_SEED_OFFSET

    config = make_config(raw_config(tmp_path, llama_dir, source="shapes",
                                    data={"num_train": 30, "num_eval": 4, "mirror": ["horizontal", "vertical"]}))
    summary = run_embed(config, progress=False)
    assert summary.written == 30 * 3 + 4 and summary.rejected == 0
    scenes = [make_scene(config.seed, i) for i in range(30)]
    turned = sum(mirror_scene(s, axis)["caption"] != s["caption"] for s in scenes for axis in ("horizontal", "vertical"))
    held_out = {make_scene(config.seed + EVAL_SEED_OFFSET, i)["caption"] for i in range(4)}
    assert turned > 0
    assert summary.encoded == len({s["caption"] for s in scenes}) + turned + len(held_out - {s["caption"] for s in scenes})
    reader = CacheReader(config.cache_path)
    ids = reader.column("id").tolist()
    assert ids.count("shapes-train-0000007-vertical") == 1
    assert sorted(i for i in ids if i.startswith("shapes-eval")) == [f"shapes-eval-{i:07d}" for i in range(4)]  # never mirrored
    for i, scene in enumerate(scenes):
        rows = [ids.index(f"shapes-train-{i:07d}" + suffix) for suffix in ("", "-horizontal", "-vertical")]
        batch = reader.take(rows)
        truths = [json.loads(t) for t in reader.dataset.take(rows, columns=["truth"]).column("truth").to_pylist()]
        assert truths == [scene, mirror_scene(scene, "horizontal"), mirror_scene(scene, "vertical")]
        assert batch["captions"] == [t["caption"] for t in truths]
        torch.testing.assert_close(batch["latents"][1], batch["latents"][0].flip(-1))  # left-right, pixel for pixel
