"""Layer index: what one layer holds and where its bytes are (a leaf package).

* ``model``      — Entry, Chunk, Checkpoint, LayerInfo (the fixed contract).
* ``builder``    — scanner output → :class:`~snapshotter.index.layerindex.LayerIndex`
                   with containerd's tar semantics (the reference); ``index_file_bytes`` /
                   ``index_stream_bytes``: the serialized index, its entries built in C
                   (``native/indexbuild.c``) unless C leaves the layer to the reference.
* ``format``     — the on-disk index (``write_index``, ``IndexFile``: mmap, lazy lookups).
* ``reader``     — random access: ``chunks_for_range`` → ``plan_chunks`` → (caller
                   fetches) → ``decode_span`` → ``assemble_range``; ``LayerReader``.
* ``decompress`` — a whole layer decompressed as it streams, and its format from its magic.
* ``errors``     — one-line, user-presentable exceptions.
"""
