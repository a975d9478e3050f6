/* The single-core FP32 peak, for the benchmark's roofline (app/bench/roofline.py): `accumulators`
 * independent running values, each updated acc = acc * m + a once per iteration, in vectors as wide as the
 * row kernel's (built with the same flags, -march=native). peak_fma lets the compiler fuse each update
 * into one FMA (the machine's peak, and the row kernel's: it computes its products with FMAs). Enough
 * accumulators (12) to cover the FMA latency on two vector units. Returns a sum of the values, so that the
 * loop is not optimised away. */
#include <stdint.h>

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float floats __attribute__((vector_size(4 * LANES)));
#define ACCUMULATORS 12

int peak_vector_floats(void) { return LANES; }

int peak_accumulators(void) { return ACCUMULATORS; }

#define PEAK_LOOP                                                                   \
    floats acc[ACCUMULATORS];                                                       \
    const floats m = (floats){0} + 0.99999994f, a = (floats){0} + 1e-7f;            \
    for (int k = 0; k < ACCUMULATORS; k++) acc[k] = (floats){0} + (float)k * start; \
    for (int64_t i = 0; i < iterations; i++)                                        \
        _Pragma("GCC unroll 12") for (int k = 0; k < ACCUMULATORS; k++) acc[k] = acc[k] * m + a; \
    float sum = 0.0f;                                                               \
    for (int k = 0; k < ACCUMULATORS; k++)                                          \
        for (int l = 0; l < LANES; l++) sum += acc[k][l];                           \
    return sum;

#if defined(__clang__)
float peak_fma(int64_t iterations, float start) {
#pragma clang fp contract(fast)
    PEAK_LOOP
}
#else
__attribute__((optimize("fp-contract=fast"))) float peak_fma(int64_t iterations, float start) { PEAK_LOOP }
#endif

