"""Recipes: every shipped config loads; paper sizes have the parameter counts they imply."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from store.config import PAPER_INSTRUCTION, ConfigError, config_from_dict, encoder_features, load_config
from train.model import build_kwargs, count_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "matrices"),
                         ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert config.name == path.stem


@pytest.mark.parametrize("path", sorted((CONFIGS / "matrices").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_matrix_loads_with_all_its_recipes(path):
    from train.matrix import load_matrix

    matrix = load_matrix(path)  # loads and validates every (recipe, seed)'s config
    assert matrix.runs and len({run.key for run in matrix.runs}) == len(matrix.runs)


def paper_encoders(config) -> list[dict]:
    """What a cache of LLaMA3-8B and Qwen1.5-7B would record (both hidden 4096)."""
    return [{"hidden_size": 4096, "prefix_len": 32} for _ in config.encoders]


@pytest.mark.parametrize("name, low, high", [("lidit-1b", 0.9e9, 1.3e9), ("lidit-10b", 9e9, 12e9)])
def test_paper_sizes_imply_their_parameter_counts_without_allocating(name, low, high):
    config = load_config(CONFIGS / f"{name}.yaml")
    kwargs = build_kwargs(config.model, paper_encoders(config), {"channels": 16})
    n = count_parameters(kwargs)  # built on the meta device
    print(f"{name}: {n:,} parameters")
    assert low < n < high


def test_ablation_recipe_inherits_its_base_and_keeps_its_own_name():
    config = load_config(CONFIGS / "ablations" / "two-llm-concat.yaml")  # base.yaml, then default.yaml
    default = load_config(CONFIGS / "default.yaml")
    assert config.model.fusion == "concat" and default.model.fusion == "collaborative"
    # the default's training recipe, but the lr, beta2 and times every ablation record was measured with
    assert (config.train.lr, config.train.adam_beta2) == (1.0e-3, 0.999)
    assert (config.train.logit_mean, config.train.logit_std) == (0.0, 1.0) != (default.train.logit_mean,
                                                                                default.train.logit_std)
    assert config.model.dim == default.model.dim
    assert config.model.prediction == "velocity" and default.model.prediction == "sample"
    assert config.train == dataclasses.replace(default.train, lr=1.0e-3, adam_beta2=0.999, logit_mean=0.0,
                                               logit_std=1.0)
    assert (config.sample.cfg_scale, config.sample.cfg_interval) == (3.0, [0.0, 1.0])
    assert str(config.run_path) == "runs/two-llm-concat"
    assert str(config.cache_path) == "runs/ablations/cache"


def test_override_sets_a_nested_value():
    config = load_config(CONFIGS / "default.yaml", ["model.refiner_depth=3", "encoders.0.layer=-2"])
    assert config.model.refiner_depth == 3 and config.encoders[0].layer == -2
    # YAML 1.1 reads a bare `off` as false; the option keeps its name (bench/gpu.py failed on it)
    assert load_config(CONFIGS / "default.yaml", ["train.compile=off"]).train.compile == "off"
    # and `4e-3` (no dot) as a string: a float key takes it as the number it spells (a GPU run failed on it)
    assert load_config(CONFIGS / "default.yaml", ["train.lr=4e-3"]).train.lr == 4e-3


@pytest.mark.parametrize("override, message", [
    ("model.fusion=sum", r"model.fusion: 'sum' is not one of \['collaborative', 'concat'\]"),
    ("sample.solver=ddim", r"sample.solver: 'ddim' does not fit train.objective 'flow'"),
    ("model.encoders=[gpt]", r"model.encoders: \['gpt'\] not among encoders"),
    ("model.rope=true model.dim=192 model.heads=32", r"model.rope: the head width model.dim / model.heads = 6 must be divisible by 4"),
    ("model.abs_pos=true model.rope=false model.dim=130 model.heads=2", r"model.abs_pos: model.dim 130 must be divisible by 4"),
    ("train.steps=many", r"train.steps: expected an integer"),
    ("encoders.0.layer=0", r"encoders\[0\].layer: 0 is the embedding layer"),
    ("train.batch_size=0", r"train.batch_size: must be >= 1, got 0"),
    ("train.steps=-1", r"train.steps: must be >= 0, got -1"),  # 0: export the initial weights
    ("train.lr=0", r"train.lr: must be > 0"),
    ("train.lr=fast", r"train.lr: expected a number, got 'fast'"),
    ("train.ema_decay=1.0", r"train.ema_decay: must be in \[0, 1\)"),
    ("train.logit_std=0", r"train.logit_std: must be > 0, got 0"),
    ("train.high_t_share=1.5", r"train.high_t_share: must be in \[0, 1\], got 1.5"),
    ("train.high_t_from=1.0", r"train.high_t_from: must be in \[0, 1\), got 1.0"),
    ("train.high_t_share=0.3 train.high_t_from=0.95", None),
    ("data.mirror=[diagonal]", r"data.mirror: \['diagonal'\]; allowed: each of \['horizontal', 'vertical'\] at most once"),
    ("data.mirror=[horizontal,horizontal]", r"data.mirror: .* at most once"),
    ("data.mirror=[horizontal,vertical]", None),
    ("data.source=captions data.path=c.txt data.mirror=[vertical]", r"data.mirror: needs data.source shapes"),
    ("train.adam_beta2=1.0", r"train.adam_beta2: must be in \[0, 1\), got 1.0"),
    ("train.adam_beta2=0.95", None),
    ("train.compile=off", None),  # YAML's false, read back as the option it spells
    ("train.compile=on", r"train.compile: True is not one of"),
    ("sample.cfg_interval=[0.8,0.2]", r"sample.cfg_interval: expected \[low, high\] with 0 <= low < high <= 1, got \[0.8, 0.2\]"),
    ("sample.cfg_interval=[0.1]", r"sample.cfg_interval: expected \[low, high\]"),
    ("sample.cfg_interval=[0.1,1.0]", None),
    ("model.prediction=noise", r"model.prediction: 'noise' is not one of \['velocity', 'sample'\]"),
    ("model.prediction=sample train.objective=eps sample.solver=ddim",
     r"model.prediction: 'sample' needs train.objective 'flow', got 'eps'"),
    ("model.prediction=sample", None),
    ("sample.steps=0", r"sample.steps: must be >= 1, got 0"),
    ("train.precision=auto", None),
    ("train.devices=2", None),
    ("train.devices=some", r"train.devices: 'some' is not one of \['auto'\]"),
    ("train.devices=0", r"train.devices: must be >= 1, got 0"),
    ("train.devices=3", r"train.batch_size: 16 rows cannot be shared evenly by train.devices=3"),
    ("encoders.0.compute_dtype=bfloat16", None),
    ("encoders.0.compute_dtype=half", r"encoders\[0\].compute_dtype: 'half' is not one of"),
])
def test_bad_values_name_the_key_and_the_allowed_values(override, message):
    if message is None:  # a good value, beside the bad ones
        load_config(CONFIGS / "default.yaml", override.split())
        return
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(CONFIGS / "default.yaml", override.split())
    assert "\n" not in str(caught.value)  # one line


def test_a_bidirectional_encoder_gets_no_instruction_by_default(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("encoders:\n  - {name: bert, path: x, kind: bidirectional}\n  - {name: llm, path: y}\n")
    config = load_config(recipe)
    assert config.encoders[0].instruction is None
    assert config.encoders[1].instruction == PAPER_INSTRUCTION


def test_a_config_rebuilt_from_a_checkpoint_is_validated():
    raw = load_config(CONFIGS / "default.yaml").to_dict()
    raw["train"]["batch_size"] = 0
    with pytest.raises(ConfigError, match="train.batch_size"):
        config_from_dict(raw)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_encoder_features_are_each_named_encoders_path_and_layer_in_the_order_asked():
    raw = load_config(CONFIGS / "default.yaml").to_dict()
    assert encoder_features(raw) == [("smollm2", "embedded:smollm2", -3), ("minilm", "embedded:minilm", -1)]
    assert encoder_features(raw, ["minilm"]) == [("minilm", "embedded:minilm", -1)]
    penultimate = load_config(CONFIGS / "default.yaml", ["encoders.0.layer=-2"]).to_dict()
    assert encoder_features(penultimate) != encoder_features(raw)  # what init_from and resume refuse


def write_curriculum(tmp_path, stages, **train) -> Path:
    import yaml

    path = tmp_path / "curriculum.yaml"
    path.write_text(yaml.safe_dump({"base": str(CONFIGS / "default.yaml"), "name": "cur",
                                    "run_dir": str(tmp_path / "cur"), "train": {**train, "stages": stages}}))
    return path


def test_stages_chain_their_folders_and_weights_and_each_changes_only_what_it_names(tmp_path):
    from store.config import stage_configs

    path = write_curriculum(tmp_path, [
        {"name": "read", "steps": 10, "repeat_kinds": {"single": 0, "relation": 2}, "high_t_share": 1.0},
        {"name": "keep", "repeat_kinds": {"single": 1}, "init_from": str(tmp_path / "elsewhere")},
        {"name": "draw", "steps": 30, "lr": 1e-4}], batch_size=8, init_from=str(tmp_path / "start"))
    config = load_config(path)
    read, keep, draw = stage_configs(config)
    assert [s.run_dir for s in (read, keep, draw)] == [
        str(tmp_path / "cur" / "stages" / "1-read"), str(tmp_path / "cur" / "stages" / "2-keep"), str(tmp_path / "cur")]
    # the first starts where the config says, a stage's own init_from is not inherited, and
    # otherwise each starts from the stage before
    assert [s.train.init_from for s in (read, keep, draw)] == [
        str(tmp_path / "start"), str(tmp_path / "elsewhere"), str(tmp_path / "cur" / "stages" / "2-keep")]
    assert [s.train.steps for s in (read, keep, draw)] == [10, 10, 30]
    assert keep.train.repeat_kinds == {"single": 1, "relation": 2}  # merged key by key
    assert [s.train.high_t_share for s in (read, keep, draw)] == [1.0, 1.0, 1.0]
    assert [s.train.lr for s in (read, keep, draw)] == [config.train.lr, config.train.lr, 1e-4]
    assert all(s.train.batch_size == 8 and s.train.stages == [] for s in (read, keep, draw))
    assert stage_configs(read) == [read]  # a config without stages is its one training


@pytest.mark.parametrize("stages, message", [
    ([{"steps": 5}], r"train.stages\[0\].name: required"),
    ([{"name": "a/b"}], r"train.stages\[0\].name: required, a folder name"),
    ([{"name": "a"}, {"name": "a"}], r"train.stages\[1\].name: 'a' names an earlier stage too"),
    ([{"name": "a"}, {"name": "b", "bach_size": 4}], r"train.stages\[1\] \(b\): train: unknown key\(s\) \['bach_size'\]"),
    ([{"name": "a", "batch_size": 0}], r"train.stages\[0\] \(a\): train.batch_size"),
    ([{"name": "a", "stages": [{"name": "b"}]}], r"train.stages\[0\]: a stage cannot have stages"),
])
def test_a_wrong_stage_is_refused_naming_the_stage_and_the_key(tmp_path, stages, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_curriculum(tmp_path, stages))


def test_the_long_recipe_is_the_relation_curriculum_as_measured():
    """configs/long.yaml's stages, flattened, are the four stage configs of sessions 18-20
    (ck-pol-b128: 0.810): the numbers it cites were measured with these values."""
    from store.config import stage_configs

    read, keep, draw, polish = stage_configs(load_config(CONFIGS / "long.yaml"))
    assert [(s.train.steps, s.train.batch_size) for s in (read, keep, draw, polish)] == [
        (1850, 32), (1850, 32), (7500, 32), (2000, 128)]
    assert sum(s.train.steps * s.train.batch_size for s in (read, keep, draw, polish)) == 614_400
    assert [s.train.high_t_share for s in (read, keep, draw, polish)] == [1.0, 0.5, 0.5, 0.25]
    assert read.train.repeat_kinds == {"single": 0, "two_objects": 0, "counting": 0, "attributes": 0}
    assert polish.train.repeat_kinds == {"single": 1, "two_objects": 1, "counting": 1, "attributes": 1, "relation": 3}
    assert read.data.mirror == ["horizontal", "vertical"] and polish.run_dir == "runs/long"


def test_the_config_reference_is_generated_from_the_dataclasses_and_current():
    """docs/CONFIG.md: `python -m store.config_doc > docs/CONFIG.md` after changing store/config.py."""
    from pathlib import Path

    from store.config_doc import render

    text = render()
    assert "| `train.precision` |" in text and "| `encoders[].layer` |" in text
    written = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    assert written == text, "docs/CONFIG.md is stale: run python -m store.config_doc > docs/CONFIG.md"
