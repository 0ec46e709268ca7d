/* y = x @ W.T + b for a decode step's few rows of x, in float32: compiled on first use by r1lab/cpu/decode_kernel.py
 * (torch.utils.cpp_extension).
 *
 * A decode step of a 0.5B model reads every weight once for a handful of rows, so it is bound by how fast the
 * weights stream from memory. MKL's sgemm at 8 rows read them at 11-16 GB/s on 2 AVX-512 cores where a plain sum
 * reads 24: its kernels are built for products that reuse the matrix from cache. Here each thread walks its own
 * contiguous block of weight rows once, two rows at a time against every row of x (held in L1), and asks for the
 * memory a few kilobytes ahead of its reads: without that software prefetch this loop ran no faster than MKL.
 *
 * Portable C++ (GCC/Clang vector extensions: AVX-512, AVX2 or NEON as -march=native allows), threads from OpenMP,
 * the same runtime torch's CPU build already loaded.
 */
#include <omp.h>
#include <string.h>

#define LANES 16        /* floats per vector: one AVX-512 register, two AVX2 or four NEON ones */
#define X_ROWS 8        /* rows of x per pass over a block of weight rows: 16 accumulators */
#define BLOCK_ROWS 32   /* weight rows per block: re-read from L2, not memory, by each further group of 8 rows */
#define AHEAD 2048      /* prefetch distance in floats (8 KB); 1-3K measured alike, none at all 1.6x slower */

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v); /* an unaligned load */
    return v;
}

static inline float lanes_sum(vec v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}

/* Weight rows [n0, n1) against rows x[0 .. m) (m <= X_ROWS); y has row stride n_out. */
static void weight_rows(const float *x, long m, const float *w, const float *b, float *y, long n0, long n1, long k,
                        long n_out) {
    for (long n = n0; n < n1; n += 2) {
        int pair = n + 1 < n1;
        const float *w0 = w + n * k, *w1 = w + (n + pair) * k;
        vec acc0[X_ROWS] = {0}, acc1[X_ROWS] = {0};
        long i = 0;
        for (; i + LANES <= k; i += LANES) {
            __builtin_prefetch(w0 + i + AHEAD, 0, 2);
            __builtin_prefetch(w1 + i + AHEAD, 0, 2);
            vec v0 = load(w0 + i), v1 = load(w1 + i);
#pragma GCC unroll 8
            for (int r = 0; r < X_ROWS; r++) {
                if (r < m) {
                    vec xr = load(x + r * k + i);
                    acc0[r] += xr * v0;
                    acc1[r] += xr * v1;
                }
            }
        }
        for (int r = 0; r < m; r++) {
            float s0 = lanes_sum(acc0[r]), s1 = lanes_sum(acc1[r]);
            for (long j = i; j < k; j++) {
                s0 += x[r * k + j] * w0[j];
                s1 += x[r * k + j] * w1[j];
            }
            if (b) {
                s0 += b[n];
                s1 += b[n + pair];
            }
            y[r * n_out + n] = s0;
            if (pair) y[r * n_out + n + 1] = s1;
        }
    }
}

/* x (m, k), w (n, k), b (n) or NULL, y (m, n): all contiguous float32. */
extern "C" void few_rows_linear(const float *x, const float *w, const float *b, float *y, long m, long n, long k, int threads) {
#pragma omp parallel num_threads(threads)
    {
        long t = omp_get_thread_num(), nt = omp_get_num_threads();
        long share = ((n + nt - 1) / nt + 1) & ~1L; /* an even number of rows per thread */
        long start = t * share, end = start + share < n ? start + share : n;
        for (long n0 = start; n0 < end; n0 += BLOCK_ROWS) {
            long n1 = n0 + BLOCK_ROWS < end ? n0 + BLOCK_ROWS : end;
            for (long r0 = 0; r0 < m; r0 += X_ROWS) {
                long rows = m - r0 < X_ROWS ? m - r0 : X_ROWS;
                weight_rows(x + r0 * k, rows, w, b, y + r0 * n, n0, n1, k, n);
            }
        }
    }
}
