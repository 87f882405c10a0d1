/* The index file's entry record: the one C declaration of its layout.
 *
 * Little-endian, LZ_IE_SIZE bytes, fields at fixed offsets. Written by the C index build
 * (indexbuild.c), read by the C tree build (fuse/treebuild.c); Python declares the same
 * record as index/model.py ENTRY_RECORD / ENTRY_FIELDS (it is the index file format), and
 * snapshotter.native refuses a core whose field list (_core.INDEX_ENTRY_LAYOUT, made from
 * LZ_IE_FIELDS) differs from it field by field.
 *
 * a and b: a regular file's first chunk and chunk count; a directory's child block; a
 * device's major and minor; a symlink target's offset and length in the block's strings; a
 * hard link's target record. extra: offset of the entry's extras (0xFFFFFFFF: none). */
#ifndef LZ_INDEXRECORD_H
#define LZ_INDEXRECORD_H

/* X(name, offset, bytes, signed) */
#define LZ_IE_FIELDS(X)                                                                                   \
    X(parent, 0, 4, 0)                                                                                    \
    X(name_off, 4, 4, 0)                                                                                  \
    X(name_len, 8, 2, 0)                                                                                  \
    X(type, 10, 1, 0)                                                                                     \
    X(flags, 11, 1, 0)                                                                                    \
    X(mode, 12, 2, 0)                                                                                     \
    X(uid, 14, 4, 0)                                                                                      \
    X(gid, 18, 4, 0)                                                                                      \
    X(size, 22, 8, 0)                                                                                     \
    X(mtime_ns, 30, 8, 1)                                                                                 \
    X(data_offset, 38, 8, 0)                                                                              \
    X(a, 46, 4, 0)                                                                                        \
    X(b, 50, 4, 0)                                                                                        \
    X(extra, 54, 4, 0)

#define LZ_IE_OFFSET_(name, off, bytes, sign) LZ_IE_##name = off,
enum { LZ_IE_FIELDS(LZ_IE_OFFSET_) LZ_IE_SIZE = 58 };
#undef LZ_IE_OFFSET_
_Static_assert(LZ_IE_extra + 4 == LZ_IE_SIZE, "the entry record's last field ends at its size");

#endif
