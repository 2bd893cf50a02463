"""Kernel benchmarks (installed as comptrust.bench): each times our kernels and their anchors in one run on
real layer shapes and reports time, GB/s, % of measured read bandwidth and speedups. Run them through
`comptrust bench ...`; tests assert correctness, benchmarks only measure."""
