/* One row of the per-sub-pixel loop of both architectures, in plain C: what GatedRowDecoder and
 * PixelCNNRowDecoder (row_decoders.py) do with a few dozen torch ops per sub-pixel, here as loops over
 * each image's own numbers.
 *
 * Built by app/engine/native.py at first use with -ffp-contract=off and without -ffast-math, so every
 * sum is computed in the written order with IEEE rounding: an image's numbers never depend on the other
 * images of the batch (batch invariance by construction; no padding is needed for it).
 *
 * Layouts (float32, row-major, batch first), as in row_decoders.GatedRowDecoder:
 *   h_buffers[l]  (B, W + kw_l - 1, in_l)  the current row's inputs of layer l, zero-padded on the left
 *   row_bias[l]   (B, W, 2n)               all the vertical stack adds to each column's pre-activation
 *   h_weight[l]   (kw_l * in_l, 2n)        horizontal kernel, its tanh half scaled by -2
 *   out_weight[l] (n, 2n), the last (n, n) residual and skip 1x1s fused (the last layer: skip only)
 *   hidden_w (n, head), logits_w[c] (head, 256)
 * uniforms (B, C, W) float64, temperature (B) float64 -> row (B, C, W) int64, log_prob (B) float64 (+=).
 * The masked-conv PixelCNN's layouts are described at PixelCNNWeights below.
 */
#include <math.h>
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

/* out (cols) = bias + x (rows) @ w (rows, cols), summed over rows in order. */
static void affine(float *restrict out, const float *restrict bias, const float *restrict x,
                   const float *restrict w, int rows, int cols) {
    memcpy(out, bias, sizeof(float) * (size_t)cols);
    for (int k = 0; k < rows; k++) {
        const float xk = x[k];
        const float *restrict wk = w + (size_t)k * cols;
        for (int o = 0; o < cols; o++) out[o] += xk * wk[o];
    }
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

/* The protocol's draw (app/engine/protocol.py): the first level whose cumulative softmax(logits / T)
 * exceeds u times the total; returns it and log softmax(logits) at it (T = 1). */
static int draw(const float *restrict logits, double u, double temperature, double *restrict log_prob,
                double *restrict cdf) {
    double wide[LEVELS], scaled[LEVELS];
    for (int v = 0; v < LEVELS; v++) wide[v] = logits[v];
    for (int v = 0; v < LEVELS; v++) scaled[v] = wide[v] / temperature;
    const double scaled_max = maximum(scaled), max = maximum(wide);
    for (int v = 0; v < LEVELS; v++) cdf[v] = exp_nonpositive(scaled[v] - scaled_max);
    for (int v = 1; v < LEVELS; v++) cdf[v] += cdf[v - 1];
    const double target = u * cdf[LEVELS - 1];
    int value = 0;
    while (value < LEVELS - 1 && !(cdf[value] > target)) value++;
    double total = 0.0;
    if (temperature == 1.0) {
        total = cdf[LEVELS - 1];  /* the same sum: softmax(logits / 1) */
    } else {
        for (int v = 0; v < LEVELS; v++) scaled[v] = exp_nonpositive(wide[v] - max);
        for (int v = 0; v < LEVELS; v++) total += scaled[v];
    }
    *log_prob = (wide[value] - max) - log(total);
    return value;
}

/* Draw sub-pixel `at` of the row: its value into *value, its log p added to *log_prob; returns the value. */
static int draw_into(const float *logits, double u, double temperature, int64_t *value, double *log_prob,
                     double *cdf) {
    double lp;
    const int drawn = draw(logits, u, temperature, &lp, cdf);
    *value = drawn;
    *log_prob += lp;
    return drawn;
}

/* Logits (256) of sub-pixel (j, colour) of image b; writes each later layer's input at column j. */
static void step(const GatedWeights *w, int batch_index, int j, int colour, float *const *h_buffers,
                 const float *const *row_bias, float *scratch, float *logits) {
    const int n = w->channels, width = w->width;
    float *pre = scratch, *gated = pre + 2 * n, *out = gated + n, *skips = out + 2 * n, *hidden = skips + n;
    for (int o = 0; o < n; o++) skips[o] = 0.0f;
    for (int l = 0; l < w->layers; l++) {
        const int kw = w->h_width[l], in = w->in_channels[l];
        float *buffer = h_buffers[l] + (size_t)batch_index * (width + kw - 1) * in;
        const float *bias = row_bias[l] + ((size_t)batch_index * width + j) * 2 * n;
        affine(pre, bias, buffer + (size_t)j * in, w->h_weight[l], kw * in, 2 * n);
        for (int o = 0; o < 2 * n; o++) pre[o] = 1.0f / (1.0f + exp_float(-pre[o]));  /* sigmoid */
        for (int o = 0; o < n; o++) gated[o] = pre[n + o] + -2.0f * (pre[o] * pre[n + o]);  /* tanh(a) sigmoid(b) */
        const int last = l + 1 == w->layers;
        affine(out, w->out_bias[l], gated, w->out_weight[l], n, last ? n : 2 * n);
        const float *skip = last ? out : out + n;
        for (int o = 0; o < n; o++) skips[o] += skip[o];
        if (!last) {
            const int kw_next = w->h_width[l + 1];
            float *next = h_buffers[l + 1] + ((size_t)batch_index * (width + kw_next - 1) + j + kw_next - 1) * n;
            const float *here = buffer + (size_t)(j + kw - 1) * in;
            for (int o = 0; o < n; o++) next[o] = l > 0 ? out[o] + here[o] : out[o];
        }
    }
    for (int o = 0; o < n; o++) skips[o] = skips[o] > 0.0f ? skips[o] : 0.0f;
    affine(hidden, w->hidden_b, skips, w->hidden_w, n, w->head);
    for (int o = 0; o < w->head; o++) hidden[o] = hidden[o] > 0.0f ? hidden[o] : 0.0f;
    affine(logits, w->logits_b[colour], hidden, w->logits_w[colour], w->head, LEVELS);
}

int gated_decode_row(const GatedWeights *w, int32_t batch, float *const *h_buffers, const float *const *row_bias,
                     const double *uniforms, const double *temperature, int64_t *row, double *log_prob) {
    const int n = w->channels, c = w->image_channels, width = w->width;
    float *scratch = malloc(sizeof(float) * (size_t)(6 * n + w->head + LEVELS));
    double *cdf = malloc(sizeof(double) * LEVELS);
    if (scratch == NULL || cdf == NULL) {
        free(scratch);
        free(cdf);
        return 1;
    }
    float *logits = scratch + 6 * n + w->head;
    const int kw0 = w->h_width[0];
    for (int b = 0; b < batch; b++) {
        for (int j = 0; j < width; j++) {
            for (int colour = 0; colour < c; colour++) {
                step(w, b, j, colour, h_buffers, row_bias, scratch, logits);
                const size_t at = ((size_t)b * c + colour) * width + j;
                const int value = draw_into(logits, uniforms[at], temperature[b], row + at, log_prob + b, cdf);
                /* the first layer's input, scaled like scale_pixels */
                h_buffers[0][((size_t)b * (width + kw0 - 1) + j + kw0 - 1) * c + colour] = (float)value / 127.5f - 1.0f;
            }
        }
    }
    free(scratch);
    free(cdf);
    return 0;
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

int pixelcnn_decode_row(const PixelCNNWeights *w, int32_t batch, float *inputs, const float *input_bias,
                        float *const *windows, const double *uniforms, const double *temperature, int64_t *row,
                        double *log_prob) {
    const int n = w->channels, half_n = n / 2, c = w->image_channels, width = w->width, in_half = w->in_half;
    int largest = (in_half + 1) * (2 * in_half + 1) * c;
    for (int k = 0; k < w->blocks; k++) {
        const int size = (w->half[k] + 1) * (2 * w->half[k] + 1) * half_n;
        largest = size > largest ? size : largest;
    }
    float *scratch = malloc(sizeof(float) * (size_t)(largest + 4 * n + w->head + LEVELS));
    double *cdf = malloc(sizeof(double) * LEVELS);
    if (scratch == NULL || cdf == NULL) {
        free(scratch);
        free(cdf);
        return 1;
    }
    float *patch = scratch, *h = patch + largest, *act = h + n, *branch = act + n, *expanded = branch + n;
    float *hidden = expanded + n, *logits = hidden + w->head;
    const size_t input_size = (size_t)(in_half + 1) * (width + 2 * in_half) * c;
    for (int b = 0; b < batch; b++) {
        float *image_inputs = inputs + b * input_size;
        for (int j = 0; j < width; j++) {
            for (int colour = 0; colour < c; colour++) {
                gather_window(patch, image_inputs, in_half + 1, in_half, width, c, j);
                affine(h, input_bias + (size_t)b * n, patch, w->in_weight, (in_half + 1) * (2 * in_half + 1) * c, n);
                for (int k = 0; k < w->blocks; k++) {
                    const int half = w->half[k];
                    float *window = windows[k] + (size_t)b * (half + 1) * (width + 2 * half) * half_n;
                    memcpy(act, h, sizeof(float) * n);
                    relu(act, n);
                    float *centre = window + ((size_t)half * (width + 2 * half) + j + half) * half_n;
                    affine(centre, w->reduce_bias[k], act, w->reduce_weight[k], n, half_n);
                    relu(centre, half_n);
                    gather_window(patch, window, half + 1, half, width, half_n, j);
                    affine(branch, w->conv_bias[k], patch, w->conv_weight[k], (half + 1) * (2 * half + 1) * half_n, half_n);
                    relu(branch, half_n);
                    affine(expanded, w->expand_bias[k], branch, w->expand_weight[k], half_n, n);
                    for (int o = 0; o < n; o++) h[o] += expanded[o];
                }
                relu(h, n);
                affine(hidden, w->hidden_b, h, w->hidden_w, n, w->head);
                relu(hidden, w->head);
                affine(logits, w->logits_b[colour], hidden, w->logits_w[colour], w->head, LEVELS);
                const size_t at = ((size_t)b * c + colour) * width + j;
                const int value = draw_into(logits, uniforms[at], temperature[b], row + at, log_prob + b, cdf);
                image_inputs[((size_t)in_half * (width + 2 * in_half) + j + in_half) * c + colour] =
                    (float)value / 127.5f - 1.0f;
            }
        }
    }
    free(scratch);
    free(cdf);
    return 0;
}
