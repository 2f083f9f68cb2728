# Fresh-machine entry points (only Python is needed beforehand).
#   make demo   set up .venv and run the main job end to end on the embedded synthetic dataset
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# ModelOpt (INT8 Q/DQ) pulls onnxruntime-gpu, cupy and its own onnx/numpy: it lives in a venv of its own and is
# called as a subprocess (sdconet/deploy/quantize.py finds it at .venv-modelopt/bin/python).
MODELOPT_VENV ?= .venv-modelopt
MODELOPT_STAMP := $(MODELOPT_VENV)/.installed

.PHONY: setup test demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,bench]"  # bench: sahi for tests/test_scene_sahi.py (benchmarks/scene.py --vs-sahi)
	touch $(STAMP)

$(MODELOPT_STAMP):
	$(PYTHON) -m venv $(MODELOPT_VENV)
	$(MODELOPT_VENV)/bin/python -m pip install -q --upgrade pip
	$(MODELOPT_VENV)/bin/python -m pip install -q torch==2.14.1 "nvidia-modelopt[onnx]"
	touch $(MODELOPT_STAMP)

# The fused MSDA CPU kernel (OpenVINO extension): built from source with the system compiler and cmake, cached under
# sdconet/kernels/cpu/build/ (rebuilt when a source changes).
CPU_KERNEL_STAMP := $(VENV)/.cpu-kernel
$(CPU_KERNEL_STAMP): $(STAMP) $(wildcard sdconet/kernels/cpu/*.cpp sdconet/kernels/cpu/*.hpp sdconet/kernels/cpu/CMakeLists.txt)
	$(PY) -m sdconet.kernels.cpu
	touch $(CPU_KERNEL_STAMP)

setup: $(STAMP) $(MODELOPT_STAMP) $(CPU_KERNEL_STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m sdconet.pipeline.demo

clean:
	rm -rf runs .cache engines/*.onnx engines/*.json
