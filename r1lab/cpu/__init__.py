"""CPU-only speed-ups: the decode kernel and glibc's malloc settings, installed at process set-up; tcmalloc for a large
model, chosen by the `r1lab` program restarting itself (malloc.py).
"""
