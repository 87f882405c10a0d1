/* What this build of the C core was made with: compiler, flags, sanitizers and the
 * versions of the libraries it links (for `lazysnap version --json`). */
#ifndef LAZYSNAP_BUILDINFO_H
#define LAZYSNAP_BUILDINFO_H

typedef struct {
    const char *compiler;       /* __VERSION__ of the compiler that built this file */
    const char *cflags;         /* the flags setup.py passed (LAZYSNAP_CFLAGS) */
    int sanitize;               /* 1: built with ASan + UBSan (LAZYSNAP_SANITIZE) */
    const char *zlib;           /* zlibVersion(): the library loaded at run time */
    const char *zstd;           /* ZSTD_versionString() */
    const char *openssl;        /* OpenSSL_version(OPENSSL_VERSION) */
    const char *isal;           /* ISA-L's header version (the library has no run-time query) */
} lz_build_info;

void lz_get_build_info(lz_build_info *out);

#endif
