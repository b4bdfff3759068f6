# Quick start:  make demo   (train on the synthetic phantoms, then evaluate)
#               make test   (the linter, then the test suite)
# Both create .venv and install requirements_hybrid.txt on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
DEMO_CKPT := $(DEMO_DIR)/demo_hybrid_convnext_vit_embed_128_seed_0_best_ckpt.pth

.PHONY: demo demo-multilabel test smoke install ablation ablation-models ablation-multilabel ablation-defaults ablation-rerank saliency

install: $(VENV)/.installed

$(VENV)/.installed: requirements_hybrid.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements_hybrid.txt
	touch $@

demo: install
	$(PYTHON) train.py --dataset demo --save-dir $(DEMO_DIR) --overwrite
	$(PYTHON) test.py --dataset demo --resume $(DEMO_CKPT) --report $(DEMO_DIR)/report.json

# The multi-label demo: phantoms with co-occurring findings in NIH ChestX-ray14's layout (its
# list, label and image files), trained on the findings with the small setup, then evaluated with
# shared-finding relevance (MAP@R, nDCG, per finding, kNN AUROC).
ML_DATA ?= data/demo_nih
ML_DIR ?= runs/demo_multilabel
demo-multilabel: install
	test -d $(ML_DATA) || $(PYTHON) demo_data.py --multilabel nih --out $(ML_DATA)
	$(PYTHON) train.py --dataset nih --dataset-dir $(ML_DATA) --setup small -p 5 --save-dir $(ML_DIR) --overwrite
	$(PYTHON) test.py --resume $(ML_DIR)/nih_hybrid_convnext_vit_embed_128_seed_0_best_ckpt.pth \
		--report $(ML_DIR)/report.json --bootstrap 1000

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

smoke: install
	$(PYTHON) test_hybrid_model.py

# The recipe ablation of HYBRID_MODEL_GUIDE.md: 5 variants x 3 seeds of the demo training
# (a few minutes each on 2 CPU cores).
ablation: install
	$(PYTHON) ablate.py

# The model ablation of HYBRID_MODEL_GUIDE.md: backbones alone, the paper's fusion, the default
# hybrid and its parts, 3 seeds each, paired against ConvNeXtV2 alone (about 1.5 hours on 2 cores).
ablation-models: install
	$(PYTHON) ablate.py --suite models

# The multi-label comparison of HYBRID_MODEL_GUIDE.md: findings against combination classes, and
# the hybrid against ConvNeXtV2 alone, 3 seeds each on the NIH-layout phantoms (about 35 minutes).
ablation-multilabel: install
	$(PYTHON) ablate.py --suite multilabel

# The defaults check of HYBRID_MODEL_GUIDE.md: the hybrid's fusion and branch losses on the
# phantoms and on scikit-learn's digits (real scans in its wheel), 3 seeds each (about 70 minutes).
ablation-defaults: install
	$(PYTHON) ablate.py --suite defaults --data digits
	$(PYTHON) ablate.py --suite defaults --data demo

# The re-ranking check of HYBRID_MODEL_GUIDE.md: test.py --rerank aqe, dba, kreciprocal on the
# default runs of ablation-defaults (digits and phantoms), paired with the plain ranking.
ablation-rerank: install
	$(PYTHON) ablate.py --suite rerank --data digits
	$(PYTHON) ablate.py --suite rerank --data demo

# The saliency choice of HYBRID_MODEL_GUIDE.md (Explanations): explain.py's candidate maps on the
# demo checkpoint's validation phantoms, each beside a copy with re-initialised weights, and the
# winner on its test phantoms with the cascading randomisation and ROAD (12 explain.py runs,
# 29 passes over the images: about 2 hours on 2 CPU cores).
saliency: install
	$(PYTHON) saliency_selection.py --resume $(DEMO_CKPT) --mask-dir data/demo/masks --out $(DEMO_DIR)/saliency
