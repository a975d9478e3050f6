/* One row of the per-sub-pixel loop of both architectures, in plain C: what GatedRowDecoder and
 * PixelCNNRowDecoder (row_decoders.py) do with a few dozen torch ops per sub-pixel, here as loops over
 * each image's own numbers.
 *
 * Built by app/engine/c_kernel.py at first use with -ffp-contract=off and without -ffast-math, so every
 * sum is computed in the written order with IEEE rounding: an image's numbers never depend on the other
 * images of the batch (batch invariance by construction; no padding is needed for it), nor on the CPU:
 * only IEEE adds, multiplies, divides and, for the products' running sums, fused multiply-adds (`fused`),
 * whose results the standard fixes, and exp and log written out here rather than taken from libm, whose
 * implementation may be chosen per CPU (c_library.NUMERICS_VERSION counts the changes to these numbers).
 *
 * Images are processed in blocks of up to BLOCK (see affine_block): the matrix-vector products of a
 * block's images share each weight row while it is in cache, and every image's sums still run in the
 * same order with the same operations, so its numbers are the same in any block and any batch.
 *
 * Layouts (float32, row-major, batch first; the matrices below in panels: affine_block), as in
 * row_decoders.GatedRowDecoder:
 *   h_buffers[l]  (B, W + kw_l - 1, in_l)  the current row's inputs of layer l, zero-padded on the left
 *   row_bias[l]   (B, W, 2n)               all the vertical stack adds to each column's pre-activation
 *   h_weight[l]   (kw_l * in_l, 2n)        horizontal kernel, its tanh half scaled by -2
 *   out_weight[l] (n, 2n), the last (n, n) residual and skip 1x1s fused (the last layer: skip only)
 *   hidden_w (n, head), logits_w[c] (head, 256)
 * uniforms (B, C, W) float64, temperature (B) float64 -> row (B, C, W) int64, log_prob (B) float64 (+=).
 * forced (B, C, W) int64 or NULL: values >= 0 are kept sub-pixels (a completion whose kept pixels end
 * mid-row), written instead of drawing and not counted in log_prob (protocol step 3).
 * The masked-conv PixelCNN's layouts are described at PixelCNNWeights below.
 */
#define _GNU_SOURCE /* pthreads, sched_yield and (Linux) the futex syscall under -std=c11: the wavefront */
#include <pthread.h>
#include <sched.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LEVELS 256

typedef struct {
    int32_t layers, channels, image_channels, width, head;
    const int32_t *h_width;
    const int32_t *in_channels;
    const float *const *h_weight;
    const float *const *out_weight;
    const float *const *out_bias;
    const float *hidden_w;
    const float *hidden_b;
    const float *const *logits_w;
    const float *const *logits_b;
} GatedWeights;

/* Images per block. The weights of one sub-pixel step (~0.5 MB for the shipped model) do not stay in
 * L1 from one image to the next, so computing images one by one streams every weight once per image;
 * a block streams it once per BLOCK images. 8 measured faster than 4 (and than 3-register tiles at 8)
 * on AMD EPYC (Zen 5, AVX-512); affine_block's dispatch below covers block sizes 1 .. 8. */
#define BLOCK 8
_Static_assert(BLOCK >= 1 && BLOCK <= 8, "affine_block dispatches on 1 .. 8 images");

/* One vector register of floats in GCC's vector extension (clang has it too), as wide as the machine's
 * (the kernel is built with -march=native; a vector wider than the hardware's is many times slower):
 * elementwise IEEE multiplies and adds, each rounded on its own (-ffp-contract=off), nothing reassociated,
 * so the width changes the speed, never a number.
 * NARROW halves the tiles where there are 16 vector registers instead of 32. */
#if defined(__AVX512F__)
#define LANES 16
#define NARROW 1
#elif defined(__AVX__)
#define LANES 8
#define NARROW 2
#else
#define LANES 4
#if defined(__aarch64__)
#define NARROW 1
#else
#define NARROW 2
#endif
#endif
typedef float floats __attribute__((vector_size(4 * LANES)));
typedef float floats_u __attribute__((vector_size(4 * LANES), aligned(4), may_alias));  /* unaligned access */

/* The floats per panel row of every matrix of the products (affine_block): c_kernel.panels lays them out. */
int kernel_panel_width(void) { return LANES; }

/* 1 where the products run on the CPU's own FMA instruction, 0 where they are emulated (c_library logs it). */
int kernel_hardware_fma(void) {
#if defined(__FMA__) || defined(__aarch64__)
    return 1;
#else
    return 0;
#endif
}

/* acc + x * w on every lane of a vector, with one rounding (a fused multiply-add), which IEEE 754 fixes: the
 * same bits on every CPU. Written out, never left to the compiler's contraction (-ffp-contract=off), which
 * may fuse one product and not the next. Where the hardware has no FMA instruction (x86-64 before AVX2,
 * some VMs) it is computed exactly in double: the product of two floats is exact there (48 bits of 53);
 * their sum, rounded to odd (TwoSum gives the rounding error; an even result with an error moves one step
 * toward it), then rounded to float, is the correctly rounded fused result (Boldo and Melquiond, "Emulation
 * of FMA and correctly rounded sums: proved algorithms using rounding to odd", 2008). libm's fmaf would be
 * the same bits, but a function call per product is ~30x slower. Operands are finite (weights and
 * activations). */
static inline __attribute__((always_inline)) floats fused(floats acc, float x, floats w) {
#if defined(__AVX512F__)
    return (floats)_mm512_fmadd_ps(_mm512_set1_ps(x), (__m512)w, (__m512)acc);
#elif defined(__AVX__) && defined(__FMA__)
    return (floats)_mm256_fmadd_ps(_mm256_set1_ps(x), (__m256)w, (__m256)acc);
#elif defined(__aarch64__)
    return (floats)vfmaq_n_f32((float32x4_t)acc, (float32x4_t)w, x);
#else  /* the emulation in double, every lane at once */
    typedef double doubles __attribute__((vector_size(8 * LANES)));
    typedef int64_t longs __attribute__((vector_size(8 * LANES)));
    const doubles p = __builtin_convertvector(w, doubles) * (double)x, c = __builtin_convertvector(acc, doubles);
    const doubles s = p + c, p_part = s - c, c_part = s - p_part;
    const doubles error = (p - p_part) + (c - c_part);
    const longs bits = (longs)s, toward_error = 1 + 2 * ((error > 0) ^ (s > 0)); /* comparisons: -1 or 0 */
    const longs odd = bits + (toward_error & (error != 0) & ((bits & 1) == 0));
    return __builtin_convertvector((doubles)odd, floats);
#endif
}

/* The kernel's fused multiply-adds as it computes them, for tests/test_numerics.py (which checks them against
 * exact results where rounding twice would differ): out[l] = acc[l] + x * w[l] for one vector's lanes
 * (`fused`). Returns the lanes of a vector. */
int kernel_fused(float x, const float *w, const float *acc, float *out) {
    floats wv, av;
    memcpy(&wv, w, sizeof wv);
    memcpy(&av, acc, sizeof av);
    const floats sums = fused(av, x, wv);
    memcpy(out, &sums, sizeof sums);
    return LANES;
}

/* Loops over a tile's constant number of images and registers, unrolled whatever the compiler's heuristics. */
#if defined(__clang__)
#define UNROLL _Pragma("unroll")
#else
#define UNROLL _Pragma("GCC unroll 8")
#endif

/* A tile of 4 or more images asks for the weight row PREFETCH_ROWS ahead of the one it multiplies: the
 * weights (0.5 MB per sub-pixel step, 1.9 MB for a row's vertical stack) come from L2 or L3, and the hardware
 * prefetchers do not keep up with a tile's streams. On an Intel Xeon, batch 64 took 6% less
 * time and batch 16 4% (4, 8 and 12 rows alike; BENCHMARKS.md); one image's matrix-vector products gained
 * nothing. A prefetch never faults, so it may look past the matrix's end. */
#define PREFETCH_ROWS 8

/* Columns o0 .. o0 + LANES * vectors of out[b] = bias[b] + x[b] @ w for the `count` images of a block, the
 * running sums held in registers for all of k (count and vectors are constants where this is inlined,
 * so acc is count * vectors registers): each LANES-float slice of w[k] is loaded once and applied to every
 * image. acc[b][v] gets, lane by lane, bias[b][o] and then x[b][k] * w[k][o] added for k = 0, 1, ...
 * in order: the same multiplies and adds in the same order whatever count (and vectors) is. */
static inline __attribute__((always_inline)) void affine_tile(float *const *out, const float *const *bias,
                                                              const float *const *x, const float *restrict w,
                                                              int rows, int o0, const int count,
                                                              const int vectors) {
    floats acc[BLOCK][8], wk[8];  /* vectors <= 8; fully unrolled below, so all of it lives in registers */
    UNROLL for (int b = 0; b < count; b++)
        UNROLL for (int v = 0; v < vectors; v++) acc[b][v] = *(const floats_u *)(bias[b] + o0 + LANES * v);
    const float *restrict panel = w + (size_t)(o0 / LANES) * rows * LANES; /* vector v: panel + v * rows * LANES */
    for (int k = 0; k < rows; k++) {
        UNROLL for (int v = 0; v < vectors; v++) wk[v] = *(const floats_u *)(panel + ((size_t)v * rows + k) * LANES);
        if (count >= 4)  /* see PREFETCH_ROWS */
            UNROLL for (int v = 0; v < vectors; v++) __builtin_prefetch(panel + ((size_t)v * rows + k + PREFETCH_ROWS) * LANES, 0, 3);
        UNROLL for (int b = 0; b < count; b++) {
            const float xk = x[b][k];
            UNROLL for (int v = 0; v < vectors; v++) acc[b][v] = fused(acc[b][v], xk, wk[v]);
        }
    }
    UNROLL for (int b = 0; b < count; b++)
        UNROLL for (int v = 0; v < vectors; v++) *(floats_u *)(out[b] + o0 + LANES * v) = acc[b][v];
}

/* The last `left` (< LANES) columns, o0 .. o0 + left - 1, of the same sums: the zero-padded last panel, one
 * vector per image, its first `left` lanes kept. */
static void affine_partial(float *const *out, const float *const *bias, const float *const *x,
                           const float *restrict panel, int rows, int o0, int left, int count) {
    for (int b = 0; b < count; b++) {
        floats acc = {0};
        memcpy(&acc, bias[b] + o0, sizeof(float) * (size_t)left);
        for (int k = 0; k < rows; k++) acc = fused(acc, x[b][k], *(const floats_u *)(panel + (size_t)k * LANES));
        memcpy(out[b] + o0, &acc, sizeof(float) * (size_t)left);
    }
}

/* All columns for `count` images: tiles of `vectors` registers, then one narrower tile for what is left
 * of the whole panels, then the last cols % LANES columns (affine_partial).
 * Wider tiles for fewer images keep count * vectors (independent running sums) at 12..24 (half that
 * with 16 vector registers), enough to hide the adds' latency without running out of registers: 8 images
 * x 3 vectors (24 sums, 3 weight loads and 8 broadcasts per 24 products) was ~3% faster at batch 16 and 64
 * than 8 x 2 on an Intel Xeon (BENCHMARKS.md). */
static inline __attribute__((always_inline)) void affine_tiles(float *const *out, const float *const *bias,
                                                               const float *const *x, const float *restrict w,
                                                               int rows, int cols, const int count,
                                                               const int vectors) {
    int o0 = 0;
    for (; o0 + LANES * vectors <= cols; o0 += LANES * vectors)
        affine_tile(out, bias, x, w, rows, o0, count, vectors);
    switch ((cols - o0) / LANES) {  /* 0 .. vectors - 1 slices left */
        case 1: affine_tile(out, bias, x, w, rows, o0, count, 1); break;
        case 2: affine_tile(out, bias, x, w, rows, o0, count, 2); break;
        case 3: affine_tile(out, bias, x, w, rows, o0, count, 3); break;
        case 4: affine_tile(out, bias, x, w, rows, o0, count, 4); break;
        case 5: affine_tile(out, bias, x, w, rows, o0, count, 5); break;
        case 6: affine_tile(out, bias, x, w, rows, o0, count, 6); break;
        case 7: affine_tile(out, bias, x, w, rows, o0, count, 7); break;
        default: break;
    }
    o0 += (cols - o0) / LANES * LANES;
    if (o0 < cols) affine_partial(out, bias, x, w + (size_t)(o0 / LANES) * rows * LANES, rows, o0, cols - o0, count);
}

/* out[b] (cols) = bias[b] + x[b] (rows) @ w (rows, cols), summed over rows in order, for the `count`
 * (1 .. BLOCK) images b of a block: out[b][o] = bias[b][o], then + x[b][k] * w[k][o] for k = 0, 1, ...,
 * one fused multiply-add each. Every image gets exactly that sum, however many images share the block,
 * so its numbers do not depend on its batch. Why blocks: the weights are read once per block instead of
 * once per image, and the running sums stay in registers.
 * w is in panels (c_kernel.panels): LANES columns at a time, each panel's rows one after another,
 * w[p][k][l] = matrix[k][p * LANES + l], the last panel zero-padded, so that a tile reads each of its
 * panels front to back instead of a slice of every row (one image: 5% faster on an Intel Xeon). */
static void affine_block(float *const *out, const float *const *bias, const float *const *x,
                         const float *restrict w, int rows, int cols, int count) {
    switch (count) {
        case 1: affine_tiles(out, bias, x, w, rows, cols, 1, 6 / NARROW); break;
        case 2: affine_tiles(out, bias, x, w, rows, cols, 2, 6 / NARROW); break;
        case 3: affine_tiles(out, bias, x, w, rows, cols, 3, 4 / NARROW); break;
        case 4: affine_tiles(out, bias, x, w, rows, cols, 4, 4 / NARROW); break;
        case 5: affine_tiles(out, bias, x, w, rows, cols, 5, 3 / NARROW); break;
        case 6: affine_tiles(out, bias, x, w, rows, cols, 6, 3 / NARROW); break;
        case 7: affine_tiles(out, bias, x, w, rows, cols, 7, 3 / NARROW); break;
        default: affine_tiles(out, bias, x, w, rows, cols, 8, 3 / NARROW); break;
    }
}

/* The same bias (a weight's own) for every image of a block. */
static void same_for_block(const float **pointers, const float *value, int count) {
    for (int b = 0; b < count; b++) pointers[b] = value;
}

/* exp(x) for float, branch-free so that loops over it vectorise: x = k ln2 + r, |r| <= ln2 / 2,
 * exp(r) by a degree-6 polynomial (relative error below 2e-7), 2^k built in the exponent bits. k is
 * rounded by adding 1.5 * 2^23, which leaves it in the low mantissa bits. */
static inline float exp_float(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    union { float f; int32_t i; } shifted = {.f = x * 1.44269504f + 12582912.0f};
    const float k = shifted.f - 12582912.0f;
    const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } scale = {.i = (shifted.i + 127) << 23};
    return p * scale.f;
}

/* exp(x) for x <= 0 in float64 (the softmax of the draw), branch-free; 0 below -708 like exp itself
 * (a level of probability 0 must never be drawn). k is rounded by adding 1.5 * 2^52. */
static inline double exp_nonpositive(double x) {
    const double clamped = x < -708.0 ? -708.0 : x;
    union { double f; int64_t i; } shifted = {.f = clamped * 1.4426950408889634 + 6755399441055744.0};
    const double k = shifted.f - 6755399441055744.0;
    const double r = (clamped - k * 0.6931471803691238) - k * 1.9082149292705877e-10;
    double p = 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    union { int64_t i; double f; } scale = {.i = (shifted.i + 1023) << 52};
    return x < -708.0 ? 0.0 : p * scale.f;
}

/* log(x) for finite x > 0 (the total of a softmax's terms, in [1, 256]) in plain IEEE double arithmetic:
 * fdlibm's e_log.c (Sun Microsystems, 1993; error below 1 ulp) for normal numbers, so that the result is the
 * same bits on every machine. libm's log is chosen per CPU at load time (glibc 2.36 has an FMA variant and
 * a plain one, which disagree in about 1 in 10^5 arguments), so a log_prob would depend on the CPU. */
static double log_positive(double x) {
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    const double lg1 = 6.666666666666735130e-01, lg2 = 3.999999999940941908e-01, lg3 = 2.857142874366239149e-01,
                 lg4 = 2.222219843214978396e-01, lg5 = 1.818357216161805012e-01, lg6 = 1.531383769920937332e-01,
                 lg7 = 1.479819860511658591e-01;
    union { double f; uint64_t i; } bits = {.f = x};
    int32_t hx = (int32_t)(bits.i >> 32);
    int k = (hx >> 20) - 1023;
    hx &= 0x000fffff;
    const int32_t i = (hx + 0x95f64) & 0x100000;  /* the mantissa above sqrt(2): halve it, k + 1 */
    bits.i = ((uint64_t)(uint32_t)(hx | (i ^ 0x3ff00000)) << 32) | (bits.i & 0xffffffffu);
    k += i >> 20;
    const double f = bits.f - 1.0, dk = (double)k;
    const double s = f / (2.0 + f), z = s * s, w = z * z;
    const double t1 = w * (lg2 + w * (lg4 + w * lg6)), t2 = z * (lg1 + w * (lg3 + w * (lg5 + w * lg7)));
    const double r = t2 + t1;
    const int32_t near_one = (hx - 0x6147a) | (0x6b851 - hx);
    if (near_one > 0) {
        const double hfsq = 0.5 * f * f;
        if (k == 0) return f - (hfsq - s * (hfsq + r));
        return dk * ln2_hi - ((hfsq - (s * (hfsq + r) + dk * ln2_lo)) - f);
    }
    if (k == 0) return f - s * (f - r);
    return dk * ln2_hi - ((s * (f - r) - dk * ln2_lo) - f);
}

/* The largest of LEVELS values, over 8 running maxima (vectorises; a maximum is exact in any order). */
static inline double maximum(const double *restrict values) {
    double lanes[8];
    for (int l = 0; l < 8; l++) lanes[l] = values[l];
    for (int v = 8; v < LEVELS; v += 8)
        for (int l = 0; l < 8; l++) lanes[l] = values[v + l] > lanes[l] ? values[v + l] : lanes[l];
    double best = lanes[0];
    for (int l = 1; l < 8; l++) best = lanes[l] > best ? lanes[l] : best;
    return best;
}

/* The draws of one sub-pixel of a block's images: what the caller fills in, and where the results go. */
typedef struct {
    double u[BLOCK], temperature[BLOCK];
    int64_t forced[BLOCK];     /* >= 0: a kept sub-pixel (protocol step 3), written, not drawn or counted */
    int64_t *value[BLOCK];     /* out: the value */
    double *log_prob[BLOCK];   /* out: += log softmax(logits) at the drawn value (T = 1) */
} BlockDraws;

/* Doubles of draw_block's scratch. */
#define DRAW_SCRATCH (LEVELS * BLOCK)

/* The protocol's draw (app/engine/protocol.py) for each image b < count of a block: the first level whose
 * cumulative softmax(logits[b] / T) exceeds u times the total, and log softmax(logits[b]) at it. Each
 * image's running sum of its 256 terms is one chain of dependent adds; a block's chains run side by side
 * (cdf holds level v of image b at v * lanes + b, so one vector add advances every image by a level), each
 * in level order, so every image's numbers are the ones it would get alone. lanes: BLOCK, or 1 for one image. */
static inline __attribute__((always_inline)) void draw_lanes(float *const *logits, int count, const BlockDraws *d,
                                                             double *restrict cdf, const int lanes) {
    double max[BLOCK];
    for (int b = 0; b < lanes; b++) {  /* cdf = each term's exponent first */
        if (b >= count || d->forced[b] >= 0) {  /* a lane with nothing to draw: its sums are never read */
            for (int v = 0; v < LEVELS; v++) cdf[v * lanes + b] = 0.0;
            continue;
        }
        double wide[LEVELS];
        for (int v = 0; v < LEVELS; v++) wide[v] = logits[b][v];
        max[b] = maximum(wide);
        const double temperature = d->temperature[b];
        if (temperature == 1.0) {  /* x / 1 is x: the division would change nothing */
            for (int v = 0; v < LEVELS; v++) cdf[v * lanes + b] = wide[v] - max[b];
        } else {
            for (int v = 0; v < LEVELS; v++) wide[v] = wide[v] / temperature;
            const double scaled_max = maximum(wide);
            for (int v = 0; v < LEVELS; v++) cdf[v * lanes + b] = wide[v] - scaled_max;
        }
    }
    for (int i = 0; i < LEVELS * lanes; i++) cdf[i] = exp_nonpositive(cdf[i]);  /* every lane's at once */
    for (int v = 1; v < LEVELS; v++)
        for (int b = 0; b < lanes; b++) cdf[v * lanes + b] += cdf[(v - 1) * lanes + b];
    for (int b = 0; b < count; b++) {
        if (d->forced[b] >= 0) {
            *d->value[b] = d->forced[b];
            continue;
        }
        const double last = cdf[(LEVELS - 1) * lanes + b], target = d->u[b] * last;
        int value = 0, above = LEVELS - 1;  /* the first level whose sum exceeds target (sums never decrease) */
        while (value < above) {
            const int middle = (value + above) / 2;
            if (cdf[middle * lanes + b] > target)
                above = middle;
            else
                value = middle + 1;
        }
        double total = 0.0;
        if (d->temperature[b] == 1.0) {
            total = last;  /* the same sum: softmax(logits / 1) */
        } else {
            double terms[LEVELS];
            for (int v = 0; v < LEVELS; v++) terms[v] = exp_nonpositive((double)logits[b][v] - max[b]);
            for (int v = 0; v < LEVELS; v++) total += terms[v];
        }
        *d->value[b] = value;
        *d->log_prob[b] += ((double)logits[b][value] - max[b]) - log_positive(total);
    }
}

static void draw_block(float *const *logits, int count, const BlockDraws *d, double *restrict cdf) {
    if (count == 1)
        draw_lanes(logits, 1, d, cdf, 1);  /* one image: its levels side by side, no idle lanes to fill */
    else
        draw_lanes(logits, count, d, cdf, BLOCK);
}

/* The draws of a block's images b < count at one sub-pixel: image b's at index at + b * stride of uniforms,
 * forced (NULL: none kept) and values, its temperature and log p at temperature[b] and log_prob[b]. */
static void block_draws(BlockDraws *d, int count, const double *uniforms, const int64_t *forced, int64_t *values,
                        size_t at, size_t stride, const double *temperature, double *log_prob) {
    for (int b = 0; b < count; b++, at += stride) {
        d->u[b] = uniforms[at];
        d->temperature[b] = temperature[b];
        d->forced[b] = forced ? forced[at] : -1;
        d->value[b] = values + at;
        d->log_prob[b] = log_prob + b;
    }
}

/* The gate on a pre-activation (2n) whose tanh half a comes scaled by -2 (see row_decoders.scaled_gate):
 * tanh(a) sigmoid(b) = sigmoid(b) (1 - 2 sigmoid(-2a)). Overwrites pre with its sigmoids, writes gated (n).
 * The one gate of every C path (the per-sub-pixel loop and the vertical stack), so both compute it alike. */
static inline void gate(float *restrict gated, float *restrict pre, int n) {
    for (int o = 0; o < 2 * n; o++) pre[o] = 1.0f / (1.0f + exp_float(-pre[o]));  /* sigmoid */
    for (int o = 0; o < n; o++) gated[o] = pre[n + o] + -2.0f * (pre[o] * pre[n + o]);  /* tanh(a) sigmoid(b) */
}

/* Each image's working vectors in a block of the gated loop (slot b holds image first + b). */
typedef struct {
    float *pre[BLOCK], *gated[BLOCK], *out[BLOCK], *skips[BLOCK], *hidden[BLOCK], *logits[BLOCK];
} GatedScratch;

/* Scratch floats for a block of images; lays them out into s when `scratch` is given. */
static size_t gated_scratch(const GatedWeights *w, float *scratch, GatedScratch *s) {
    const int n = w->channels;
    const size_t per_image = (size_t)(6 * n + w->head + LEVELS);
    for (int b = 0; scratch != NULL && b < BLOCK; b++) {
        s->pre[b] = scratch + b * per_image;
        s->gated[b] = s->pre[b] + 2 * n;
        s->out[b] = s->gated[b] + n;
        s->skips[b] = s->out[b] + 2 * n;
        s->hidden[b] = s->skips[b] + n;
        s->logits[b] = s->hidden[b] + w->head;
    }
    return per_image * BLOCK;
}

/* Logits (256 each, into s->logits) of sub-pixel (j, colour) of images first .. first + count - 1;
 * writes each later layer's input at column j. The products run for the whole block (affine_block),
 * the elementwise parts image by image. */
static void step_block(const GatedWeights *w, int first, int count, int j, int colour, float *const *h_buffers,
                       const float *const *row_bias, const GatedScratch *s) {
    const int n = w->channels, width = w->width;
    const float *x[BLOCK], *bias[BLOCK];
    float *buffer[BLOCK];
    for (int b = 0; b < count; b++)
        for (int o = 0; o < n; o++) s->skips[b][o] = 0.0f;
    for (int l = 0; l < w->layers; l++) {
        const int kw = w->h_width[l], in = w->in_channels[l];
        const int last = l + 1 == w->layers;
        for (int b = 0; b < count; b++) {
            buffer[b] = h_buffers[l] + (size_t)(first + b) * (width + kw - 1) * in;
            x[b] = buffer[b] + (size_t)j * in;
            bias[b] = row_bias[l] + ((size_t)(first + b) * width + j) * 2 * n;
        }
        affine_block(s->pre, bias, x, w->h_weight[l], kw * in, 2 * n, count);
        for (int b = 0; b < count; b++) {
            float *pre = s->pre[b], *gated = s->gated[b];
            gate(gated, pre, n);
            x[b] = gated;
        }
        same_for_block(bias, w->out_bias[l], count);
        affine_block(s->out, bias, x, w->out_weight[l], n, last ? n : 2 * n, count);
        for (int b = 0; b < count; b++) {
            const float *out = s->out[b], *skip = last ? out : out + n;
            float *skips = s->skips[b];
            for (int o = 0; o < n; o++) skips[o] += skip[o];
            if (!last) {
                const int kw_next = w->h_width[l + 1];
                float *next = h_buffers[l + 1] + ((size_t)(first + b) * (width + kw_next - 1) + j + kw_next - 1) * n;
                const float *here = buffer[b] + (size_t)(j + kw - 1) * in;
                for (int o = 0; o < n; o++) next[o] = l > 0 ? out[o] + here[o] : out[o];
            }
        }
    }
    for (int b = 0; b < count; b++) {
        float *skips = s->skips[b];
        for (int o = 0; o < n; o++) skips[o] = skips[o] > 0.0f ? skips[o] : 0.0f;
        x[b] = skips;
    }
    same_for_block(bias, w->hidden_b, count);
    affine_block(s->hidden, bias, x, w->hidden_w, n, w->head, count);
    for (int b = 0; b < count; b++) {
        float *hidden = s->hidden[b];
        for (int o = 0; o < w->head; o++) hidden[o] = hidden[o] > 0.0f ? hidden[o] : 0.0f;
        x[b] = hidden;
    }
    same_for_block(bias, w->logits_b[colour], count);
    affine_block(s->logits, bias, x, w->logits_w[colour], w->head, LEVELS, count);
}

/* Where the draws of one row go: for sub-pixel (colour, j) of image b, index (b * C + colour) * W + j of
 * uniforms, forced (NULL: none kept) and values; temperature[b] and log_prob[b] (+=). */
typedef struct {
    const double *uniforms, *temperature;
    const int64_t *forced;
    int64_t *values;
    double *log_prob;
} RowDraws;

/* Sub-pixel (j, colour) of images first .. first + count - 1: its logits (step_block) and draws, and each
 * drawn value, scaled like scale_pixels, written into the first layer's input and, unless `below` is NULL,
 * into the row below's first vertical input (padded (B, W + kw_below - 1, C), at column j + kw_below / 2). */
static void draw_sub_pixel(const GatedWeights *w, int first, int count, int j, int colour, float *const *h_buffers,
                           const float *const *row_bias, const GatedScratch *s, double *cdf, const RowDraws *r,
                           float *below, int kw_below) {
    const int c = w->image_channels, width = w->width, kw0 = w->h_width[0];
    step_block(w, first, count, j, colour, h_buffers, row_bias, s);
    BlockDraws d;
    block_draws(&d, count, r->uniforms, r->forced, r->values, ((size_t)first * c + colour) * width + j,
                (size_t)c * width, r->temperature + first, r->log_prob + first);
    draw_block(s->logits, count, &d, cdf);
    for (int b = first; b < first + count; b++) {
        const float scaled = (float)*d.value[b - first] / 127.5f - 1.0f;
        h_buffers[0][((size_t)b * (width + kw0 - 1) + j + kw0 - 1) * c + colour] = scaled;
        if (below != NULL) below[((size_t)b * (width + kw_below - 1) + j + kw_below / 2) * c + colour] = scaled;
    }
}

int gated_decode_row(const GatedWeights *w, int32_t batch, float *const *h_buffers, const float *const *row_bias,
                     const double *uniforms, const double *temperature, int64_t *row, double *log_prob,
                     const int64_t *forced) {
    float *scratch = malloc(sizeof(float) * gated_scratch(w, NULL, NULL));
    double *cdf = malloc(sizeof(double) * DRAW_SCRATCH);
    if (scratch == NULL || cdf == NULL) {
        free(scratch);
        free(cdf);
        return 1;
    }
    GatedScratch s;
    gated_scratch(w, scratch, &s);
    const RowDraws draws = {uniforms, temperature, forced, row, log_prob};
    for (int first = 0; first < batch; first += BLOCK) {
        const int count = batch - first < BLOCK ? batch - first : BLOCK;
        for (int j = 0; j < w->width; j++)
            for (int colour = 0; colour < w->image_channels; colour++)
                draw_sub_pixel(w, first, count, j, colour, h_buffers, row_bias, &s, cdf, &draws, NULL, 0);
    }
    free(scratch);
    free(cdf);
    return 0;
}

/* The gated model's vertical stack for the row about to be drawn (CachedGated.begin_row, the readable
 * torch reference), and the push of a drawn row into the first layer's kept rows (CachedGated.end_row).
 * Layouts (float32, row-major, batch first), as in GatedCache on the C row loop:
 *   rows        per layer l, its kh_l kept input rows, oldest first, each (B, W + kw_l - 1, in_l), zero-padded
 *               by kw_l / 2 columns at both ends. For l > 0 the last of them is this row's output of layer
 *               l - 1, which this function writes.
 *   v_weight    per layer, kh_l matrices (kw_l * in_l, 2n), one per kernel row, tanh half scaled by -2
 *   v_bias[l], link_bias[l] (2n); link_weight[l] (2n, 2n); class_v[l], class_h[l] (B, 2n)
 *   row_bias[l] (B, W, 2n) out: link_bias + class_h + v_pre @ link_weight, where
 *               v_pre = (v_bias + sum over the kept rows r, in order, of rows[r] @ v_weight[r]) + class_v
 * Every column of every image is one input vector of affine_block (a block of 8 columns shares each weight
 * row), so each column's sums run in the same order whatever the batch or its place in it. */
typedef struct {
    int32_t layers, channels, image_channels, width;
    const int32_t *v_rows;   /* kh_l */
    const int32_t *v_width;  /* kw_l */
    const int32_t *h_size;   /* floats per image of h_buffers[l] (zero_horizontal_inputs) */
    const float *const *v_weight;  /* all layers' kernel-row matrices, layer after layer */
    const float *const *v_bias;
    const float *const *link_weight;
    const float *const *link_bias;
} GatedVertical;

/* Columns j0 .. j1 - 1 of every image b < batch of layer l's vertical stack:
 * inputs[0 .. kh - 1] are the layer's kept input rows (B, W + kw - 1, in), zero-padded at both ends, oldest
 * first: column j reads the kw * in numbers at j .. j + kw - 1 (columns j - kw/2 .. j + kw/2), side by side
 * (what CachedGated.unfold_row spreads out for the torch reference). Writes row_bias (B, W, 2n) and, unless
 * next is NULL (the last layer), the gated output of column j at position j + kw_next / 2 of the next
 * layer's new input row (the caller zeroes its padding, zero_padding, before its first columns). A block of
 * up to 8 columns shares each weight row, taken in turn from the images' ranges (image 0's, then image 1's,
 * ...), so that a block is full whatever the range's width; every column's sums run in the same order
 * whatever the block, so any split of a row into column ranges (gated_begin_row: all at once; the
 * wavefront: a few at a time) gives the same numbers.
 * scratch: BLOCK * 3n floats. */
static void vertical_columns(const GatedVertical *v, int l, int first_matrix, int batch, int j0, int j1,
                             const float *const *inputs, const float *class_v, const float *link_bias,
                             float *row_bias, float *next, float *scratch) {
    const int n = v->channels, width = v->width;
    const int kh = v->v_rows[l], kw = v->v_width[l], in = l == 0 ? v->image_channels : n;
    const int kw_next = next == NULL ? 0 : v->v_width[l + 1], pad_next = kw_next / 2;
    float *pre[BLOCK], *gated[BLOCK], *out[BLOCK];
    const float *x[BLOCK], *bias[BLOCK];
    for (int k = 0; k < BLOCK; k++) {
        pre[k] = scratch + (size_t)k * 3 * n;
        gated[k] = pre[k] + 2 * n;
    }
    const int span = j1 - j0, columns = batch * span;
    for (int c = 0; c < columns; c += BLOCK) {
        const int count = columns - c < BLOCK ? columns - c : BLOCK;
        int image[BLOCK], column[BLOCK];
        for (int k = 0; k < count; k++) {
            image[k] = (c + k) / span;
            column[k] = j0 + (c + k) % span;
        }
        same_for_block(bias, v->v_bias[l], count);
        for (int r = 0; r < kh; r++) {
            for (int k = 0; k < count; k++)
                x[k] = inputs[r] + ((size_t)image[k] * (width + kw - 1) + column[k]) * in;
            affine_block(pre, bias, x, v->v_weight[first_matrix + r], kw * in, 2 * n, count);
            for (int k = 0; k < count; k++) bias[k] = pre[k];  /* the running sum, in place */
        }
        for (int k = 0; k < count; k++) {
            const float *cv = class_v + (size_t)image[k] * 2 * n;
            for (int o = 0; o < 2 * n; o++) pre[k][o] += cv[o];
            x[k] = pre[k];
            bias[k] = link_bias + (size_t)image[k] * 2 * n;
            out[k] = row_bias + ((size_t)image[k] * width + column[k]) * 2 * n;
        }
        affine_block(out, bias, x, v->link_weight[l], 2 * n, 2 * n, count);
        if (next == NULL) continue;
        for (int k = 0; k < count; k++) {
            gate(gated[k], pre[k], n);
            memcpy(next + ((size_t)image[k] * (width + kw_next - 1) + column[k] + pad_next) * n, gated[k],
                   sizeof(float) * n);
        }
    }
}

/* link_bias + class_h of layer l for every image: (B, 2n). */
static void link_biases(const GatedVertical *v, int l, int batch, const float *class_h, float *out) {
    const int n = v->channels;
    for (int b = 0; b < batch; b++)
        for (int o = 0; o < 2 * n; o++) out[(size_t)b * 2 * n + o] = v->link_bias[l][o] + class_h[(size_t)b * 2 * n + o];
}

/* Zero the padding of every image's padded vertical input row (B, W + kw - 1, channels): columns before
 * kw / 2 and from kw / 2 + W on. Its other columns are written before they are read (vertical_columns,
 * or the drawn pixels), so zeroing all of it each row (~2.4 MB per row at batch 64) is not needed. */
static void zero_padding(float *row, int batch, int width, int kw, int channels) {
    const int pad = kw / 2;
    for (int b = 0; b < batch; b++) {
        float *image = row + (size_t)b * (width + kw - 1) * channels;
        memset(image, 0, sizeof(float) * (size_t)pad * channels);
        memset(image + (size_t)(pad + width) * channels, 0, sizeof(float) * (size_t)(kw - 1 - pad) * channels);
    }
}

/* The horizontal inputs at a row's start: zero what the row reads before writing it. Layer 0 reads the
 * current pixel's position (its colours not yet drawn, whose weights are masked) before the draw writes
 * it: all of it. Every later layer's step at column j writes position j + kw - 1 before reading it
 * (step_block), so only its left padding, kw - 1 columns, is read unwritten. */
static void zero_horizontal_inputs(const GatedVertical *v, int batch, float *const *h_buffers) {
    memset(h_buffers[0], 0, sizeof(float) * (size_t)batch * v->h_size[0]);
    for (int l = 1; l < v->layers; l++) {
        const int padding = v->h_size[l] - v->width * v->channels;
        for (int b = 0; b < batch; b++) memset(h_buffers[l] + (size_t)b * v->h_size[l], 0, sizeof(float) * padding);
    }
}

int gated_begin_row(const GatedVertical *v, int32_t batch, float *const *rows, const float *const *class_v,
                    const float *const *class_h, float *const *row_bias, float *const *h_buffers) {
    const int n = v->channels, width = v->width;
    float *scratch = malloc(sizeof(float) * ((size_t)BLOCK * 3 * n + (size_t)batch * 2 * n));
    if (scratch == NULL) return 1;
    float *link_bias = scratch + (size_t)BLOCK * 3 * n;  /* (B, 2n): link_bias + class_h per image */
    int first_row = 0;  /* index in rows of layer l's oldest kept row */
    for (int l = 0; l < v->layers; l++) {
        const int kh = v->v_rows[l];
        const int last = l + 1 == v->layers;
        const int kw_next = last ? 0 : v->v_width[l + 1];
        /* the next layer's new input row: its last kept row */
        float *next = last ? NULL : rows[first_row + kh + v->v_rows[l + 1] - 1];
        if (!last) zero_padding(next, batch, width, kw_next, n);
        link_biases(v, l, batch, class_h[l], link_bias);
        vertical_columns(v, l, first_row, batch, 0, width, (const float *const *)rows + first_row, class_v[l],
                         link_bias, row_bias[l], next, scratch);
        first_row += kh;
    }
    zero_horizontal_inputs(v, batch, h_buffers);
    free(scratch);
    return 0;
}

/* The drawn row (B, C, W) int64, scaled like scale_pixels, zero-padded like rows[0] into out (B, W + kw_0 - 1, C). */
void gated_end_row(const GatedVertical *v, int32_t batch, const int64_t *row, float *out) {
    const int c = v->image_channels, width = v->width, kw = v->v_width[0], pad = kw / 2;
    memset(out, 0, sizeof(float) * (size_t)batch * (width + kw - 1) * c);
    for (int b = 0; b < batch; b++)
        for (int j = 0; j < width; j++)
            for (int colour = 0; colour < c; colour++)
                out[((size_t)b * (width + kw - 1) + j + pad) * c + colour] =
                    (float)row[((size_t)b * c + colour) * width + j] / 127.5f - 1.0f;
}

/* ---- Wavefront decoding: the rows of the same images decoded by several threads at once ----------------
 *
 * Pixel (r, j) depends on row r - 1 only up to column j + reach (the gated model: half the first vertical
 * kernel's width plus half of each later one's), so row r may start once row r - 1 has drawn `reach + 1`
 * pixels. Thread t decodes rows t, t + lanes, ...; each row runs exactly the one-lane code for its pixels
 * (step_block, draw) and its vertical stack (vertical_columns, a few columns at a time as the row above
 * fills in), so every number, and so every drawn value, is the one-lane one.
 *
 * Shared state: per layer l the stream S_l of vertical input rows (S_0[t]: image row t - 1 scaled;
 * S_l[t], l > 0: layer l - 1's gated output at row t), kept in a ring of `ring` rows; row r reads
 * S_l[r - kh_l + 1 .. r] and writes S_0[r + 1] (its pixels, as they are drawn) and S_l[r], l > 0. At most
 * `lanes` consecutive rows are in flight, so a ring of max(kh) + lanes rows is never overwritten while read.
 * progress[i]: pixels of row i drawn (release/acquire). `end`: rows < end are complete; a thread that sees
 * *stop at a row's start, or finds the row above abandoned, lowers it to its own row and leaves.
 * rows_done (the caller's, optional): how many rows from the first are complete, values and log p, raised as
 * each row's last pixel is drawn, so that the caller can hand them on while the rest are drawn
 * (wavefront_rows_wait). Row i + 1's last pixel waits for row i's, so a complete row has complete rows above.
 *
 * On two threads a gated model's rows are split by role instead (`split`, see vertical_lane_rows): the
 * same functions on the same rows, in another thread, so again the one-lane numbers. */
/* What the threads of a wavefront share, whatever the architecture. */
typedef struct {
    int batch, rows, lanes, width;
    int by_role;     /* every lane has its own part of each row (a lane that does not start stops them all) */
    const int32_t *stop;
    int32_t *rows_done; /* NULL, or the caller's count of complete rows */
    _Atomic int32_t *progress; /* (rows) */
    _Atomic int32_t *sleeping; /* (rows): a thread may be asleep on progress[i] (then its writer wakes it) */
    _Atomic int32_t end;
    _Atomic int32_t failed;
} WavefrontSync;

typedef struct {
    WavefrontSync sync; /* first: a GatedWavefront * is a WavefrontSync * */
    const GatedWeights *w;
    const GatedVertical *v;
    int ring, group;
    int split;      /* 0: lanes by row; else two lanes by role: layers 0 .. split - 1 of the vertical stack, the rest */
    float **slots;  /* slots[l * ring + k]: ring row k of S_l, padded (B, W + kw_l - 1, in_l) */
    float *row_bias_ring[2][32];  /* split: row i's row biases (B, W, 2n) per layer in [i % 2] */
    _Atomic int32_t *vertical_progress; /* split, (rows): columns of row i whose row biases are complete */
    _Atomic int32_t *vertical_sleeping; /* split, (rows): the pixel lane may be asleep on it */
    const float *const *class_v;
    const float *const *class_h;
    const double *uniforms;    /* (rows, B, C, W) */
    const double *temperature; /* (B) */
    int64_t *values;           /* (rows, B, C, W) */
    double *log_prob;          /* (rows, B): each row's sum, from 0 */
} GatedWavefront;

static float *ring_row(const GatedWavefront *f, int l, int t) {
    const int k = ((t % f->ring) + f->ring) % f->ring;
    return f->slots[(size_t)l * f->ring + k];
}

/* Floats of one padded row of S_l. */
static size_t ring_row_floats(const GatedWavefront *f, int l) {
    const GatedVertical *v = f->v;
    return (size_t)f->sync.batch * (v->width + v->v_width[l] - 1) * (l == 0 ? v->image_channels : v->channels);
}

static void lower_end(_Atomic int32_t *end, int32_t row) {
    int32_t seen = atomic_load(end);
    while (row < seen && !atomic_compare_exchange_weak(end, &seen, row)) {
    }
}

/* Waiting for the row above (or the other lane): a spin, then sleep until its writer publishes more (a futex
 * on Linux, woken by publish; elsewhere sched_yield), so that a thread without a core of its own does not
 * take the time of the one it waits for. The spin is long (20000 pauses, ~0.7 ms on the Intel Xeon of
 * BENCHMARKS.md) because each thread has a core of its own while it runs (run_lanes pins them) and the
 * other lane is usually microseconds away: one image of the shipped model in 7.4 ms in the engine against
 * 7.9 ms with 2000 pauses and 8.2 ms with 200, whose futex wake-ups cost more than the spin. */
#define SPINS 20000

static void sleep_on(_Atomic int32_t *word, int32_t seen) {
#if defined(__linux__)
    const struct timespec timeout = {0, 2000000}; /* 2 ms: also notices an abandoned row above */
    syscall(SYS_futex, (int32_t *)word, FUTEX_WAIT_PRIVATE, seen, &timeout, NULL, 0);
#else
    (void)word;
    (void)seen;
    sched_yield();
#endif
}

/* `word` (a row's progress) is now `value`: wake whoever sleeps on it. */
/* Wake every thread asleep on `word` (sleep_on, wavefront_rows_wait); elsewhere they look again by themselves. */
static void wake_all(int32_t *word) {
#if defined(__linux__)
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
#else
    (void)word;
#endif
}

static void publish_to(_Atomic int32_t *word, _Atomic int32_t *sleeping, int value) {
    atomic_store(word, value); /* sequentially consistent, like the sleeper's flag below */
    if (atomic_load(sleeping)) wake_all((int32_t *)word);
}

/* Row i has drawn `pixels` pixels: tell the row below, and the caller once the row is complete. Rows can
 * complete out of order by a few instructions (each lane publishes its own), so the count only rises. */
static void publish(WavefrontSync *f, int i, int pixels) {
    publish_to(&f->progress[i], &f->sleeping[i], pixels);
    if (pixels == f->width && f->rows_done != NULL) {
        _Atomic int32_t *done = (_Atomic int32_t *)f->rows_done;
        int32_t seen = atomic_load(done);
        while (seen < i + 1 && !atomic_compare_exchange_weak(done, &seen, i + 1)) {
        }
        wake_all(f->rows_done);
    }
}

/* For the caller of a wavefront, on a thread of its own: `*word` (a rows_done) once it differs from `seen`,
 * or after timeout_us microseconds whatever it is. Sleeps in the kernel (a futex), woken by each change. */
int32_t wavefront_rows_wait(int32_t *word, int32_t seen, int32_t timeout_us) {
    _Atomic int32_t *value = (_Atomic int32_t *)word;
    if (atomic_load(value) != seen) return atomic_load(value);
#if defined(__linux__)
    const struct timespec timeout = {timeout_us / 1000000, (long)(timeout_us % 1000000) * 1000};
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, &timeout, NULL, 0);
#else
    const struct timespec pause = {0, 100000}; /* no futex: look again every 0.1 ms */
    nanosleep(&pause, NULL);
#endif
    return atomic_load(value);
}

/* Set `*word` (a rows_done) and wake whoever waits on it (wavefront_rows_wait): the caller marks the end. */
void wavefront_rows_publish(int32_t *word, int32_t value) {
    atomic_store((_Atomic int32_t *)word, value);
    wake_all(word);
}

/* Wait until `word`, the progress of row `watched`, reaches `value`; 0 if that row was abandoned (then the
 * waiting row is too). */
static int wait_until(WavefrontSync *f, _Atomic int32_t *word, _Atomic int32_t *sleeping, int value, int watched) {
    for (int spins = 0;; spins++) {
        const int32_t seen = atomic_load_explicit(word, memory_order_acquire);
        if (seen >= value) return 1;
        if (atomic_load(&f->end) <= watched) return 0;
        if (spins < SPINS) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            continue;
        }
        atomic_store(sleeping, 1); /* before the last look: publish sees it, or we see its store */
        if (atomic_load(word) == seen) sleep_on(word, seen);
    }
}

/* Wait until row i - 1 has drawn `pixels` pixels; 0 if it was abandoned (then row i is too). */
static int wait_for_row_above(WavefrontSync *f, int i, int pixels) {
    return i == 0 || wait_until(f, &f->progress[i - 1], &f->sleeping[i - 1], pixels, i - 1);
}

/* Row i may start: 0 once *stop was seen (no row from here on starts) or a row above was abandoned. */
static int row_may_start(WavefrontSync *f, int i) {
    if (f->stop != NULL && __atomic_load_n(f->stop, __ATOMIC_RELAXED)) lower_end(&f->end, i);
    return i < atomic_load(&f->end);
}

typedef struct {
    void *job; /* a GatedWavefront or a PixelCNNWavefront */
    int lane;
} WavefrontLane;

/* Run lane(0) here and lane(1 .. lanes - 1) on threads of their own; returns when all are done.
 * Each lane is pinned to a CPU of its own for the call (this thread to the one it is on, the others to
 * the next allowed ones; this thread's affinity is restored after): the lanes wait for each other
 * several times per row, and a new thread that Linux starts beside its creator (it does when the other
 * core is busy for a moment, say with the previous request's last Python work) would stay there for
 * milliseconds, the two lanes taking turns on one core (measured: 7 ms per image alone, 10-32 ms back to
 * back). With fewer allowed CPUs than lanes nothing is pinned. */
static void run_lanes(WavefrontSync *f, void *job, void *(*lane)(void *)) {
    pthread_t threads[64];
    WavefrontLane lanes[64];
    int started = 1;
#if defined(__linux__)
    cpu_set_t allowed, mine, own;
    const int here = sched_getcpu();
    int cpus[64], count = 0, pinned = 0;
    if (here >= 0 && pthread_getaffinity_np(pthread_self(), sizeof mine, &mine) == 0) {
        cpus[count++] = here;
        for (int cpu = 0; cpu < CPU_SETSIZE && count < f->lanes; cpu++)
            if (cpu != here && CPU_ISSET(cpu, &mine)) cpus[count++] = cpu;
        pinned = count == f->lanes;
    }
    if (pinned) {
        CPU_ZERO(&own);
        CPU_SET(here, &own);
        pthread_setaffinity_np(pthread_self(), sizeof own, &own);
    }
#endif
    for (int t = 1; t < f->lanes && t < 64; t++) {
        lanes[t] = (WavefrontLane){job, t};
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
#if defined(__linux__)
        if (pinned) {
            CPU_ZERO(&allowed);
            CPU_SET(cpus[t], &allowed);
            pthread_attr_setaffinity_np(&attributes, sizeof allowed, &allowed);
        }
#endif
        const int failed = pthread_create(&threads[t], &attributes, lane, &lanes[t]);
        pthread_attr_destroy(&attributes);
        if (failed) {
            lower_end(&f->end, f->by_role ? 0 : t); /* row t is never drawn: rows before it still are */
            break;
        }
        started++;
    }
    lanes[0] = (WavefrontLane){job, 0};
    lane(&lanes[0]);
    for (int t = 1; t < started; t++) pthread_join(threads[t], NULL);
#if defined(__linux__)
    if (pinned) pthread_setaffinity_np(pthread_self(), sizeof mine, &mine);
#endif
}

/* A progress word per row (returned: free() it) and a sleeping flag per row (*sleeping, in the same block),
 * all 0; NULL without memory. */
static _Atomic int32_t *progress_words(int rows, _Atomic int32_t **sleeping) {
    const int count = rows > 0 ? rows : 1;
    _Atomic int32_t *words = malloc(sizeof(_Atomic int32_t) * 2 * count);
    if (words == NULL) return NULL;
    for (int i = 0; i < 2 * count; i++) atomic_init(&words[i], 0);
    *sleeping = words + count;
    return words;
}

static int init_sync(WavefrontSync *f, int batch, int rows, int lanes, int width, const int32_t *stop,
                     int32_t *rows_done) {
    *f = (WavefrontSync){
        .batch = batch, .rows = rows, .lanes = lanes, .width = width, .stop = stop, .rows_done = rows_done};
    atomic_init(&f->end, rows);
    atomic_init(&f->failed, 0);
    f->progress = progress_words(rows, &f->sleeping);
    return f->progress != NULL;
}

/* A lane that cannot get its memory: nothing is reported, the call fails. */
static void lane_failed(WavefrontSync *f) {
    atomic_store(&f->failed, 1);
    lower_end(&f->end, 0);
}

/* Row i's rows of the vertical streams that layers first .. last - 1 write get their zero padding:
 * S_(l + 1)[i], the input of the layer above. */
static void start_vertical_row(GatedWavefront *f, int i, int first, int last) {
    const GatedVertical *v = f->v;
    for (int l = first; l < last && l + 1 < v->layers; l++)
        zero_padding(ring_row(f, l + 1, i), f->sync.batch, v->width, v->v_width[l + 1], v->channels);
}

/* Before row i's pixels: the zero padding of the row below's first vertical input (S_0[i + 1]), and the
 * horizontal buffers' zeros. */
static void start_pixel_row(GatedWavefront *f, int i, float *const *h_buffers) {
    const GatedVertical *v = f->v;
    const int batch = f->sync.batch;
    zero_padding(ring_row(f, 0, i + 1), batch, v->width, v->v_width[0], v->image_channels);
    zero_horizontal_inputs(v, batch, h_buffers);
}

/* Row i's vertical stack of layers first .. last - 1 up to column `upto` of layer last - 1, and the columns
 * each layer below needs for it; done[l]: layer l's columns computed so far (from 0 at the row's start).
 * Waits for what those columns read: the pixels of the row above (first == 0), else layer first - 1's
 * columns of this row, computed by the pipeline's vertical lane; 0 if that row was abandoned. */
static int vertical_upto(GatedWavefront *f, int i, int first, int last, int upto, int *done, float *const *row_bias,
                         float *link_bias, float *scratch) {
    const GatedVertical *v = f->v;
    const int width = v->width, batch = f->sync.batch;
    int target[32];
    target[last - 1] = upto;
    for (int l = last - 2; l >= first; l--) {
        const int reach = target[l + 1] + v->v_width[l + 1] / 2;
        target[l] = reach < width ? reach : width;
        if (target[l] < done[l]) target[l] = done[l];
    }
    const int needed = target[first] + v->v_width[first] / 2 < width ? target[first] + v->v_width[first] / 2 : width;
    if (first == 0 ? !wait_for_row_above(&f->sync, i, needed)
                   : !wait_until(&f->sync, &f->vertical_progress[i], &f->vertical_sleeping[i], needed, i))
        return 0;
    int first_matrix = 0;
    for (int l = 0; l < first; l++) first_matrix += v->v_rows[l];
    for (int l = first; l < last; first_matrix += v->v_rows[l], l++) {
        if (target[l] <= done[l]) continue;
        const int kh = v->v_rows[l];
        const float *inputs[32];
        for (int r = 0; r < kh; r++) inputs[r] = ring_row(f, l, i - kh + 1 + r);
        link_biases(v, l, batch, f->class_h[l], link_bias);
        float *next = l + 1 < v->layers ? ring_row(f, l + 1, i) : NULL;
        vertical_columns(v, l, first_matrix, batch, done[l], target[l], inputs, f->class_v[l], link_bias,
                         row_bias[l], next, scratch);
        done[l] = target[l];
    }
    return 1;
}

/* Pixel j of row i of every image, by the one-lane code, written into the horizontal buffers and into the
 * row below's first vertical input; then the row below may read it. */
static void pixel_column(GatedWavefront *f, int i, int j, float *const *h_buffers, const float *const *row_bias,
                         const GatedScratch *s, double *cdf) {
    const GatedWeights *w = f->w;
    const int batch = f->sync.batch;
    const size_t row_values = (size_t)i * batch * w->image_channels * w->width;
    const RowDraws draws = {f->uniforms + row_values, f->temperature, NULL, f->values + row_values,
                            f->log_prob + (size_t)i * batch};
    float *drawn_row = ring_row(f, 0, i + 1); /* padded (B, W + kw0 - 1, C) */
    for (int first = 0; first < batch; first += BLOCK) {
        const int count = batch - first < BLOCK ? batch - first : BLOCK;
        for (int colour = 0; colour < w->image_channels; colour++)
            draw_sub_pixel(w, first, count, j, colour, h_buffers, row_bias, s, cdf, &draws, drawn_row,
                           f->v->v_width[0]);
    }
    publish(&f->sync, i, j + 1);
}

/* One row (index i of the call) for every image, its vertical stack a group of columns ahead of its
 * pixels. Returns 0 if it was abandoned. */
static int wavefront_row(GatedWavefront *f, int i, float *const *h_buffers, float *const *row_bias, float *link_bias,
                         float *vertical_scratch, const GatedScratch *s, double *cdf) {
    const int width = f->v->width, layers = f->v->layers;
    if (!row_may_start(&f->sync, i)) return 0;
    start_vertical_row(f, i, 0, layers);
    start_pixel_row(f, i, h_buffers);
    int done[32] = {0};  /* vertical columns computed, per layer (layers <= 32, checked by the caller) */
    for (int j = 0; j < width; j++) {
        const int upto = j + f->group < width ? j + f->group : width;
        if (done[layers - 1] <= j && !vertical_upto(f, i, 0, layers, upto, done, row_bias, link_bias, vertical_scratch))
            return 0;
        pixel_column(f, i, j, h_buffers, (const float *const *)row_bias, s, cdf);
    }
    return 1;
}

/* The pipeline's two lanes (`split` > 0: two threads by role instead of by row). The vertical lane computes
 * the first `split` layers of every row's vertical stack, group by group, and publishes how many columns
 * of its top layer are done; the pixel lane computes the other layers' vertical stack as those columns
 * come, then draws the pixels. The split balances the two lanes' work and keeps each lane's weights in
 * its own core's cache, where one lane would stream all of them (~2.5 MB for the shipped model) per row.
 * The vertical lane is at most one row ahead (its row waits for the pixels above), so a ring of two rows
 * of row biases suffices. */
static void vertical_lane_rows(GatedWavefront *f, float *link_bias, float *vertical_scratch) {
    const int width = f->v->width, top = f->split - 1;
    for (int i = 0; i < f->sync.rows; i++) {
        if (!row_may_start(&f->sync, i)) return;
        start_vertical_row(f, i, 0, f->split);
        int done[32] = {0};
        while (done[top] < width) {
            const int upto = done[top] + f->group < width ? done[top] + f->group : width;
            if (!vertical_upto(f, i, 0, f->split, upto, done, f->row_bias_ring[i % 2], link_bias, vertical_scratch))
                return;
            publish_to(&f->vertical_progress[i], &f->vertical_sleeping[i], done[top]);
        }
    }
}

static void pixel_lane_rows(GatedWavefront *f, float *const *h_buffers, float *link_bias, float *vertical_scratch,
                            const GatedScratch *s, double *cdf) {
    const int width = f->v->width, layers = f->v->layers;
    for (int i = 0; i < f->sync.rows; i++) {
        if (!row_may_start(&f->sync, i)) return;
        start_vertical_row(f, i, f->split, layers);
        start_pixel_row(f, i, h_buffers);
        float *const *row_bias = f->row_bias_ring[i % 2];
        int done[32] = {0};
        for (int j = 0; j < width; j++) {
            const int upto = j + f->group < width ? j + f->group : width;
            if (f->split < layers) {
                if (done[layers - 1] <= j &&
                    !vertical_upto(f, i, f->split, layers, upto, done, row_bias, link_bias, vertical_scratch))
                    return;
            } else if (!wait_until(&f->sync, &f->vertical_progress[i], &f->vertical_sleeping[i], j + 1, i)) {
                return;
            }
            pixel_column(f, i, j, h_buffers, (const float *const *)row_bias, s, cdf);
        }
    }
}

static void *gated_wavefront_lane(void *argument) {
    const WavefrontLane *lane = argument;
    GatedWavefront *f = lane->job;
    const GatedVertical *v = f->v;
    const int n = v->channels, width = v->width, batch = f->sync.batch, layers = v->layers;
    const size_t block_floats = gated_scratch(f->w, NULL, NULL);
    size_t floats = block_floats + (size_t)BLOCK * 3 * n + (size_t)batch * 2 * n;
    for (int l = 0; l < layers; l++) floats += (size_t)batch * (v->h_size[l] + width * 2 * n);
    float *scratch = malloc(sizeof(float) * floats);
    double *cdf = malloc(sizeof(double) * DRAW_SCRATCH);
    float *h_buffers[32], *row_bias[32];
    if (scratch == NULL || cdf == NULL) {
        lane_failed(&f->sync);
        free(scratch);
        free(cdf);
        return NULL;
    }
    GatedScratch s;
    gated_scratch(f->w, scratch, &s);
    float *vertical_scratch = scratch + block_floats, *link_bias = vertical_scratch + (size_t)BLOCK * 3 * n;
    float *next = link_bias + (size_t)batch * 2 * n;
    for (int l = 0; l < layers; l++) {
        h_buffers[l] = next;
        row_bias[l] = next + (size_t)batch * v->h_size[l];
        next = row_bias[l] + (size_t)batch * width * 2 * n;
    }
    if (f->split && lane->lane == 1)
        vertical_lane_rows(f, link_bias, vertical_scratch);
    else if (f->split)
        pixel_lane_rows(f, h_buffers, link_bias, vertical_scratch, &s, cdf);
    else
        for (int i = lane->lane; i < f->sync.rows; i += f->sync.lanes)
            if (!wavefront_row(f, i, h_buffers, row_bias, link_bias, vertical_scratch, &s, cdf)) break;
    free(scratch);
    free(cdf);
    return NULL;
}

/* Decode up to `rows` rows of `batch` images (all at the same row) on `lanes` threads (this one and
 * lanes - 1 more). kept: every layer's kept vertical input rows as GatedCache holds them before a row
 * (layer 0: kh_0 image rows, layer l > 0: kh_l - 1 rows, oldest first), replaced on return by those for the
 * first row not drawn. group: vertical columns computed together (more share each weight read, and the
 * row below starts that much later); each layer's columns wait for the columns of the row above they read.
 * stop: polled at each row's start; once nonzero no further row starts. rows_done: NULL, or raised to
 * k as soon as rows 0 .. k - 1 are complete (WavefrontSync). Returns the rows completed (each row's values,
 * log p and uniforms at its index), or -1 when memory ran out. */
int gated_wavefront(const GatedWeights *w, const GatedVertical *v, int32_t batch, int32_t rows, int32_t lanes,
                    int32_t group, int32_t split, float *const *kept, const float *const *class_v,
                    const float *const *class_h, const double *uniforms, const double *temperature, int64_t *values,
                    double *log_prob, const int32_t *stop, int32_t *rows_done) {
    const int layers = v->layers, n = v->channels, width = v->width;
    if (layers > 32 || lanes < 1 || lanes > 64 || group < 1 || split < 0 || split > layers || (split && lanes != 2))
        return -1;
    int kh_max = 0;
    for (int l = 0; l < layers; l++) kh_max = v->v_rows[l] > kh_max ? v->v_rows[l] : kh_max;
    GatedWavefront f = {.w = w, .v = v, .ring = kh_max + lanes + 1, .group = group, .split = split, .class_v = class_v,
                        .class_h = class_h, .uniforms = uniforms, .temperature = temperature, .values = values,
                        .log_prob = log_prob};
    size_t floats = 0;
    for (int l = 0; l < layers; l++)
        floats += (size_t)f.ring * batch * (width + v->v_width[l] - 1) * (l == 0 ? v->image_channels : n);
    const size_t row_bias_floats = (size_t)batch * width * 2 * n;
    if (split) floats += 2 * (size_t)layers * row_bias_floats;
    float *ring = malloc(sizeof(float) * floats);
    float **slots = malloc(sizeof(float *) * (size_t)layers * f.ring);
    _Atomic int32_t *vertical = split ? progress_words(rows, &f.vertical_sleeping) : NULL;
    if (!init_sync(&f.sync, batch, rows, lanes, width, stop, rows_done) || ring == NULL || slots == NULL ||
        (split && vertical == NULL)) {
        free(ring);
        free(slots);
        free(vertical);
        free((void *)f.sync.progress);
        return -1;
    }
    f.sync.by_role = split;
    if (split) {
        f.vertical_progress = vertical;
        float *bias = ring + floats - 2 * (size_t)layers * row_bias_floats;
        for (int k = 0; k < 2; k++)
            for (int l = 0; l < layers; l++, bias += row_bias_floats) f.row_bias_ring[k][l] = bias;
    }
    f.slots = slots;
    float *at = ring;
    for (int l = 0; l < layers; l++) {
        for (int k = 0; k < f.ring; k++, at += ring_row_floats(&f, l)) slots[(size_t)l * f.ring + k] = at;
    }
    /* The kept rows into the ring: S_0[-kh_0 + 1 .. 0], S_l[-kh_l + 1 .. -1]. */
    int index = 0;
    for (int l = 0; l < layers; l++) {
        const int kept_rows = l == 0 ? v->v_rows[0] : v->v_rows[l] - 1, newest = l == 0 ? 0 : -1;
        for (int r = 0; r < kept_rows; r++)
            memcpy(ring_row(&f, l, newest - kept_rows + 1 + r), kept[index++], sizeof(float) * ring_row_floats(&f, l));
    }
    run_lanes(&f.sync, &f, gated_wavefront_lane);
    const int end = atomic_load(&f.sync.end), failed = atomic_load(&f.sync.failed);
    if (!failed) { /* the kept rows for row `end` */
        index = 0;
        for (int l = 0; l < layers; l++) {
            const int kept_rows = l == 0 ? v->v_rows[0] : v->v_rows[l] - 1, newest = l == 0 ? end : end - 1;
            for (int r = 0; r < kept_rows; r++)
                memcpy(kept[index++], ring_row(&f, l, newest - kept_rows + 1 + r), sizeof(float) * ring_row_floats(&f, l));
        }
    }
    free(ring);
    free(slots);
    free(vertical);
    free((void *)f.sync.progress);
    return failed ? -1 : end;
}

/* The masked-conv PixelCNN (PixelCNNRowDecoder's layout):
 *   inputs      (B, in_half + 1, W + 2 in_half, C)   rows i - in_half .. i of the image, current row last
 *   input_bias  (B, n)                                the input conv's bias plus the class bias
 *   windows[k]  (B, half_k + 1, W + 2 half_k, n / 2)  block k's masked conv input rows, current row last
 *   in_weight ((in_half + 1) (2 in_half + 1) C, n), conv_weight[k] ((half_k + 1)(2 half_k + 1) n/2, n/2),
 *   reduce_weight[k] (n, n/2), expand_weight[k] (n/2, n), then the head as above. */
typedef struct {
    int32_t blocks, channels, image_channels, width, head, in_half;
    const int32_t *half;
    const float *in_weight;
    const float *const *conv_weight;
    const float *const *conv_bias;
    const float *const *reduce_weight;
    const float *const *reduce_bias;
    const float *const *expand_weight;
    const float *const *expand_bias;
    const float *hidden_w;
    const float *hidden_b;
    const float *const *logits_w;
    const float *const *logits_b;
} PixelCNNWeights;

/* The (rows, 2 half + 1, ch) window around column j of an image's (rows, W + 2 half, ch) buffer. */
static void gather_window(float *restrict patch, const float *restrict buffer, int rows, int half, int width,
                          int ch, int j) {
    const int span = (2 * half + 1) * ch;
    for (int r = 0; r < rows; r++)
        memcpy(patch + (size_t)r * span, buffer + ((size_t)r * (width + 2 * half) + j) * ch, sizeof(float) * span);
}

static inline void relu(float *values, int count) {
    for (int o = 0; o < count; o++) values[o] = values[o] > 0.0f ? values[o] : 0.0f;
}

/* Each image's working vectors in a block of the masked-conv loop (slot b holds the block's image b). */
typedef struct {
    float *patch[BLOCK], *h[BLOCK], *act[BLOCK], *branch[BLOCK], *expanded[BLOCK], *hidden[BLOCK], *logits[BLOCK];
} PixelCNNScratch;

#define MAX_BLOCKS 64 /* residual blocks of a masked-conv model the kernel takes */

/* Scratch floats for a block of images; lays them out into s when `scratch` is given. */
static size_t pixelcnn_scratch(const PixelCNNWeights *w, float *scratch, PixelCNNScratch *s) {
    const int n = w->channels, half_n = n / 2, c = w->image_channels, in_half = w->in_half;
    int largest = (in_half + 1) * (2 * in_half + 1) * c;
    for (int k = 0; k < w->blocks; k++) {
        const int size = (w->half[k] + 1) * (2 * w->half[k] + 1) * half_n;
        largest = size > largest ? size : largest;
    }
    const size_t per_image = (size_t)(largest + 4 * n + w->head + LEVELS);
    if (scratch != NULL) {
        for (int b = 0; b < BLOCK; b++) {
            s->patch[b] = scratch + b * per_image;
            s->h[b] = s->patch[b] + largest;
            s->act[b] = s->h[b] + n;
            s->branch[b] = s->act[b] + n;
            s->expanded[b] = s->branch[b] + n;
            s->hidden[b] = s->expanded[b] + n;
            s->logits[b] = s->hidden[b] + w->head;
        }
    }
    return per_image * BLOCK;
}

/* Logits (into s->logits) of sub-pixel (j, colour) of a block's `count` images: image b's input rows
 * (in_half + 1 of them, the current row last, (W + 2 in_half, C) each) start at inputs[b], its block k's
 * window (half_k + 1 rows) at windows[k * BLOCK + b]; writes each block's reduced features at column j.
 * The products run for the whole block (affine_block), the rest image by image. */
static void pixelcnn_step(const PixelCNNWeights *w, int count, int j, int colour, float *const *inputs,
                          const float *const *input_bias, float *const *windows, const PixelCNNScratch *s) {
    const int n = w->channels, half_n = n / 2, c = w->image_channels, width = w->width, in_half = w->in_half;
    const int in_rows = (in_half + 1) * (2 * in_half + 1) * c;
    const float *x[BLOCK], *bias[BLOCK];
    float *centre[BLOCK];
    for (int b = 0; b < count; b++) {
        gather_window(s->patch[b], inputs[b], in_half + 1, in_half, width, c, j);
        x[b] = s->patch[b];
        bias[b] = input_bias[b];
    }
    affine_block(s->h, bias, x, w->in_weight, in_rows, n, count);
    for (int k = 0; k < w->blocks; k++) {
        const int half = w->half[k];
        float *const *window = windows + (size_t)k * BLOCK;
        for (int b = 0; b < count; b++) {
            centre[b] = window[b] + ((size_t)half * (width + 2 * half) + j + half) * half_n;
            memcpy(s->act[b], s->h[b], sizeof(float) * n);
            relu(s->act[b], n);
            x[b] = s->act[b];
        }
        same_for_block(bias, w->reduce_bias[k], count);
        affine_block(centre, bias, x, w->reduce_weight[k], n, half_n, count);
        for (int b = 0; b < count; b++) {
            relu(centre[b], half_n);
            gather_window(s->patch[b], window[b], half + 1, half, width, half_n, j);
            x[b] = s->patch[b];
        }
        same_for_block(bias, w->conv_bias[k], count);
        affine_block(s->branch, bias, x, w->conv_weight[k], (half + 1) * (2 * half + 1) * half_n, half_n, count);
        for (int b = 0; b < count; b++) {
            relu(s->branch[b], half_n);
            x[b] = s->branch[b];
        }
        same_for_block(bias, w->expand_bias[k], count);
        affine_block(s->expanded, bias, x, w->expand_weight[k], half_n, n, count);
        for (int b = 0; b < count; b++)
            for (int o = 0; o < n; o++) s->h[b][o] += s->expanded[b][o];
    }
    for (int b = 0; b < count; b++) {
        relu(s->h[b], n);
        x[b] = s->h[b];
    }
    same_for_block(bias, w->hidden_b, count);
    affine_block(s->hidden, bias, x, w->hidden_w, n, w->head, count);
    for (int b = 0; b < count; b++) {
        relu(s->hidden[b], w->head);
        x[b] = s->hidden[b];
    }
    same_for_block(bias, w->logits_b[colour], count);
    affine_block(s->logits, bias, x, w->logits_w[colour], w->head, LEVELS, count);
}

int pixelcnn_decode_row(const PixelCNNWeights *w, int32_t batch, float *inputs, const float *input_bias,
                        float *const *windows, const double *uniforms, const double *temperature, int64_t *row,
                        double *log_prob, const int64_t *forced) {
    const int n = w->channels, half_n = n / 2, c = w->image_channels, width = w->width, in_half = w->in_half;
    if (w->blocks > MAX_BLOCKS) return 1;
    float *scratch = malloc(sizeof(float) * pixelcnn_scratch(w, NULL, NULL));
    double *cdf = malloc(sizeof(double) * DRAW_SCRATCH);
    if (scratch == NULL || cdf == NULL) {
        free(scratch);
        free(cdf);
        return 1;
    }
    PixelCNNScratch s;
    pixelcnn_scratch(w, scratch, &s);
    float *image_inputs[BLOCK], *window[MAX_BLOCKS * BLOCK];
    const float *bias[BLOCK];
    const size_t input_size = (size_t)(in_half + 1) * (width + 2 * in_half) * c;
    for (int first = 0; first < batch; first += BLOCK) {
        const int count = batch - first < BLOCK ? batch - first : BLOCK;
        for (int b = 0; b < count; b++) {
            image_inputs[b] = inputs + (first + b) * input_size;
            bias[b] = input_bias + (size_t)(first + b) * n;
            for (int k = 0; k < w->blocks; k++) {
                const int half = w->half[k];
                window[k * BLOCK + b] = windows[k] + (size_t)(first + b) * (half + 1) * (width + 2 * half) * half_n;
            }
        }
        for (int j = 0; j < width; j++) {
            for (int colour = 0; colour < c; colour++) {
                pixelcnn_step(w, count, j, colour, image_inputs, bias, window, &s);
                BlockDraws d;
                block_draws(&d, count, uniforms, forced, row, ((size_t)first * c + colour) * width + j,
                            (size_t)c * width, temperature + first, log_prob + first);
                draw_block(s.logits, count, &d, cdf);
                for (int b = 0; b < count; b++)
                    image_inputs[b][((size_t)in_half * (width + 2 * in_half) + j + in_half) * c + colour] =
                        (float)*d.value[b] / 127.5f - 1.0f;
            }
        }
    }
    free(scratch);
    free(cdf);
    return 0;
}

/* Wavefront decoding of the masked-conv model. Every input and reduced-feature row of the call is kept
 * (tall buffers: row i's windows are rows i .. i + half of them, the current row last, as pixelcnn_decode_row
 * lays them out), so no row is ever overwritten; pixel (r, j) reads the row above up to column j + reach,
 * reach = the largest half kernel width (the input conv's and every block's). */
typedef struct {
    WavefrontSync sync;
    const PixelCNNWeights *w;
    int reach;
    float *inputs;                 /* (B, in_half + rows, W + 2 in_half, C) */
    float *windows[MAX_BLOCKS];    /* (B, half_k + rows, W + 2 half_k, n / 2) */
    const float *input_bias;       /* (B, n) */
    const double *uniforms, *temperature;
    int64_t *values;
    double *log_prob;
} PixelCNNWavefront;

static size_t tall_image(const PixelCNNWavefront *f, int half, int channels) {
    return (size_t)(half + f->sync.rows) * (f->w->width + 2 * half) * channels;
}

static void *pixelcnn_wavefront_lane(void *argument) {
    const WavefrontLane *lane = argument;
    PixelCNNWavefront *f = lane->job;
    const PixelCNNWeights *w = f->w;
    const int n = w->channels, half_n = n / 2, c = w->image_channels, width = w->width, in_half = w->in_half;
    const int batch = f->sync.batch;
    float *scratch = malloc(sizeof(float) * pixelcnn_scratch(w, NULL, NULL));
    double *cdf = malloc(sizeof(double) * DRAW_SCRATCH);
    if (scratch == NULL || cdf == NULL) {
        lane_failed(&f->sync);
        free(scratch);
        free(cdf);
        return NULL;
    }
    PixelCNNScratch s;
    pixelcnn_scratch(w, scratch, &s);
    float *image_inputs[BLOCK], *window[MAX_BLOCKS * BLOCK];
    const float *bias[BLOCK];
    for (int i = lane->lane; i < f->sync.rows; i += f->sync.lanes) {
        if (!row_may_start(&f->sync, i)) break;
        int abandoned = 0;
        for (int j = 0; j < width && !abandoned; j++) {
            const int needed = j + f->reach + 1 < width ? j + f->reach + 1 : width;
            if (!wait_for_row_above(&f->sync, i, needed)) {
                abandoned = 1;
                break;
            }
            for (int first = 0; first < batch; first += BLOCK) {
                const int count = batch - first < BLOCK ? batch - first : BLOCK;
                for (int b = 0; b < count; b++) {
                    image_inputs[b] = f->inputs + (first + b) * tall_image(f, in_half, c) +
                                      (size_t)i * (width + 2 * in_half) * c;
                    bias[b] = f->input_bias + (size_t)(first + b) * n;
                    for (int k = 0; k < w->blocks; k++) {
                        const int half = w->half[k];
                        window[k * BLOCK + b] = f->windows[k] + (first + b) * tall_image(f, half, half_n) +
                                                (size_t)i * (width + 2 * half) * half_n;
                    }
                }
                for (int colour = 0; colour < c; colour++) {
                    pixelcnn_step(w, count, j, colour, image_inputs, bias, window, &s);
                    BlockDraws d;
                    block_draws(&d, count, f->uniforms, NULL, f->values,
                                (((size_t)i * batch + first) * c + colour) * width + j, (size_t)c * width,
                                f->temperature + first, f->log_prob + (size_t)i * batch + first);
                    draw_block(s.logits, count, &d, cdf);
                    for (int b = 0; b < count; b++)
                        image_inputs[b][((size_t)in_half * (width + 2 * in_half) + j + in_half) * c + colour] =
                            (float)*d.value[b] / 127.5f - 1.0f;
                }
            }
            publish(&f->sync, i, j + 1);
        }
        if (abandoned) break;
    }
    free(scratch);
    free(cdf);
    return NULL;
}

/* Copy between a cache window (B, half + 1, W + 2 half, ch) and rows `top` .. top + half of a tall buffer;
 * to the cache, the current (last) row is left zero: it is the next row to draw. */
static void window_rows(const PixelCNNWavefront *f, float *tall, float *cache, int half, int channels, int top,
                        int to_cache) {
    const size_t row = (size_t)(f->w->width + 2 * half) * channels;
    for (int b = 0; b < f->sync.batch; b++) {
        float *image = tall + b * tall_image(f, half, channels) + (size_t)top * row;
        float *kept = cache + (size_t)b * (half + 1) * row;
        if (to_cache) {
            memcpy(kept, image, sizeof(float) * half * row);
            memset(kept + (size_t)half * row, 0, sizeof(float) * row);
        } else {
            memcpy(image, kept, sizeof(float) * (half + 1) * row);
        }
    }
}

/* pixelcnn_decode_row's loop for up to `rows` rows of `batch` images (all at the same row) on `lanes`
 * threads; inputs and windows as pixelcnn_decode_row takes them, replaced on return by those for the first
 * row not drawn. Arguments and return value otherwise as gated_wavefront's. */
int pixelcnn_wavefront(const PixelCNNWeights *w, int32_t batch, int32_t rows, int32_t lanes, float *inputs,
                       const float *input_bias, float *const *windows, const double *uniforms,
                       const double *temperature, int64_t *values, double *log_prob, const int32_t *stop,
                       int32_t *rows_done) {
    const int half_n = w->channels / 2, c = w->image_channels;
    if (w->blocks > MAX_BLOCKS || lanes < 1 || lanes > 64) return -1;
    PixelCNNWavefront f = {.w = w, .reach = w->in_half, .input_bias = input_bias, .uniforms = uniforms,
                           .temperature = temperature, .values = values, .log_prob = log_prob};
    for (int k = 0; k < w->blocks; k++) f.reach = w->half[k] > f.reach ? w->half[k] : f.reach;
    int ok = init_sync(&f.sync, batch, rows, lanes, w->width, stop, rows_done);
    f.inputs = ok ? calloc(batch * tall_image(&f, w->in_half, c), sizeof(float)) : NULL;
    ok = ok && f.inputs != NULL;
    for (int k = 0; k < w->blocks; k++) {
        f.windows[k] = ok ? calloc(batch * tall_image(&f, w->half[k], half_n), sizeof(float)) : NULL;
        ok = ok && f.windows[k] != NULL;
    }
    if (ok) {
        window_rows(&f, f.inputs, inputs, w->in_half, c, 0, 0);
        for (int k = 0; k < w->blocks; k++) window_rows(&f, f.windows[k], windows[k], w->half[k], half_n, 0, 0);
        run_lanes(&f.sync, &f, pixelcnn_wavefront_lane);
    }
    const int end = atomic_load(&f.sync.end), failed = !ok || atomic_load(&f.sync.failed);
    if (!failed) {
        window_rows(&f, f.inputs, inputs, w->in_half, c, end, 1);
        for (int k = 0; k < w->blocks; k++) window_rows(&f, f.windows[k], windows[k], w->half[k], half_n, end, 1);
    }
    free(f.inputs);
    for (int k = 0; k < w->blocks; k++) free(f.windows[k]);
    free((void *)f.sync.progress);
    return failed ? -1 : end;
}
