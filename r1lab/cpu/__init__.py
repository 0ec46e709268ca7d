"""CPU-only speed-ups: the decode kernel, glibc's malloc settings, tcmalloc for a large model."""
