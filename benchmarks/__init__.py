"""Throughput benchmarks (issue 8): SFD training, NFE-2 sampling and FID feature extraction.

Each script prints what it measured, the device, the torch version and its settings, then one JSON line
(also appended to `--json FILE`). `--tiny` swaps in a very small network so CI can run them on a CPU;
`benchmarks/run_gpu.sh` runs the full-size set on one GPU. Nothing here is a timed test.
"""
