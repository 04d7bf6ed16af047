/* lora2gguf's compiled merge kernel: one pass over a block of output rows, bf16 output.
 *
 * The same rule as lora2gguf.merge (merge.RULE): each element is W + add + sum_k l[i,k] * r[k,j]
 * evaluated in float64, an error bound E of that evaluation (any order, with or without FMA),
 * and the element is written only where the whole interval [V - E, V + E] rounds to one bf16
 * value, which is then the correctly rounded value of the exact sum. The few elements where the
 * interval holds a rounding boundary are returned as candidates; Python sums them exactly
 * (merge.exact_round). So the bytes are those of the numpy route whatever this code's
 * summation order, vector width or compiler: the tests compare both routes bit for bit.
 *
 * Loaded with ctypes (lora2gguf.kernel); the Python module init below only lets setuptools
 * build and find the file as an extension module. No Python object is touched by the kernel,
 * so ctypes calls it without the GIL. Written for this project; no code is taken from others.
 */
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define U64 (1.0 / 4503599627370496.0) /* 2**-52 */
#define CHUNK 16                        /* columns per register block */
#define ROW_BLOCK 32                    /* rows that share a column block (transposed reads) */
#define COL_BLOCK 128                   /* columns per block: the factors' block stays in cache */

/* GCC / clang vectors: AVX where the clone has it, else pairs of SSE2 registers */
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef uint32_t v4u __attribute__((vector_size(16)));
typedef uint16_t v4h __attribute__((vector_size(8)));

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* one build that runs everywhere, with AVX2 + FMA code where the CPU has it */
#define L2G_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define L2G_CLONES
#endif

/* float32 bits rounded to bf16 bits, to nearest, ties to even (finite values) */
static inline __attribute__((always_inline)) uint16_t rne16(uint32_t b) {
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

/* the float32 bits of e * 2**26 (capped): below it, the bound e may reach a quarter float32 step */
static inline __attribute__((always_inline)) uint32_t small_bits_of(double e) {
    double small = e * 67108864.0; /* 2**26 */
    float small_f = small < 3.0e38 ? (float)small : 3.0e38f;
    uint32_t bits;
    memcpy(&bits, &small_f, 4);
    return bits;
}

/* round to bf16 once (to nearest, ties to even): float32 rounding made "to odd" when inexact
 * (float32 keeps 16 more bits than bf16, so odd-then-nearest-even is one rounding). Finite d. */
static inline __attribute__((always_inline)) uint16_t bf16_of(double d) {
    float f = (float)d;
    uint32_t b;
    memcpy(&b, &f, 4);
    double back = (double)f;
    /* without branches (their outcome is random, half of them would be mispredicted): when
     * inexact, step to the float32 neighbour toward zero if f is beyond d, then set the last bit */
    b -= (uint32_t)(fabs(back) > fabs(d));
    b |= (uint32_t)(back != d);
    return rne16(b);
}

static inline __attribute__((always_inline)) double w_at(const void *w, int kind, int64_t off) {
    if (kind == 0) {
        uint32_t u = (uint32_t)((const uint16_t *)w)[off] << 16;
        float f;
        memcpy(&f, &u, 4);
        return (double)f;
    }
    return (double)((const float *)w)[off];
}

/* Round a run of merged values V into out. Returns 0, or -1 (a non-finite value), or -2 (more
 * candidates than cap).
 *
 * The fast test is the numpy route's (merge._bf16_candidates): V's float32 rounding f, rounded
 * to bf16, is the single rounding of the exact sum unless f is within two float32 steps of a
 * bf16 tie (low 16 bits 0x7FFF, 0x8000, 0x8001; 0x8000 is also where rounding through float32
 * rounds twice) or |f| is so small that the bound e may reach a quarter float32 step
 * (|f| < e * 2**26). Those few are tested exactly: the interval V -+ e rounds one way, or the
 * element becomes a candidate. The first loop has no branch and vectorizes. */
static inline __attribute__((always_inline)) int finish(const double *a, int len, double s_row, double coef, uint16_t *out, int64_t flat,
                         int64_t *cand, int64_t cap, int64_t *nc) {
    double vmax = 0.0;
    int ok = 1;
    for (int t = 0; t < len; t++) {
        double av = fabs(a[t]);
        ok &= (av <= DBL_MAX);
        vmax = av > vmax ? av : vmax;
    }
    if (!ok) return -1;
    if (coef == 0.0) { /* V is exact */
        for (int t = 0; t < len; t++) out[t] = bf16_of(a[t]);
        return 0;
    }
    double e = coef * (vmax + s_row);
    uint32_t small_bits = small_bits_of(e);
    uint32_t near[CHUNK], any = 0;
    for (int t = 0; t < len; t++) {
        float f = (float)a[t];
        uint32_t b;
        memcpy(&b, &f, 4);
        uint32_t n = (((b - 0x7FFFu) & 0xFFFFu) <= 2u) | ((b & 0x7FFFFFFFu) < small_bits);
        near[t] = n;
        any |= n;
        out[t] = rne16(b);
    }
    if (!any) return 0;
    double e2 = e + U64 * (vmax + e); /* the two additions below may round inward */
    for (int t = 0; t < len; t++) {
        if (!near[t]) continue;
        uint16_t lo = bf16_of(a[t] - e2), hi = bf16_of(a[t] + e2);
        if (lo == hi) {
            out[t] = lo;
        } else {
            if (*nc >= cap) return -2;
            cand[(*nc)++] = flat + t;
        }
    }
    return 0;
}

static inline __attribute__((always_inline)) v4d vabs(v4d x) {
    const v4l mask = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
    return (v4d)((v4l)x & mask);
}

static inline __attribute__((always_inline)) v4d vmax(v4d a, v4d b) {
    v4l gt = a > b;
    return (v4d)(((v4l)a & gt) | ((v4l)b & ~gt));
}

/* finish() for a full run of 16 values held in four vectors: the same rule, without branches
 * on the common path (the scalar finish() settles a run that has a near element) */
static inline __attribute__((always_inline)) int finish16(const v4d *s, double s_row, double coef, uint16_t *out,
                                                          int64_t flat, int64_t *cand, int64_t cap, int64_t *nc) {
    v4d a0 = vabs(s[0]), a1 = vabs(s[1]), a2 = vabs(s[2]), a3 = vabs(s[3]);
    const v4d big = {DBL_MAX, DBL_MAX, DBL_MAX, DBL_MAX};
    v4l ok = (a0 <= big) & (a1 <= big) & (a2 <= big) & (a3 <= big); /* false for NaN */
    v4d mx = vmax(vmax(a0, a1), vmax(a2, a3));
    double vm = mx[0] > mx[1] ? mx[0] : mx[1];
    double vm2 = mx[2] > mx[3] ? mx[2] : mx[3];
    vm = vm > vm2 ? vm : vm2;
    if ((ok[0] & ok[1] & ok[2] & ok[3]) && coef != 0.0) {
        uint32_t sb = small_bits_of(coef * (vm + s_row));
        const v4u small_bits = {sb, sb, sb, sb};
        v4u any = {0, 0, 0, 0};
        for (int p = 0; p < 4; p++) {
            v4u b = (v4u)__builtin_convertvector(s[p], v4f);
            v4u near = (v4u)(((b - 0x7FFFu) & 0xFFFFu) <= 2u) | (v4u)((b & 0x7FFFFFFFu) < small_bits);
            any |= near;
            v4h h = __builtin_convertvector((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16, v4h); /* rne16, 4 wide */
            memcpy(out + 4 * p, &h, 8);
        }
        if (!(any[0] | any[1] | any[2] | any[3])) return 0;
    }
    double a[CHUNK]; /* a non-finite value, V exact, or a near element: the scalar finish() decides */
    memcpy(a, s, sizeof a);
    return finish(a, CHUNK, s_row, coef, out, flat, cand, cap, nc);
}

/* 16 base values of row `base` from column c, plus add, into four vectors */
static inline __attribute__((always_inline)) void load16(const void *w, int kind, int64_t base, int64_t c, int64_t col_stride, double add,
                          v4d s[4]) {
    double a[CHUNK];
    if (kind == 0 && col_stride == 1) {
        const uint16_t *wp = (const uint16_t *)w + base + c;
        for (int t = 0; t < CHUNK; t++) {
            uint32_t u = (uint32_t)wp[t] << 16;
            float f;
            memcpy(&f, &u, 4);
            a[t] = (double)f + add;
        }
    } else {
        for (int t = 0; t < CHUNK; t++) a[t] = w_at(w, kind, base + (c + t) * col_stride) + add;
    }
    memcpy(s, a, sizeof a);
}

/* One block of rows. W element (i, j) is w[row_off[i] + j * col_stride] (kind 0: bf16 bits,
 * 1: float32); left (n, k) and right (k, m) row-major float64, right_max[k] = max_j |right[k, j]|;
 * coef = (k + extra + 8) * 2**-52 (0: no delta and no constant, V exact). out (n, m) bf16 bits.
 * Returns the number of candidates written to cand (flat indices i * m + j; their out values
 * are not written), -1 when a merged value is NaN or Inf, -2 when there are more than cap.
 *
 * Order of work: blocks of ROW_BLOCK rows by COL_BLOCK columns (the factors' columns and, for a
 * transposed W, the cache lines of its columns are reused across the rows); inside, two rows by
 * 16 columns at a time: eight independent vector sums keep the multiply-add units busy. */
L2G_CLONES
int64_t l2g_merge_bf16(const void *w, int kind, const int64_t *row_off, int64_t col_stride, int64_t n,
                       int64_t m, int64_t k, const double *left, const double *right, const double *right_max,
                       double add, double coef, uint16_t *out, int64_t *cand, int64_t cap) {
    int64_t nc = 0;
    for (int64_t i0 = 0; i0 < n; i0 += ROW_BLOCK) {
        int64_t i1 = i0 + ROW_BLOCK < n ? i0 + ROW_BLOCK : n;
        double s_rows[ROW_BLOCK];
        for (int64_t i = i0; i < i1; i++) {
            double s = 0.0;
            for (int64_t q = 0; q < k; q++) s += fabs(left[i * k + q]) * right_max[q];
            s_rows[i - i0] = s * (1.0 + 4 * (k + 1) * U64); /* an upper bound despite its own roundings */
        }
        for (int64_t j0 = 0; j0 < m; j0 += COL_BLOCK) {
            int64_t j1 = j0 + COL_BLOCK < m ? j0 + COL_BLOCK : m;
            int64_t full = j0 + (j1 - j0) / CHUNK * CHUNK;
            for (int64_t i = i0; i < i1; i += 2) {
                int two = i + 1 < i1;
                const double *la = left + i * k, *lb = two ? la + k : la;
                for (int64_t c = j0; c < full; c += CHUNK) {
                    v4d a[4], b[4];
                    load16(w, kind, row_off[i], c, col_stride, add, a);
                    if (two) load16(w, kind, row_off[i + 1], c, col_stride, add, b);
                    for (int64_t q = 0; q < k; q++) {
                        const double *rq = right + q * m + c;
                        v4d r0, r1, r2, r3;
                        memcpy(&r0, rq, 32);
                        memcpy(&r1, rq + 4, 32);
                        memcpy(&r2, rq + 8, 32);
                        memcpy(&r3, rq + 12, 32);
                        v4d x = {la[q], la[q], la[q], la[q]}, y = {lb[q], lb[q], lb[q], lb[q]};
                        a[0] += x * r0;
                        a[1] += x * r1;
                        a[2] += x * r2;
                        a[3] += x * r3;
                        b[0] += y * r0;
                        b[1] += y * r1;
                        b[2] += y * r2;
                        b[3] += y * r3;
                    }
                    int rc = finish16(a, s_rows[i - i0], coef, out + i * m + c, i * m + c, cand,
                                      cap, &nc);
                    if (!rc && two)
                        rc = finish16(b, s_rows[i + 1 - i0], coef, out + (i + 1) * m + c,
                                      (i + 1) * m + c, cand, cap, &nc);
                    if (rc) return rc;
                }
                for (int64_t r = i; r < i + 1 + two; r++) { /* the last columns of the block, one by one */
                    int len = (int)(j1 - full);
                    if (!len) break;
                    double a[CHUNK];
                    const double *lr = left + r * k;
                    for (int t = 0; t < len; t++) a[t] = w_at(w, kind, row_off[r] + (full + t) * col_stride) + add;
                    for (int64_t q = 0; q < k; q++) {
                        const double *rq = right + q * m + full;
                        for (int t = 0; t < len; t++) a[t] += lr[q] * rq[t];
                    }
                    int rc = finish(a, len, s_rows[r - i0], coef, out + r * m + full, r * m + full, cand, cap, &nc);
                    if (rc) return rc;
                }
            }
        }
    }
    return nc;
}

/* the interface version: lora2gguf.kernel refuses a library built from another version of this
 * file (an editable install whose kernel was not rebuilt) and merges in numpy */
int64_t l2g_kernel_version(void) { return 2; }

/* 1 when one of n 16-bit float bit patterns (bf16 or f16) has its exponent field, exp_mask, all
 * ones (Inf or NaN), else 0: one vectorized pass (the numpy route reads the data twice) */
L2G_CLONES int64_t l2g_half_nonfinite(const uint16_t *x, int64_t n, uint16_t exp_mask) {
    uint16_t any = 0;
    for (int64_t i = 0; i < n; i++) any |= (uint16_t)((x[i] & exp_mask) == exp_mask);
    return any != 0;
}

/* the kernel's own rounding, for the tests: n doubles -> bf16 bits */
void l2g_bf16_of(const double *x, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = bf16_of(x[i]);
}

static struct PyModuleDef l2g_module = {PyModuleDef_HEAD_INIT, "_kernels",
                                        "lora2gguf's compiled merge kernel (called through ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&l2g_module); }
