# Developer targets. The C core is normally built by `pip install .` (setup.py).
PY ?= .venv/bin/python
SAN_DIR := .work/sanitize

.PHONY: build test-native sanitize-test fuzz

# Built aside, then renamed over the old .so: a process that has the old one mapped keeps
# working (an in-place copy would rewrite the mapped file under it).
build:
	$(PY) setup.py -q build_ext --build-lib build/core --build-temp build/core-tmp
	for so in build/core/snapshotter/_*.so; do \
	  cp $$so snapshotter/.ext.so.tmp && mv snapshotter/.ext.so.tmp $${so#build/core/}; done

test-native: build
	$(PY) -m pytest tests/test_native*.py -q

# ASan/UBSan build of the C extensions, run against the tests that drive them directly
# (tests/test_native*.py), through the index reader (tests/test_index*.py, with their
# pure-Python oracle tests/pyscan.py) and the C tree builder (tests/test_tree_build.py,
# which also feeds it damaged records).
# Built and run in a private copy ($(SAN_DIR)) so the shared tree's normal _core stays
# usable by everyone else; Python itself is not instrumented, so libasan is preloaded.
sanitize-test:
	rm -rf $(SAN_DIR) && mkdir -p $(SAN_DIR)/src
	cp -r setup.py pyproject.toml native snapshotter $(SAN_DIR)/src/
	mkdir -p $(SAN_DIR)/src/tests && cp tests/test_native*.py tests/test_index*.py tests/test_tree_build.py tests/pyscan.py \
	  $(SAN_DIR)/src/tests/
	find $(SAN_DIR)/src/snapshotter -name '*.so' -delete
	cd $(SAN_DIR)/src && LAZYSNAP_SANITIZE=1 $(abspath $(PY)) setup.py build_ext --inplace -q
	cd $(SAN_DIR)/src && \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 PYTHONMALLOC=malloc \
	  $(abspath $(PY)) -m pytest tests -q -p no:cacheprovider -x $(PYTEST_ARGS)
	@echo "sanitize-test: OK (ASan+UBSan clean)"

# A fuzz target under ASan/UBSan with the seeded driver (native/fuzz/driver.c; with clang,
# link libFuzzer instead: see the target's header). RUNS inputs from SEED.
RUNS ?= 2000000
SEED ?= 1
FUZZ_CC = gcc -std=c11 -O1 -g -D_GNU_SOURCE -fsanitize=address,undefined -fno-sanitize-recover=undefined
fuzz:
	mkdir -p .work
	$(FUZZ_CC) -Inative/fuse native/fuzz/fuse_request.c native/fuzz/driver.c native/fuse/kproto.c -o .work/fuzz_fuse_request
	$(FUZZ_CC) -Inative native/fuzz/tar_index.c native/fuzz/driver.c native/tar.c native/sha_mb.c native/indexbuild.c \
	  -lcrypto -lzstd -o .work/fuzz_tar_index
	LZ_FUZZ_RUNS=$(RUNS) LZ_FUZZ_SEED=$(SEED) .work/fuzz_fuse_request
	LZ_FUZZ_RUNS=$(RUNS) LZ_FUZZ_SEED=$(SEED) .work/fuzz_tar_index
