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
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt "dynamic-network-architectures>=0.4.4,<0.5"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/medseg demo -o demo_output

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

# Retrain the bundled models from $MEDSEG_DATA/hippocampus (default ../shared/data/hippocampus) and pack
# them (about 3 hours on 2 CPU cores): hippocampus-fast is the DynUNet 16-128 trained on the labels;
# hippocampus-ensemble pairs it with a 24-192 (mirror TTA); the default hippocampus is the 16-128 distilled
# from that ensemble in two stages, then given flat 3x1x3 kernels at its two finest levels and distilled in two
# more. The recipes are in benchmarks/configs/.
bundle-model: $(STAMP)
	$(BIN)/medseg train benchmarks/configs/hippocampus_cv_dynunet.yaml --folds 5 --fold 0
	$(BIN)/medseg train benchmarks/configs/hippocampus_cv_all_w24.yaml --set data.test_fraction=0.2 \
		--set data.val_fraction=0 --set train.output_dir=runs/bundle_w24
	$(BIN)/medseg pack-model runs/cv_dynunet/fold_0/best.pt medseg/assets/models/hippocampus-fast.pt \
		--set inference.overlap=0.25
	$(BIN)/medseg pack-model runs/cv_dynunet/fold_0/best.pt runs/bundle_w24/best.pt \
		medseg/assets/models/hippocampus-ensemble.pt --int8 --set inference.overlap=0.25 --set inference.tta=true
	$(BIN)/medseg train benchmarks/configs/hippocampus_distill_w16.yaml
	$(BIN)/medseg train benchmarks/configs/hippocampus_distill_w16c.yaml
	$(BIN)/python benchmarks/flatten_kernels.py runs/distill_w16c/last.pt runs/distill_flat/init.pt \
		--kernels 3,1,3 3,1,3 3,3,3 3,3,3
	$(BIN)/medseg train benchmarks/configs/hippocampus_distill_flat.yaml
	$(BIN)/medseg train benchmarks/configs/hippocampus_distill_flat_b.yaml
	$(BIN)/medseg pack-model runs/distill_flat_b/best.pt medseg/assets/models/hippocampus.pt \
		--set inference.overlap=0.25 --set inference.tta=false
	$(BIN)/medseg train configs/glioma.yaml --folds 4 --set train.output_dir=runs/glioma_cv
	$(BIN)/medseg pack-model runs/glioma_cv medseg/assets/models/glioma.pt --int8

benchmark: $(STAMP)
	$(BIN)/python benchmarks/hippocampus.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
