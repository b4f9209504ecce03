"""Side-by-side benchmarks of taskcs against its peers; run with ``make bench``."""
