# Two entry points (see README.md):
#   make demo   installs everything (venv, pinned packages, Fashion-MNIST from Debian) and prunes ResNet-56
#   make test   installs the venv if needed and runs the test suite
#   make test-hf5   the Hugging Face tests again on transformers 5.x (requirements/hf5.txt), in .venv/hf5
PY      := .venv/bin/python
STAMP   := .venv/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test test-hf5 install data clean-demo

$(STAMP): pyproject.toml requirements/env.txt requirements/nodeps.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/env.txt -e '.[dev,hf,plots]'
	$(PY) -m pip install --quiet --no-deps -r requirements/nodeps.txt
	touch $(STAMP)

install: $(STAMP)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

data: $(FMNIST)

# The main job: prune the project's trained ResNet-56 (checkpoints/) to half its parameters on Fashion-MNIST,
# fine-tune briefly on the CPU and print the before/after table. Output: runs/demo/.
demo: install data
	$(PY) -m haprune.cli prune --model resnet56 --weights checkpoints/resnet56-fmnist.safetensors \
	    --target 0.5 --implant-ratio 0.1 --implant-init lstsq --finetune-epochs 1 --train-limit 12800 \
	    --distill 0.5 --out runs/demo --onnx
	$(PY) -m haprune.cli eval runs/demo

test: install
	$(PY) -m pytest

# transformers 5.x beside the pinned 4.57: .venv/hf5 sees the main venv's packages (torch, haprune, ...) through a
# .pth file and installs only transformers 5 and what it needs over them. Runs the haprune.hf test files.
HF5      := .venv/hf5
HF_TESTS := $(sort $(wildcard tests/test_hf*.py))

$(HF5)/.installed: $(STAMP) requirements/hf5.txt
	rm -rf $(HF5)
	python3 -m venv $(HF5)
	base=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	site=$$($(HF5)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	echo "import site; site.addsitedir('$$base')" > "$$site/haprune-base.pth"
	$(HF5)/bin/python -m pip install --quiet -r requirements/hf5.txt
	touch $@

test-hf5: $(HF5)/.installed
	$(HF5)/bin/python -c 'import transformers; print("transformers", transformers.__version__)'
	HAPRUNE_HF_OTHER_PYTHON=$(abspath $(PY)) $(HF5)/bin/python -m pytest $(HF_TESTS)

clean-demo:
	rm -rf runs/demo

# report.html as a user sees it: the browser test of tests/test_report_html.py, then screenshots of the pages of
# benchmarks/explore_cost.py's runs (docs/images/report_page.png, explore_page.png) in headless Chromium
# (Debian package chromium: apt-get install chromium).
.PHONY: check-report
check-report: install
	@command -v chromium >/dev/null || { echo "check-report needs chromium: apt-get install chromium"; exit 1; }
	$(PY) -m pytest -q tests/test_report_html.py
	$(PY) benchmarks/report_screenshots.py
