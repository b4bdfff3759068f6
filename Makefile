# Quick start:  make demo   (train on the synthetic phantoms, then evaluate)
#               make test   (the test suite)
# Both create .venv and install requirements_hybrid.txt on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
DEMO_CKPT := $(DEMO_DIR)/demo_hybrid_convnext_vit_embed_128_seed_0_best_ckpt.pth

.PHONY: demo test smoke install ablation

install: $(VENV)/.installed

$(VENV)/.installed: requirements_hybrid.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements_hybrid.txt
	touch $@

demo: install
	$(PYTHON) train.py --dataset demo --save-dir $(DEMO_DIR) --overwrite
	$(PYTHON) test.py --dataset demo --resume $(DEMO_CKPT) --report $(DEMO_DIR)/report.json

test: install
	$(PYTHON) -m pytest -q

smoke: install
	$(PYTHON) test_hybrid_model.py

# The recipe ablation of HYBRID_MODEL_GUIDE.md: 5 variants x 3 seeds of the demo training
# (about 5 minutes each on 2 CPU cores).
ablation: install
	$(PYTHON) ablate.py
