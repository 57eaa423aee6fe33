# medseg: two commands on a fresh machine.
#   make demo   set up .venv/ and segment the bundled sample with the bundled model
#   make test   set up .venv/ (if needed) and run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medseg-installed

.PHONY: setup demo test bundle-model benchmark clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/medseg demo -o demo_output

test: $(STAMP)
	$(BIN)/python -m pytest

# Retrain the bundled default model from ../shared/data/hippocampus and pack it (about 40 min on 2 CPU cores).
bundle-model: $(STAMP)
	$(BIN)/medseg train configs/hippocampus_cv_dynunet.yaml --folds 5 --fold 0
	$(BIN)/medseg pack-model runs/cv_dynunet/fold_0/best.pt medseg/assets/models/hippocampus.pt \
		--set inference.overlap=0.25

benchmark: $(STAMP)
	$(BIN)/python benchmarks/hippocampus.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
