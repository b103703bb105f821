# Two entry points (see README.md):
#   make demo   installs everything (venv, pinned packages, Fashion-MNIST from Debian) and prunes ResNet-56
#   make test   installs the venv if needed and runs the test suite
PY      := .venv/bin/python
STAMP   := .venv/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test install data clean-demo

$(STAMP): pyproject.toml requirements/env.txt requirements/nodeps.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/env.txt -e '.[dev,hf]'
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

clean-demo:
	rm -rf runs/demo
