"""Benchmarks: is the cache-plus-streaming design fast, and where is it still slow?

    python -m benchmarks run --quick                       # CPU, small models, under 5 minutes
    python -m benchmarks run --device cuda --out gpu.json  # the paper's model sizes (benchmarks/gpu.sh)

Every figure is a ratio of two rates measured side by side in one run, on the same data and the
same student (docs/design.md, section 9). One module per measurement:

    shard_build      images/s building shards from a folder of PNGs (csv adapter), workers 1 vs N
    precompute_rate  precompute views/s / the teacher's bare forward rate on the same batches
    cache_cost       bytes per item and view, compression ratio, block reads vs row-by-row reads
    loader_stages    one DataLoader worker's time per 512 px sample, stage by stage (tar, sha256,
                     JSON, PNG decode, canvas, collation)
    loader           samples/s: our shard + cache-block + view-replay stream vs the official loader
    step_rate        training steps/s: cached targets vs the official code's way vs fully online
    overhead         full pipeline step time / step time on batches already on the device
    end_to_end       images/s of our whole training pipeline vs the official code's whole pipeline
                     (per-file loader, .npy disease targets, the anatomy teacher online), same student
    student_step     the student's step alone: images/s by batch size, eager vs run.compile, MFU
    scale            trainer host RSS for 1k, 100k and 1M items in the manifest

`workload` builds the shared data once per run (a folder of original-size phantom PNGs, shards,
a teacher cache and the official code's per-image .npy targets); `official` is the official
LeADER code's data path, reimplemented for comparison; `profiles` holds the sizes of each run.
"""
