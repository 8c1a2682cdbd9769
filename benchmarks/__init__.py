"""Throughput benchmarks: `make bench-prepare` (DICOM decode and prepare) and `make bench` (loader vs model)."""
