"""CPU-only speed-ups, installed at process set-up: the decode kernel, the allocator, glibc's malloc settings.
"""
