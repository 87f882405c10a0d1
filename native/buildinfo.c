/* Build options and library versions of the C core; see buildinfo.h. */
#include "buildinfo.h"

#include <isa-l.h>
#include <openssl/crypto.h>
#include <zlib.h>
#include <zstd.h>

#ifndef LAZYSNAP_CFLAGS
#define LAZYSNAP_CFLAGS ""
#endif
#ifndef LAZYSNAP_SANITIZE
#define LAZYSNAP_SANITIZE 0
#endif

#define LZ_STR2(x) #x
#define LZ_STR(x) LZ_STR2(x)

#if defined(__clang__)
#define LZ_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define LZ_COMPILER "gcc " __VERSION__
#else
#define LZ_COMPILER "unknown"
#endif

void lz_get_build_info(lz_build_info *out)
{
    out->compiler = LZ_COMPILER;
    out->cflags = LAZYSNAP_CFLAGS;
    out->sanitize = LAZYSNAP_SANITIZE;
    out->zlib = zlibVersion();
    out->zstd = ZSTD_versionString();
    out->openssl = OpenSSL_version(OPENSSL_VERSION);
    out->isal = LZ_STR(ISAL_MAJOR_VERSION) "." LZ_STR(ISAL_MINOR_VERSION) "." LZ_STR(ISAL_PATCH_VERSION);
}
