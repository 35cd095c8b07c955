"""One-command benchmarks of imagegen: `make bench` (python -m bench). See bench/README.md."""
