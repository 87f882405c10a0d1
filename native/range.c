/* Range decompression from checkpoints (see range.h). */
#include "range.h"
#include "scanner.h"

#include <zlib.h>

#define SCRATCH (256u << 10)

static int gz_range(int kind, int bits, const uint8_t *window, size_t wlen, const uint8_t *p,
                    size_t left, uint64_t skip, uint8_t *out, size_t length, lz_err *err)
{
    struct inflate_state *st = malloc(sizeof *st);
    uint8_t *scratch = skip ? malloc(SCRATCH) : NULL;
    int rc = -1;
    if (!st || (skip && !scratch)) {
        lz_nomem(err);
        goto done;
    }
    const uint8_t *start = p;
    isal_inflate_init(st);
    if (kind == CK_DEFLATE) {
        st->crc_flag = ISAL_DEFLATE;
        if (wlen && isal_inflate_set_dict(st, (uint8_t *)window, (uint32_t)wlen) != COMP_OK) {
            lz_fail(err, LZ_INVALID, "cannot set the deflate window");
            goto done;
        }
        if (bits) {
            if (!left) {
                lz_fail(err, LZ_TRUNCATED, "no compressed data at the checkpoint");
                goto done;
            }
            st->read_in = (uint64_t)(p[0] >> bits);
            st->read_in_length = 8 - bits;
            p++;
            left--;
        }
    } else {
        st->crc_flag = ISAL_GZIP;
    }
    size_t produced = 0;
    while (skip || produced < length) {
        uint8_t *dst = skip ? scratch : out + produced;
        size_t avail = skip ? (size_t)LZ_MIN(skip, (uint64_t)SCRATCH) : length - produced;
        if (avail > (1u << 30))
            avail = 1u << 30;
        size_t slice = LZ_MIN(left, (size_t)1 << 30);
        st->next_in = (uint8_t *)p;
        st->avail_in = (uint32_t)slice;
        st->next_out = dst;
        st->avail_out = (uint32_t)avail;
        int r = isal_inflate(st);
        size_t used = slice - st->avail_in, got = avail - st->avail_out;
        p += used;
        left -= used;
        if (skip)
            skip -= got;
        else
            produced += got;
        if (r < 0) {
            lz_fail(err, LZ_CORRUPT, "%s at compressed offset +%llu from the checkpoint",
                    lz_isal_error_name(r), (unsigned long long)(p - start));
            goto done;
        }
        if (st->block_state == ISAL_BLOCK_FINISH) {
            /* Give back whole bytes ISA-L read ahead, then step over the gzip trailer
             * (raw mode) and start the next member if more output is wanted. */
            size_t back = (size_t)st->read_in_length / 8;
            p -= back;
            left += back;
            if (st->crc_flag == ISAL_DEFLATE) {
                if (left < 8) {
                    if (!skip && produced == length)
                        break;
                    lz_fail(err, LZ_TRUNCATED, "data ends inside a gzip trailer");
                    goto done;
                }
                p += 8;
                left -= 8;
            }
            if (!skip && produced == length)
                break;
            if (!left) {
                lz_fail(err, LZ_TRUNCATED,
                        "compressed data ends before the requested range (%llu of %llu bytes)",
                        (unsigned long long)produced, (unsigned long long)length);
                goto done;
            }
            if (p[0] != 0x1f) {
                lz_fail(err, LZ_CORRUPT, "no gzip member at compressed offset +%llu",
                        (unsigned long long)(p - start));
                goto done;
            }
            isal_inflate_reset(st);
            st->crc_flag = ISAL_GZIP;
            continue;
        }
        if (used == 0 && got == 0) {
            if (left == 0)
                lz_fail(err, LZ_TRUNCATED,
                        "compressed data ends before the requested range (%llu of %llu bytes)",
                        (unsigned long long)produced, (unsigned long long)length);
            else
                lz_fail(err, LZ_CORRUPT, "inflate stalled at compressed offset +%llu",
                        (unsigned long long)(p - start));
            goto done;
        }
    }
    rc = 0;
done:
    free(st);
    free(scratch);
    return rc;
}

static int zstd_range(const uint8_t *p, size_t n, uint64_t skip, uint8_t *out, size_t length,
                      lz_err *err)
{
    ZSTD_DCtx *zd = ZSTD_createDCtx();
    uint8_t *scratch = skip ? malloc(SCRATCH) : NULL;
    int rc = -1;
    if (!zd || (skip && !scratch)) {
        lz_nomem(err);
        goto done;
    }
    ZSTD_inBuffer in = {p, n, 0};
    size_t produced = 0;
    while (skip || produced < length) {
        ZSTD_outBuffer ob;
        ob.dst = skip ? scratch : out + produced;
        ob.size = skip ? (size_t)LZ_MIN(skip, (uint64_t)SCRATCH) : length - produced;
        ob.pos = 0;
        size_t r = ZSTD_decompressStream(zd, &ob, &in);
        if (ZSTD_isError(r)) {
            lz_fail(err, LZ_CORRUPT, "zstd: %s at compressed offset +%llu", ZSTD_getErrorName(r),
                    (unsigned long long)in.pos);
            goto done;
        }
        if (skip)
            skip -= ob.pos;
        else
            produced += ob.pos;
        if (ob.pos == 0 && in.pos == in.size) {
            lz_fail(err, LZ_TRUNCATED,
                    "compressed data ends before the requested range (%llu of %llu bytes)",
                    (unsigned long long)produced, (unsigned long long)length);
            goto done;
        }
    }
    rc = 0;
done:
    ZSTD_freeDCtx(zd);
    free(scratch);
    return rc;
}

int lz_decompress_range(int format, int kind, int bits, const uint8_t *window, size_t wlen,
                        const uint8_t *data, size_t n, uint64_t skip, uint8_t *out,
                        size_t length, lz_err *err)
{
    if (bits < 0 || bits > 7)
        return lz_fail(err, LZ_INVALID, "bits must be 0-7");
    switch (format) {
    case FMT_TAR:
        if (skip > n || length > n - skip)
            return lz_fail(err, LZ_TRUNCATED, "data ends before the requested range");
        memcpy(out, data + skip, length);
        return 0;
    case FMT_GZIP:
        if (kind != CK_STREAM_START && kind != CK_DEFLATE && kind != CK_GZIP_MEMBER)
            return lz_fail(err, LZ_INVALID, "checkpoint kind %d is not a gzip kind", kind);
        return gz_range(kind, bits, window, wlen, data, n, skip, out, length, err);
    case FMT_ZSTD:
        if (kind != CK_STREAM_START && kind != CK_ZSTD_FRAME)
            return lz_fail(err, LZ_INVALID, "checkpoint kind %d is not a zstd kind", kind);
        return zstd_range(data, n, skip, out, length, err);
    default:
        return lz_fail(err, LZ_INVALID, "unknown format");
    }
}

int lz_zlib_boundaries(const uint8_t *data, size_t n, lz_buf *outv, lz_err *err)
{
    z_stream z;
    memset(&z, 0, sizeof z);
    if (inflateInit2(&z, 31) != Z_OK)
        return lz_nomem(err);
    uint8_t *sink = malloc(1 << 16);
    if (!sink) {
        inflateEnd(&z);
        return lz_nomem(err);
    }
    size_t base = 0;  /* offset of the current member */
    z.next_in = (uint8_t *)data;
    z.avail_in = (uInt)LZ_MIN(n, (size_t)UINT32_MAX);
    int rc = 0;
    for (;;) {
        z.next_out = sink;
        z.avail_out = 1 << 16;
        int r = inflate(&z, Z_BLOCK);
        if (r == Z_STREAM_END) {
            size_t consumed = base + z.total_in;
            if (consumed >= n || data[consumed] != 0x1f)
                break;
            base = consumed;
            inflateReset(&z);
            continue;
        }
        if (r != Z_OK) {
            rc = lz_fail(err, LZ_CORRUPT, "zlib: %s", z.msg ? z.msg : "error");
            break;
        }
        if ((z.data_type & 128) && !(z.data_type & 64)) {
            uint64_t bp = (uint64_t)(base + z.total_in) * 8 - (uint64_t)(z.data_type & 7);
            if (lz_buf_append(outv, &bp, sizeof bp)) {
                rc = lz_nomem(err);
                break;
            }
        }
    }
    free(sink);
    inflateEnd(&z);
    return rc;
}
