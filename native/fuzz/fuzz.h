/* What a fuzz target gives the seeded driver (driver.c) besides LLVMFuzzerTestOneInput:
 * its own generator of mostly well-formed, then damaged inputs. */
#ifndef LZ_FUZZ_H
#define LZ_FUZZ_H

#include <stddef.h>
#include <stdint.h>

#define LZ_FUZZ_MAX (1u << 20)  /* the largest generated input */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* One input of at most cap bytes into buf; draws its randomness from lz_fuzz_rnd. The
 * driver cuts some of them short itself. */
size_t lz_fuzz_generate(uint8_t *buf, size_t cap);
uint64_t lz_fuzz_rnd(void);

#endif
