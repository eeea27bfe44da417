"""Benchmarks: ``ttscale bench <suite>`` (``python -m ttscale.bench <suite>``).

Every suite uses the shared harness in :mod:`ttscale.bench.harness`: warm-up, interleaved repeated (order rotating per round)
runs of ours and each baseline in one process, median and min, achieved GB/s or TFLOP/s, and the
fraction of the read-bandwidth and matmul ceilings measured in the same run. Results print as a
table and are written as JSON.
"""
SUITES = {
    "sampling": "ttscale.bench.sampling",
    "attention": "ttscale.bench.attention",
    "attention_prefill": "ttscale.bench.attention_prefill",
    "attention_decode": "ttscale.bench.attention_decode",
    "quant": "ttscale.bench.quant",
    "engine": "ttscale.bench.engine",
    "sparse": "ttscale.bench.sparse",
    "search": "ttscale.bench.search",
}
