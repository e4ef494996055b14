# resafe build. `make` builds build/resafe (CPU backend always; CUDA backend when nvcc exists),
# `make test` runs the CPU test suite, `make test-gpu` the GPU suite (on a GPU machine).
#
# Variables:
#   DEPS_PREFIX=/path  a folder where Debian packages were unpacked with `dpkg -x` (cJSON, inih)
#                      for machines that lack them (the GPU device image).
#   CUDA=0             build without the CUDA backend even when nvcc exists.
#   NVCC_GENCODE=...   CUDA targets (default: Hopper sm_90a + portable PTX for compute_80).
#   NCCL_HOME=/path    where NCCL is (include/nccl.h, lib/libnccl.so) when not with CUDA;
#   NCCL=0             build without the nccl transport even when nccl.h is found.

CC       ?= gcc
NVCC     ?= nvcc
BUILD    ?= build
OPT      ?= -O2
PYTHON   ?= python3

SAN      ?=
RS_CFLAGS := -std=c11 $(OPT) -g -Wall -Wextra -Werror -fopenmp -Iinclude -D_GNU_SOURCE $(SAN)
RS_LDFLAGS := $(SAN)
LDLIBS   += -fopenmp -lm

HDF5_CFLAGS := $(shell pkg-config --cflags hdf5 2>/dev/null || echo -I/usr/include/hdf5/serial)
HDF5_LIBS   := $(shell pkg-config --libs hdf5 2>/dev/null || echo -L/usr/lib/x86_64-linux-gnu/hdf5/serial -lhdf5)
RS_CFLAGS += $(HDF5_CFLAGS) -I/usr/include/cjson
LDLIBS   += $(HDF5_LIBS) -lcjson -linih

ifneq ($(DEPS_PREFIX),)
DEPS_ABS := $(abspath $(DEPS_PREFIX))
RS_CFLAGS += -I$(DEPS_ABS)/usr/include -I$(DEPS_ABS)/usr/include/cjson
RS_LDFLAGS += -L$(DEPS_ABS)/usr/lib/x86_64-linux-gnu -Wl,-rpath,$(DEPS_ABS)/usr/lib/x86_64-linux-gnu
endif

# ---- CUDA backend, whenever nvcc exists
CUDA ?= $(if $(shell command -v $(NVCC) 2>/dev/null),1,0)
NVCC_GENCODE ?= -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_80,code=compute_80
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(shell command -v $(NVCC) 2>/dev/null))
NVCCFLAGS += -O2 -std=c++17 $(NVCC_GENCODE) -Iinclude -Xcompiler -Wall,-Wextra,-Werror \
             -Werror all-warnings
KERNEL_SRCS := $(wildcard kernels/*.cu)
ifeq ($(CUDA),1)
RS_CFLAGS += -DRS_HAVE_CUDA=1 -I$(CUDA_HOME)/include
LDLIBS   += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcudart -lstdc++
KERNEL_OBJS := $(patsubst kernels/%.cu,$(BUILD)/obj/kernels/%.o,$(KERNEL_SRCS))
endif

# ---- NCCL (the nccl transport of src/comm_nccl.c), with the CUDA backend when nccl.h is found:
# NCCL_HOME first, then the CUDA toolkit, the system, and pip's nvidia-nccl wheel.
ifeq ($(CUDA),1)
NCCL_PIP := $(shell $(PYTHON) -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null)
NCCL_INC := $(patsubst %/nccl.h,%,$(firstword $(wildcard $(addsuffix /nccl.h,\
              $(if $(NCCL_HOME),$(NCCL_HOME)/include) $(CUDA_HOME)/include /usr/include \
              /usr/local/include $(if $(NCCL_PIP),$(NCCL_PIP)/include)))))
NCCL_LIB := $(patsubst %/,%,$(dir $(firstword $(wildcard $(foreach d,\
              $(if $(NCCL_HOME),$(NCCL_HOME)/lib $(NCCL_HOME)/lib64) $(CUDA_HOME)/lib64 \
              $(CUDA_HOME)/lib /usr/lib/x86_64-linux-gnu /usr/local/lib \
              $(if $(NCCL_PIP),$(NCCL_PIP)/lib),$(d)/libnccl.so $(d)/libnccl.so.2)))))
NCCL ?= $(if $(and $(NCCL_INC),$(NCCL_LIB)),1,0)
else
NCCL := 0
endif
ifeq ($(NCCL),1)
RS_CFLAGS += -DRS_HAVE_NCCL=1 -I$(NCCL_INC)
LDLIBS   += -L$(NCCL_LIB) -Wl,-rpath,$(NCCL_LIB) $(if $(wildcard $(NCCL_LIB)/libnccl.so),-lnccl,-l:libnccl.so.2)
endif

LIB_SRCS  := $(filter-out src/main.c src/cmd_%.c,$(wildcard src/*.c))
CMD_SRCS  := src/main.c $(wildcard src/cmd_*.c)
LIB_OBJS  := $(patsubst src/%.c,$(BUILD)/obj/src/%.o,$(LIB_SRCS)) $(KERNEL_OBJS)
CMD_OBJS  := $(patsubst src/%.c,$(BUILD)/obj/src/%.o,$(CMD_SRCS))
UNIT_SRCS := $(wildcard tests/unit/*.c)
UNIT_OBJS := $(patsubst tests/unit/%.c,$(BUILD)/obj/tests/%.o,$(UNIT_SRCS))
# test tools: small programs the Python reference tests drive (one .c file each)
TOOL_SRCS := $(wildcard tests/tools/*.c)
TOOL_BINS := $(patsubst tests/tools/%.c,$(BUILD)/tools/%,$(TOOL_SRCS))

# Objects depend on the flags they were built with: switching CUDA=0/1, OPT or SAN rebuilds.
FLAGS_STAMP := $(BUILD)/.flags
FLAGS_NOW := $(RS_CFLAGS) $(CFLAGS) | $(NVCCFLAGS) | $(CUDA) | $(NCCL)
$(shell mkdir -p $(BUILD); [ "$$(cat $(FLAGS_STAMP) 2>/dev/null)" = "$(FLAGS_NOW)" ] || echo "$(FLAGS_NOW)" > $(FLAGS_STAMP))

.PHONY: all test test-gpu asan fuzz fuzz-run demo deps clean format bench plots sweep
all: $(BUILD)/resafe $(BUILD)/test_unit $(TOOL_BINS)

$(BUILD)/libresafe.a: $(LIB_OBJS)
	@mkdir -p $(@D)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/resafe: $(CMD_OBJS) $(BUILD)/libresafe.a
	$(CC) $(RS_LDFLAGS) $(LDFLAGS) -o $@ $(CMD_OBJS) $(BUILD)/libresafe.a $(LDLIBS)

$(BUILD)/test_unit: $(UNIT_OBJS) $(BUILD)/libresafe.a
	$(CC) $(RS_LDFLAGS) $(LDFLAGS) -o $@ $(UNIT_OBJS) $(BUILD)/libresafe.a $(LDLIBS)

$(BUILD)/tools/%: tests/tools/%.c $(BUILD)/libresafe.a
	@mkdir -p $(@D)
	$(CC) $(RS_CFLAGS) $(CFLAGS) $(RS_LDFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libresafe.a $(LDLIBS)

$(BUILD)/obj/src/%.o: src/%.c $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(RS_CFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/obj/tests/%.o: tests/unit/%.c $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(RS_CFLAGS) $(CFLAGS) -Itests/unit -MMD -MP -c $< -o $@

$(BUILD)/obj/kernels/%.o: kernels/%.cu $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(NVCC) $(NVCCFLAGS) -MMD -MP -c $< -o $@

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)

# ---- dependencies: installed on demand (apt + pip), see scripts/deps.sh
deps:
	@scripts/deps.sh

# ---- tests
TEST_ARGS ?=
test:
	@scripts/deps.sh --check || scripts/deps.sh
	@$(MAKE) --no-print-directory all
	@$(PYTHON) tests/run.py $(TEST_ARGS)

# GPU tests: needs a CUDA device (run through the device tool, see README).
test-gpu:
	@$(MAKE) --no-print-directory all
	@RESAFE_TEST_GPU=1 $(PYTHON) tests/run.py --gpu-only $(TEST_ARGS)

# AddressSanitizer + UBSan build of the CPU code, then the test suite against it.
asan:
	@$(MAKE) --no-print-directory BUILD=build/asan CUDA=0 OPT="-O1 -fno-omit-frame-pointer" \
	  SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined" all
	@RESAFE_BUILD=build/asan ASAN_OPTIONS=detect_leaks=1 $(PYTHON) tests/run.py $(TEST_ARGS)

# libFuzzer targets (clang), one per untrusted reader.
FUZZ_TARGETS := safetensors hf_config tokenizer ini quant
FUZZ_CFLAGS  := -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Iinclude -D_GNU_SOURCE \
                $(HDF5_CFLAGS) -I/usr/include/cjson -fopenmp
fuzz: $(patsubst %,build/fuzz/fuzz_%,$(FUZZ_TARGETS))
build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $(LIB_SRCS)
	@mkdir -p $(@D)
	clang $(FUZZ_CFLAGS) -o $@ $< $(LIB_SRCS) $(HDF5_LIBS) -lcjson -linih -lm
FUZZ_SECONDS ?= 300
fuzz-run: fuzz
	@for t in $(FUZZ_TARGETS); do mkdir -p build/fuzz/corpus_$$t; \
	  echo "fuzzing $$t for $(FUZZ_SECONDS) s"; \
	  dict=; [ -f tests/fuzz/$$t.dict ] && dict=-dict=tests/fuzz/$$t.dict; \
	  build/fuzz/fuzz_$$t $$dict -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 \
	    build/fuzz/corpus_$$t tests/fuzz/seeds/$$t || exit 1; done

# the pipeline on the tiny model organism (scripts/demo.sh); dependencies first, as `make test`
demo:
	@scripts/deps.sh --check || scripts/deps.sh
	@$(MAKE) --no-print-directory all
	@scripts/demo.sh

# Report plots (scripts/plot_report.py) next to <RUN>/eval/report.md.
plots:
	@test -n "$(RUN)" || { echo "usage: make plots RUN=<run dir> [SWEEP=sweep.json]"; exit 2; }
	@$(PYTHON) scripts/plot_report.py $(RUN) $(if $(SWEEP),--sweep $(SWEEP))

sweep: all
	@$(PYTHON) scripts/sweep_bits.py $(or $(CONFIG),configs/organism-tiny.ini) --bits $(or $(BITS),8,4,3,2)

clean:
	rm -rf build

format:
	clang-format -i src/*.c include/resafe/*.h tests/unit/*.c tests/unit/*.h kernels/*.cu
