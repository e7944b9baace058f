/* Scores from what the page summaries keep beside the KV cache, read in place, for the CPU path
(`summary_scores.py` builds and loads them): the page estimates a head decision sums
(`qada_page_logits`, `page_estimate`) and the key copy's block log-masses a page selection ranks
(`qada_key_copy_block_lse`, `page_select.key_copy_masses`). Each is the PyTorch code's result in
one pass: no gathered, unpacked or fp32 copy of the summaries or codes is ever written.

Inner loops run over a chunk's tokens (or explicit lanes of partial sums), never one serial sum,
so the compiler vectorizes them at -O3 without -ffast-math (whose finite-math would break -inf).
The token-major unpack, a serial dot per token or an accumulator in memory each cost 2-4x. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The loops over (row, KV head) pairs, blocks or pages run on the threads of PyTorch's own OpenMP
   runtime where `summary_scores.py` links it (the step's intra-op threads, idle while these run);
   built without OpenMP they run on the calling thread. Each item writes only its own outputs, so
   the results do not depend on the thread count. */
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_max_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif
#define PARALLEL_ITEMS 4 /* fewer items than this run on the calling thread alone */

/* The threads these loops use: omp_get_max_threads of the calling thread (torch.set_num_threads). */
int qada_threads(void) { return omp_get_max_threads(); }

#define MAX_DIM 256
#define MAX_GROUP 32
#define SUMS 4 /* partial sums over dimensions d mod SUMS: the add chain is the bound */
#define LANES 16 /* independent partial max / sum lanes: vector width without -ffast-math */

/* exp(x) for x <= 0: 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, 2^f by its degree-6 Taylor
   polynomial (relative error < 2e-7); x below -87 (2^-125) is taken as -87. Inlined branch-free
   so the loops calling it vectorize; expf would be called once per value. */
static inline float exp_nonpositive(float x) {
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    x = x < -87.0f ? -87.0f : x;
    float y = x * 1.44269504f, r = y + shifter, f = y - (r - shifter);
    int32_t n, bits;
    memcpy(&n, &r, sizeof n);
    n -= 0x4B400000; /* the bits of the shifter: n = round(y) */
    float p = 1.54035304e-4f;
    p = p * f + 1.33335581e-3f;
    p = p * f + 9.61812911e-3f;
    p = p * f + 5.55041087e-2f;
    p = p * f + 2.40226507e-1f;
    p = p * f + 6.93147181e-1f;
    p = p * f + 1.0f;
    bits = (n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* max(s[0..n)) for n >= 1 values. */
static float max_of(const float *s, int64_t n) {
    float lane[LANES], top = s[0];
    int64_t whole = n - n % LANES, t;
    for (int l = 0; l < LANES; l++)
        lane[l] = s[0];
    for (t = 0; t < whole; t += LANES)
        for (int l = 0; l < LANES; l++)
            lane[l] = s[t + l] > lane[l] ? s[t + l] : lane[l];
    for (int l = 0; l < LANES; l++)
        top = lane[l] > top ? lane[l] : top;
    for (; t < n; t++)
        top = s[t] > top ? s[t] : top;
    return top;
}

/* log(sum(exp(s[0..n)))) for n >= 1 finite values whose max is top. */
static float log_sum_exp_at(const float *s, int64_t n, const float top) {
    float lane[LANES];
    int64_t whole = n - n % LANES, t;
    for (int l = 0; l < LANES; l++)
        lane[l] = 0.0f;
    for (t = 0; t < whole; t += LANES)
        for (int l = 0; l < LANES; l++)
            lane[l] += exp_nonpositive(s[t + l] - top);
    float sum = 0.0f;
    for (; t < n; t++)
        sum += exp_nonpositive(s[t] - top);
    for (int l = 0; l < LANES; l++)
        sum += lane[l];
    return top + logf(sum);
}

/* log(sum(exp(s[0..n)))) for n >= 1 finite values. */
static float log_sum_exp(const float *s, int64_t n) { return log_sum_exp_at(s, n, max_of(s, n)); }

typedef float floats16 __attribute__((vector_size(64)));   /* GCC / Clang vector extensions */

/* The sum of 16 partial sums as a tree (halves added lane-wise: vector ops, where a serial sum
   of 16 is a chain of 16 dependent adds). */
static inline float tree_sum(float lane[16]) {
    for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; l++)
            lane[l] += lane[l + width];
    return lane[0];
}

/* a . b + c . e over n floats, in 16 independent partial sums (a serial sum is a chain of adds);
   c = e = NULL: a . b alone. */
static inline float dot2(const float *restrict a, const float *restrict b, const float *restrict c,
                         const float *restrict e, int64_t n) {
    float lane[16] = {0}, sum = 0.0f;
    int64_t d = 0;
    if (c)
        for (; d + 16 <= n; d += 16)
            for (int l = 0; l < 16; l++)
                lane[l] += a[d + l] * b[d + l] + c[d + l] * e[d + l];
    else
        for (; d + 16 <= n; d += 16)
            for (int l = 0; l < 16; l++)
                lane[l] += a[d + l] * b[d + l];
    for (; d < n; d++)
        sum += a[d] * b[d] + (c ? c[d] * e[d] : 0.0f);
    return sum + tree_sum(lane);
}

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    return dot2(a, b, NULL, NULL, n);
}

/* The scores of one chunk's 16 * V tokens for the G heads, into scores[g * stride + t]: the codes
   unpacked to fp32 once, dimension-major (code [dim][V]), then per head the sum over dimensions
   of weight * code, in SUMS * V vector registers. Inlined with V a constant. */
static inline __attribute__((always_inline)) void score_chunk(
    const float *restrict qn, const uint8_t *restrict bytes, const float *restrict lo,
    const float *restrict hi, int64_t group, int64_t dim, int64_t bits, const int V,
    int64_t stride, float *restrict scores, floats16 *restrict code) {
    const int64_t nbytes = dim * bits / 8, per = 8 / bits, chunk = 16 * V;
    const int mask = (1 << bits) - 1;
    const float levels = (float)mask;
    float step[MAX_DIM];
    for (int64_t b = 0; b < nbytes; b++)
        for (int64_t i = 0; i < per; i++) {
            const int shift = (int)(i * bits);
            float *column = (float *)(code + (i * nbytes + b) * V);
            for (int64_t t = 0; t < chunk; t++)
                column[t] = (float)((bytes[b * chunk + t] >> shift) & mask);
        }
    for (int64_t d = 0; d < dim; d++)
        step[d] = (hi[d] - lo[d]) / levels;
    for (int64_t g = 0; g < group; g++) {
        const float *qg = qn + g * dim;
        float weight[MAX_DIM + SUMS] = {0}; /* zero past dim: whole steps of SUMS dimensions */
        for (int64_t d = 0; d < dim; d++)
            weight[d] = qg[d] * step[d];
        floats16 partial[SUMS][V];
        for (int k = 0; k < SUMS; k++)
            for (int v = 0; v < V; v++)
                partial[k][v] = (floats16){0};
        for (int64_t d = 0; d < dim; d += SUMS)
            for (int k = 0; k < SUMS; k++)
                for (int v = 0; v < V; v++)
                    partial[k][v] += weight[d + k] * code[(d + k) * V + v];
        const float base = dot(qg, lo, dim);
        for (int v = 0; v < V; v++) {
            floats16 sum = (floats16){0} + base;
            for (int k = 0; k < SUMS; k++)
                sum += partial[k][v];
            memcpy(scores + g * stride + 16 * v, &sum, sizeof sum);
        }
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define INT8_WEIGHTS 1

/* The byte permutes of score_chunk_int8: byte 4t + r of the result is token t's byte of row r,
   rows 16 bytes apart (one vector, or 4 loads side by side), or 32 (two vectors: tokens 0 .. 15,
   then 16 .. 31). */
static void int8_permutes(__m512i permutes[3]) {
    uint8_t order[3][64];
    for (int t = 0; t < 16; t++)
        for (int r = 0; r < 4; r++) {
            order[0][4 * t + r] = (uint8_t)(16 * r + t);
            order[1][4 * t + r] = (uint8_t)(32 * r + t);
            order[2][4 * t + r] = (uint8_t)(32 * r + 16 + t);
        }
    for (int i = 0; i < 3; i++)
        permutes[i] = _mm512_loadu_si512(order[i]);
}

/* score_chunk for a 2- or 4-bit copy of whole 4-byte groups (D * bits / 8 a multiple of 4), with each
   head's weights q * step rounded to int8 on its own scale, max |weight| / 127: the codes' dot
   with them is then integer, 64 products per instruction (AVX-512 VNNI), a score being
   q . low + scale * sum_d w8_d code_d (its added error at most scale / 2 * sum_d code_d, well
   under the copy's own). A byte permute (VBMI) brings 4 bytes of a token into its 32-bit lane.
   top[g] takes the max of head g's scores as they are made: the block's log-sum-exp then needs
   no pass of its own for it (11% of the ranking at 7k). */
static void score_chunk_int8(const float *restrict qn, const uint8_t *restrict bytes,
                             const float *restrict lo, const float *restrict hi, int64_t group,
                             int64_t dim, int64_t bits, int64_t chunk, int64_t stride,
                             const __m512i *permutes, float *restrict scores, __m512 *restrict top) {
    const int64_t nbytes = dim * bits / 8, per = 8 / bits, quads = dim / 4;
    const float levels = (float)((1 << bits) - 1);
    int32_t weights[MAX_GROUP][MAX_DIM / 4]; /* the int8 weights of dimensions 4k .. 4k + 3 */
    float scale[MAX_GROUP], base[MAX_GROUP];
    __m512 step[MAX_DIM / 16], w[MAX_DIM / 16];
    const int64_t vectors = dim / 16;
    for (int64_t k = 0; k < vectors; k++)
        step[k] = _mm512_div_ps(_mm512_sub_ps(_mm512_loadu_ps(hi + 16 * k), _mm512_loadu_ps(lo + 16 * k)),
                                _mm512_set1_ps(levels));
    for (int64_t g = 0; g < group; g++) {
        const float *qg = qn + g * dim;
        __m512 top = _mm512_setzero_ps(), low_dot = _mm512_setzero_ps();
        for (int64_t k = 0; k < vectors; k++) {
            const __m512 qk = _mm512_loadu_ps(qg + 16 * k);
            w[k] = _mm512_mul_ps(qk, step[k]);
            top = _mm512_max_ps(top, _mm512_abs_ps(w[k]));
            low_dot = _mm512_fmadd_ps(qk, _mm512_loadu_ps(lo + 16 * k), low_dot);
        }
        const float largest = _mm512_reduce_max_ps(top);
        const __m512 inverse = _mm512_set1_ps(largest > 0.0f ? 127.0f / largest : 0.0f);
        for (int64_t k = 0; k < vectors; k++) /* round half to even, |w8| <= 127 */
            _mm_storeu_si128((__m128i *)weights[g] + k,
                             _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(w[k], inverse))));
        scale[g] = largest / 127.0f;
        base[g] = _mm512_reduce_add_ps(low_dot);
    }
    const __m512i by16 = permutes[0], by32[2] = {permutes[1], permutes[2]};
    const __m512i mask = _mm512_set1_epi8((char)((1 << bits) - 1));
    __m512i code[MAX_DIM / 4]; /* 16 tokens' codes of dimensions 4k .. 4k + 3, a byte each */
    for (int64_t t0 = 0; t0 < chunk; t0 += 16) {
        for (int64_t b = 0; b < nbytes; b += 4) { /* bytes b .. b + 3 of the 16 tokens */
            const uint8_t *row = bytes + b * chunk + t0;
            __m512i x;
            if (chunk == 16) /* the 4 rows are one vector */
                x = _mm512_permutexvar_epi8(by16, _mm512_loadu_si512(row));
            else if (chunk == 32) /* two vectors, whatever half t0 reads */
                x = _mm512_permutex2var_epi8(_mm512_loadu_si512(row - t0), by32[t0 / 16],
                                             _mm512_loadu_si512(row - t0 + 64));
            else {
                x = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)row));
                x = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i *)(row + chunk)), 1);
                x = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i *)(row + 2 * chunk)), 2);
                x = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i *)(row + 3 * chunk)), 3);
                x = _mm512_permutexvar_epi8(by16, x);
            }
            for (int64_t i = 0; i < per; i++) /* run i: dimensions i * nbytes + b .. + 3 */
                code[(i * nbytes + b) / 4] =
                    _mm512_and_si512(_mm512_srl_epi16(x, _mm_cvtsi32_si128((int)(i * bits))), mask);
        }
        for (int64_t g = 0; g < group; g++) {
            __m512i sum[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(),
                              _mm512_setzero_si512(), _mm512_setzero_si512()};
            int64_t k = 0;
            for (; k + 4 <= quads; k += 4) /* 4 chains: the dot's latency, not its throughput */
                for (int s = 0; s < 4; s++)
                    sum[s] = _mm512_dpbusd_epi32(sum[s], code[k + s], _mm512_set1_epi32(weights[g][k + s]));
            for (; k < quads; k++)
                sum[0] = _mm512_dpbusd_epi32(sum[0], code[k], _mm512_set1_epi32(weights[g][k]));
            const __m512i total = _mm512_add_epi32(_mm512_add_epi32(sum[0], sum[1]), _mm512_add_epi32(sum[2], sum[3]));
            const __m512 value = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_set1_ps(scale[g]), _mm512_set1_ps(base[g]));
            _mm512_storeu_ps(scores + g * stride + t0, value);
            top[g] = _mm512_max_ps(top[g], value);
        }
    }
}
#endif

/* Whether the ranking of a 2- or 4-bit copy rounds its weights to int8 (score_chunk_int8): only
   where the compiler targets AVX-512 VNNI and VBMI. */
int qada_int8_weights(void) {
#ifdef INT8_WEIGHTS
    return 1;
#else
    return 0;
#endif
}

/* Block log-masses from the low-bit key copy. For N (row, KV head) pairs with G query heads each:
the score of every key of the pair's row, q . (low + code * step) on the grid of the key's chunk,
is q . low + (q * step) . code, and each KV block's log-sum-exp of them is written out, with each
head's log-sum-exp over its row. Layouts are the page summaries' (`key_codes`): codes
[num_chunks, Hkv, D * bits / 8, chunk], byte-major (dimension i * D / per + j in byte j at bit
i * bits, per = 8 / bits), and the grid low / high [num_chunks, Hkv, D] fp32. */
int qada_key_copy_block_lse(const float *q,           /* [N, G, D] scaled queries */
                            const int64_t *kv_heads,  /* [N] */
                            const uint8_t *codes,     /* [num_chunks, Hkv, D * bits / 8, chunk] */
                            const float *low,         /* [num_chunks, Hkv, D] */
                            const float *high,        /* [num_chunks, Hkv, D] */
                            const int64_t *table,     /* [N, nb] physical blocks, logical order */
                            const int64_t *lengths,   /* [N] */
                            int64_t n_pairs, int64_t group, int64_t dim, int64_t num_kv_heads,
                            int64_t nb, int64_t block_size, int64_t chunk, int64_t bits,
                            float *block_lse, /* [N, G, nb] out: -inf past a row's last block */
                            float *total_lse) /* [N, G] out */
{
    const int sizes = chunk == 16 || chunk == 32 || chunk == 64 || chunk == 128;
    if (dim > MAX_DIM || group > MAX_GROUP || !sizes || block_size % chunk || (dim * bits) % 8)
        return 1;
    const int64_t nbytes = dim * bits / 8, per_block = block_size / chunk;
    const int threads = omp_get_max_threads();
    /* items: (pair, owned block), pair n's first at starts[n] */
    int64_t *starts = malloc(sizeof(int64_t) * (size_t)(n_pairs + 1));
    /* per thread: scores [G, block_size] and codes [dim rounded up to SUMS][chunk / 16] vectors,
       the rounding zeros (so never NaN) */
    const size_t code_count = (size_t)(dim + SUMS) * (size_t)(chunk / 16);
    float *scores = malloc(sizeof(float) * (size_t)(group * block_size) * (size_t)threads);
    floats16 *code = aligned_alloc(sizeof(floats16), sizeof(floats16) * code_count * (size_t)threads);
    if (!starts || !scores || !code) {
        free(starts), free(scores), free(code);
        return 2;
    }
    memset(code, 0, sizeof(floats16) * code_count * (size_t)threads);
    starts[0] = 0;
    for (int64_t n = 0; n < n_pairs; n++)
        starts[n + 1] = starts[n] + (lengths[n] - 1) / block_size + 1;
    const int64_t items = starts[n_pairs];
#ifdef INT8_WEIGHTS
    const int int8 = bits <= 4 && dim % 16 == 0;
    __m512i permutes[3];
    int8_permutes(permutes);
#endif
    int64_t most = 0; /* the most blocks a pair owns */
    for (int64_t n = 0; n < n_pairs; n++)
        most = starts[n + 1] - starts[n] > most ? starts[n + 1] - starts[n] : most;
    /* Items block-major, (block j, pair n): the pairs of one row (its KV heads) read their codes
       and grids side by side, where pair-major order strides over the other heads' (half the
       time, from memory). */
#pragma omp parallel for schedule(static) if (items >= PARALLEL_ITEMS)
    for (int64_t item = 0; item < most * n_pairs; item++) {
        const int64_t j = item / n_pairs, n = item % n_pairs, owned = starts[n + 1] - starts[n];
        if (j >= owned)
            continue;
        const int64_t head = kv_heads[n], left = lengths[n] - j * block_size;
        const int64_t in_block = left < block_size ? left : block_size;
        const float *qn = q + n * group * dim;
        float *own_scores = scores + (size_t)omp_get_thread_num() * (size_t)(group * block_size);
        floats16 *own_code = code + (size_t)omp_get_thread_num() * code_count;
#ifdef INT8_WEIGHTS
        __m512 block_top[MAX_GROUP]; /* each head's running max of the block's scores */
        for (int64_t g = 0; g < group; g++)
            block_top[g] = _mm512_set1_ps(-INFINITY);
#endif
        if (j + 1 < owned) /* the next block's codes and grid, while this one is scored */
            for (int64_t c = 0; c < per_block; c++) {
                const int64_t next = (table[n * nb + j + 1] * per_block + c) * num_kv_heads + head;
                for (int64_t at = 0; at < nbytes * chunk; at += 64)
                    __builtin_prefetch(codes + next * nbytes * chunk + at);
                for (int64_t at = 0; at < dim; at += 16) {
                    __builtin_prefetch(low + next * dim + at);
                    __builtin_prefetch(high + next * dim + at);
                }
            }
        for (int64_t c = 0; c * chunk < in_block; c++) { /* tokens past the row: ignored */
            const int64_t cell = (table[n * nb + j] * per_block + c) * num_kv_heads + head;
            const float *lo = low + cell * dim, *hi = high + cell * dim;
            const uint8_t *bytes = codes + cell * nbytes * chunk;
            float *at = own_scores + c * chunk;
#ifdef INT8_WEIGHTS
            if (int8) {
                score_chunk_int8(qn, bytes, lo, hi, group, dim, bits, chunk, block_size, permutes, at, block_top);
                continue;
            }
#endif
            switch (chunk / 16) { /* unrolled per chunk size */
            case 1: score_chunk(qn, bytes, lo, hi, group, dim, bits, 1, block_size, at, own_code); break;
            case 2: score_chunk(qn, bytes, lo, hi, group, dim, bits, 2, block_size, at, own_code); break;
            case 4: score_chunk(qn, bytes, lo, hi, group, dim, bits, 4, block_size, at, own_code); break;
            case 8: score_chunk(qn, bytes, lo, hi, group, dim, bits, 8, block_size, at, own_code); break;
            }
        }
        for (int64_t g = 0; g < group; g++) {
            const float *block_scores = own_scores + g * block_size;
            float *lse = block_lse + (n * group + g) * nb + j;
#ifdef INT8_WEIGHTS
            if (int8 && in_block == block_size) { /* the max came with the scores */
                *lse = log_sum_exp_at(block_scores, in_block, _mm512_reduce_max_ps(block_top[g]));
                continue;
            }
#endif
            *lse = log_sum_exp(block_scores, in_block);
        }
    }
    for (int64_t n = 0; n < n_pairs; n++) {
        const int64_t owned = starts[n + 1] - starts[n];
        float *out = block_lse + n * group * nb;
        for (int64_t g = 0; g < group; g++) {
            for (int64_t j = owned; j < nb; j++)
                out[g * nb + j] = -INFINITY;
            total_lse[n * group + g] = log_sum_exp(out + g * nb, owned);
        }
    }
    free(starts), free(scores), free(code);
    return 0;
}

/* Page estimates for B rows: for each (row, KV head, query head, whole bulk page j), from the
page summaries stats [4 (mean, var, min, max), num_chunks, Hkv, D] of the page's m stored chunks
(chunk_ids [B, J, m]): log n + q . mean + 1/2 q^2 . var with mean / var pooled over the m chunks
(equal counts), or with `bound` Quest's log n + sum_d max(q_d min_d, q_d max_d); -inf where
page_valid [B, J] is 0. q [B, Hkv, G, D] scaled; out [B, Hkv, G, J]. */
int qada_page_logits(const float *q, const float *stats, const int64_t *chunk_ids,
                     const uint8_t *page_valid, int64_t rows, int64_t num_kv_heads, int64_t group,
                     int64_t dim, int64_t pages, int64_t m, int64_t num_chunks, float log_n,
                     int64_t bound, float *out) {
    if (dim > MAX_DIM || group > MAX_GROUP)
        return 1;
    const int64_t plane = num_chunks * num_kv_heads * dim; /* one of mean, var, min, max */
    const float *means = stats, *vars = stats + plane, *mins = stats + 2 * plane, *maxs = stats + 3 * plane;
    const int64_t heads = rows * num_kv_heads * group, items = rows * num_kv_heads * pages;
    /* per query head the two factors: q^2 / 2 and q, or with `bound` q's positive and negative parts */
    float *qq = malloc(sizeof(float) * (size_t)(heads * dim)), *qlow = malloc(sizeof(float) * (size_t)(heads * dim));
    if (!qq || !qlow) {
        free(qq), free(qlow);
        return 2;
    }
    for (int64_t i = 0; i < heads * dim; i++) {
        const float x = q[i];
        qq[i] = bound ? (x > 0.0f ? x : 0.0f) : 0.5f * x * x;
        qlow[i] = bound ? (x < 0.0f ? x : 0.0f) : x;
    }
#pragma omp parallel for schedule(static) if (items >= PARALLEL_ITEMS)
    for (int64_t item = 0; item < items; item++) { /* (row, KV head, page) */
        const int64_t r = item / (num_kv_heads * pages), h = item / pages % num_kv_heads, j = item % pages;
        const int64_t pair = r * num_kv_heads + h;
        float *o = out + pair * group * pages;
        if (!page_valid[r * pages + j]) {
            for (int64_t g = 0; g < group; g++)
                o[g * pages + j] = -INFINITY;
            continue;
        }
        /* a, b: the page's (min, max) with `bound`, else its (mean, var): a single chunk's own,
           or pooled over the m (mean of the means, E[k^2] - mean^2 >= 0) */
        float a[MAX_DIM], b[MAX_DIM];
        const int64_t *ids = chunk_ids + (r * pages + j) * m;
        const int64_t first = (ids[0] * num_kv_heads + h) * dim;
        const float *a0 = (bound ? mins : means) + first, *b0 = (bound ? maxs : vars) + first;
        const float *pa = m == 1 ? a0 : a, *pb = m == 1 ? b0 : b; /* one chunk: as stored */
        if (m > 1 && bound) {
            for (int64_t d = 0; d < dim; d++) {
                a[d] = a0[d];
                b[d] = b0[d];
            }
            for (int64_t i = 1; i < m; i++) {
                const int64_t at = (ids[i] * num_kv_heads + h) * dim;
                for (int64_t d = 0; d < dim; d++) {
                    a[d] = mins[at + d] < a[d] ? mins[at + d] : a[d];
                    b[d] = maxs[at + d] > b[d] ? maxs[at + d] : b[d];
                }
            }
        } else if (m > 1) {
            for (int64_t d = 0; d < dim; d++) {
                a[d] = a0[d];
                b[d] = b0[d] + a0[d] * a0[d];
            }
            for (int64_t i = 1; i < m; i++) {
                const int64_t at = (ids[i] * num_kv_heads + h) * dim;
                for (int64_t d = 0; d < dim; d++) {
                    a[d] += means[at + d];
                    b[d] += vars[at + d] + means[at + d] * means[at + d];
                }
            }
            for (int64_t d = 0; d < dim; d++) {
                a[d] /= (float)m;
                const float var = b[d] / (float)m - a[d] * a[d];
                b[d] = var > 0.0f ? var : 0.0f;
            }
        }
        for (int64_t g = 0; g < group; g++) {
            const int64_t at = (pair * group + g) * dim;
            o[g * pages + j] = log_n + dot2(qlow + at, pa, qq + at, pb, dim);
        }
    }
    free(qq), free(qlow);
    return 0;
}

/* The bulk's log-mass [B, Hkv, G] (`page_estimate.bulk_lse_and_pages`): per head, the
log-sum-exp of its whole pages' estimates logits [B, Hkv, G, J] (-inf: padding) and of the exact
scores q . k of the bulk positions outside whole pages (exact_blocks / exact_offsets [B, P],
where exact_valid); -inf without bulk. keys: element (block, head, offset, d) at the given
strides (fp32); q [B, Hkv, G, D] scaled. */
int qada_bulk_lse(const float *q, const float *logits, const float *keys, int64_t block_stride,
                  int64_t head_stride, int64_t offset_stride, int64_t dim_stride,
                  const int64_t *exact_blocks, const int64_t *exact_offsets,
                  const uint8_t *exact_valid, int64_t rows, int64_t num_kv_heads, int64_t group,
                  int64_t dim, int64_t pages, int64_t positions, float *out) {
    if (dim > MAX_DIM || group > MAX_GROUP)
        return 1;
    const int64_t stride = pages + positions, pairs = rows * num_kv_heads;
    const size_t per_thread = (size_t)(group * stride + 1);
    float *scratch = malloc(sizeof(float) * per_thread * (size_t)omp_get_max_threads());
    if (!scratch)
        return 2;
#pragma omp parallel for schedule(static) if (pairs >= PARALLEL_ITEMS)
    for (int64_t pair = 0; pair < pairs; pair++) {
        const int64_t r = pair / num_kv_heads, h = pair % num_kv_heads;
        float *values = scratch + (size_t)omp_get_thread_num() * per_thread;
        const float *qh = q + (r * num_kv_heads + h) * group * dim;
        const float *page = logits + (r * num_kv_heads + h) * group * pages;
        int64_t n = 0; /* values of head g at values[g * (pages + positions) + i], i < n */
        for (int64_t j = 0; j < pages; j++) {
            if (page[j] == -INFINITY) /* padding: the same for every head */
                continue;
            for (int64_t g = 0; g < group; g++)
                values[g * stride + n] = page[g * pages + j];
            n++;
        }
        for (int64_t p = 0; p < positions; p++) {
            if (!exact_valid[r * positions + p])
                continue;
            const float *k = keys + exact_blocks[r * positions + p] * block_stride + h * head_stride +
                             exact_offsets[r * positions + p] * offset_stride;
            float key[MAX_DIM];
            for (int64_t d = 0; d < dim; d++)
                key[d] = k[d * dim_stride];
            for (int64_t g = 0; g < group; g++)
                values[g * stride + n] = dot(qh + g * dim, key, dim);
            n++;
        }
        for (int64_t g = 0; g < group; g++)
            out[(r * num_kv_heads + h) * group + g] = n ? log_sum_exp(values + g * stride, n) : -INFINITY;
    }
    free(scratch);
    return 0;
}

/* The page summaries' refresh (`page_summaries.PageSummaries.refresh`): for each chunk the step
wrote (chunk_ids [N], valid tokens counts [N]), per KV head and dimension, the mean, population
variance (two-pass), min and max of its valid keys into stats [4, num_chunks, Hkv, D], and with
bits > 0 every key of the chunk re-coded on the new min / max into codes [num_chunks, Hkv,
D * bits / 8, chunk] (as `key_codes.quantize`: round half to even, clamped; a constant channel
codes as 0). keys: the fp32 key cache, element (block, head, offset, d) at the given strides. */
int qada_refresh_summaries(const float *keys, int64_t block_stride, int64_t head_stride,
                           int64_t offset_stride, int64_t dim_stride, const int64_t *chunk_ids,
                           const int64_t *counts, int64_t n, int64_t num_kv_heads, int64_t dim,
                           int64_t block_size, int64_t chunk, int64_t num_chunks, int64_t bits,
                           float *stats, uint8_t *codes) {
    if (chunk > 1024 || dim > MAX_DIM || block_size % chunk || (bits && (dim * bits) % 8))
        return 1;
    const int64_t plane = num_chunks * num_kv_heads * dim;
#pragma omp parallel for schedule(static) if (n * num_kv_heads >= PARALLEL_ITEMS)
    for (int64_t item = 0; item < n * num_kv_heads; item++) { /* (written chunk, KV head) */
        const int64_t i = item / num_kv_heads, h = item % num_kv_heads;
        const int64_t id = chunk_ids[i], count = counts[i];
        const int64_t block = id * chunk / block_size, first = id * chunk % block_size;
        float x[1024];
        const float *base = keys + block * block_stride + h * head_stride + first * offset_stride;
        float *out = stats + (id * num_kv_heads + h) * dim;
        uint8_t *packed = codes ? codes + (id * num_kv_heads + h) * (dim * bits / 8) * chunk : NULL;
        if (packed)
            memset(packed, 0, (size_t)(dim * bits / 8 * chunk));
        for (int64_t d = 0; d < dim; d++) {
            const int64_t tokens = packed ? chunk : count; /* codes: every key of the chunk */
            for (int64_t t = 0; t < tokens; t++)
                x[t] = base[t * offset_stride + d * dim_stride];
            float sum = 0.0f, low = x[0], high = x[0];
            for (int64_t t = 0; t < count; t++) {
                sum += x[t];
                low = x[t] < low ? x[t] : low;
                high = x[t] > high ? x[t] : high;
            }
            const float mean = sum / (float)count;
            float var = 0.0f;
            for (int64_t t = 0; t < count; t++)
                var += (x[t] - mean) * (x[t] - mean);
            out[d] = mean;
            out[plane + d] = var / (float)count;
            out[2 * plane + d] = low;
            out[3 * plane + d] = high;
            if (!packed)
                continue;
            const int levels = (1 << bits) - 1, per = 8 / (int)bits;
            const int64_t run = dim / per, byte = d % run, shift = (d / run) * bits;
            const float step = (high - low) / (float)levels;
            for (int64_t t = 0; t < chunk; t++) {
                float code = step > 0.0f ? (x[t] - low) / step : 0.0f;
                code = code != code ? 0.0f : nearbyintf(code); /* NaN: 0 */
                code = code < 0.0f ? 0.0f : (code > (float)levels ? (float)levels : code);
                packed[byte * chunk + t] |= (uint8_t)((int)code << shift);
            }
        }
    }
    return 0;
}

/* Page selection (`page_select.select_blocks`, then `selected_tables`) for N (row, KV head)
pairs from per-block log-masses block_lse [N, G, nb] and each head's total total_lse [N, G]: a
candidate block (wholly inside the bulk [t_sink, L - t_local)) has share exp(lse - total) per
head and ranks by its largest; with top_k > 0 the k best are read, else the fewest best that
leave at most `budget` of every head's share unread; the pair's other blocks up to its last are
always read. Writes the virtual block table [N, nb] (tables' kept blocks in logical order, the
one holding the current token last, then the rest), its length [N] and the kept count [N]. */
int qada_select_blocks(const float *block_lse, const float *total_lse, const int64_t *lengths,
                       const int32_t *tables, int64_t table_stride, int64_t n_pairs, int64_t group,
                       int64_t nb, int64_t block_size, int64_t t_sink, int64_t t_local, float budget,
                       int64_t top_k, int32_t *out_tables, int32_t *out_lengths, int64_t *kept) {
    if (group > MAX_GROUP || nb > 1 << 20)
        return 1;
    float *share = malloc(sizeof(float) * (size_t)(group * nb)), *rank = malloc(sizeof(float) * (size_t)nb);
    int64_t *order = malloc(sizeof(int64_t) * (size_t)nb);
    uint8_t *keep = malloc((size_t)nb);
    if (!share || !rank || !order || !keep) {
        free(share), free(rank), free(order), free(keep);
        return 2;
    }
    const int64_t first = (t_sink + block_size - 1) / block_size;
    for (int64_t n = 0; n < n_pairs; n++) {
        const int64_t length = lengths[n], last = (length - 1) / block_size;
        const int64_t window = (length - t_local > 0 ? length - t_local : 0) / block_size;
        float unread[MAX_GROUP] = {0};
        int64_t candidates = 0;
        for (int64_t k = 0; k < nb; k++) {
            const int candidate = k >= first && k < window;
            rank[k] = candidate ? 0.0f : -1.0f;
            candidates += candidate;
            for (int64_t g = 0; g < group; g++) {
                const float s = candidate ? expf(block_lse[(n * group + g) * nb + k] - total_lse[n * group + g]) : 0.0f;
                share[g * nb + k] = s;
                unread[g] += s;
                rank[k] = candidate && s > rank[k] ? s : rank[k];
            }
        }
        /* candidates by rank, largest first, ties in logical order (a stable sort) */
        int64_t count = 0;
        for (int64_t k = 0; k < nb; k++) {
            if (rank[k] < 0.0f)
                continue;
            int64_t at = count++;
            while (at > 0 && rank[order[at - 1]] < rank[k]) {
                order[at] = order[at - 1];
                at--;
            }
            order[at] = k;
        }
        int64_t take = 0;
        if (top_k > 0)
            take = candidates < top_k ? candidates : top_k;
        else
            for (int64_t i = 0; i < candidates; i++) { /* unread before taking the i-th ranked */
                int over = 0;
                for (int64_t g = 0; g < group; g++)
                    over |= unread[g] > budget;
                if (!over)
                    break;
                take++;
                for (int64_t g = 0; g < group; g++)
                    unread[g] -= share[g * nb + order[i]];
            }
        for (int64_t k = 0; k < nb; k++)
            keep[k] = k <= last && (k < first || k >= window);
        for (int64_t i = 0; i < take; i++)
            keep[order[i]] = 1;
        const int32_t *table = tables + n * table_stride;
        int32_t *out = out_tables + n * nb;
        int64_t at = 0;
        for (int64_t k = 0; k < nb; k++)
            if (keep[k] && k != last)
                out[at++] = table[k];
        out[at++] = table[last];
        kept[n] = at;
        out_lengths[n] = (int32_t)((at - 1) * block_size + (length - 1) % block_size + 1);
        for (int64_t k = 0; k < nb; k++)
            if (!keep[k])
                out[at++] = table[k];
    }
    free(share), free(rank), free(order), free(keep);
    return 0;
}

/* The local pass of `cpu_kernel.paged_decode` (its `_local_attention`, without the score
statistics): for each (row, KV head), the softmax of its G scaled queries over the row's local
set, the positions p < L with p < t_sink or p >= L - t_local, read in place from vLLM's CPU
cache (a (block, head) key matrix column-major [D, bs], a value matrix row-major [bs, D], at the
given element strides of block and head). Writes out [B, Hkv, G, D] and lse [B, Hkv, G]. */
int qada_local_attention(const float *q, /* [B, Hkv, G, D] scaled */
                         const float *keys, int64_t key_block_stride, int64_t key_head_stride,
                         const float *values, int64_t value_block_stride, int64_t value_head_stride,
                         const int64_t *block_table, int64_t table_stride, /* [B, >= blocks] */
                         const int64_t *lengths, int64_t rows, int64_t num_kv_heads, int64_t group,
                         int64_t dim, int64_t block_size, int64_t t_sink, int64_t t_local,
                         float *out, float *lse) {
    if (dim > MAX_DIM || group > MAX_GROUP || t_sink < 0 || t_local < 1)
        return 1;
    const int64_t most = t_sink + t_local, pairs = rows * num_kv_heads;
    float *scratch = malloc(sizeof(float) * (size_t)(group * most) * (size_t)omp_get_max_threads());
    if (!scratch)
        return 2;
#pragma omp parallel for schedule(static) if (pairs >= PARALLEL_ITEMS)
    for (int64_t pair = 0; pair < pairs; pair++) {
        const int64_t r = pair / num_kv_heads, h = pair % num_kv_heads;
        float *scores = scratch + (size_t)omp_get_thread_num() * (size_t)(group * most);
        const int64_t length = lengths[r], *table = block_table + r * table_stride;
        const int64_t sinks = t_sink < length ? t_sink : length;
        const int64_t window = length - t_local > sinks ? length - t_local : sinks;
        /* the local set as two position ranges: [0, sinks) and [window, length) */
        const int64_t begin[2] = {0, window}, end[2] = {sinks, length};
        const float *qh = q + (r * num_kv_heads + h) * group * dim;
        int64_t n = 0; /* scores of head g at scores[g * most + i], i < n */
        for (int range = 0; range < 2; range++)
            for (int64_t p = begin[range]; p < end[range];) {
                const int64_t offset = p % block_size;
                const int64_t stop = p - offset + block_size < end[range] ? p - offset + block_size : end[range];
                const float *k = keys + table[p / block_size] * key_block_stride + h * key_head_stride;
                for (int64_t t = offset; t < offset + (stop - p); t += 16) {
                    const int64_t w = offset + (stop - p) - t < 16 ? offset + (stop - p) - t : 16;
                    for (int64_t g = 0; g < group; g++) {
                        float acc[16] = {0};
                        const float *qg = qh + g * dim;
                        if (w == 16)
                            for (int64_t d = 0; d < dim; d++)
                                for (int l = 0; l < 16; l++)
                                    acc[l] += qg[d] * k[d * block_size + t + l];
                        else
                            for (int64_t d = 0; d < dim; d++)
                                for (int l = 0; l < w; l++)
                                    acc[l] += qg[d] * k[d * block_size + t + l];
                        memcpy(scores + g * most + n, acc, sizeof(float) * (size_t)w);
                    }
                    n += w;
                }
                p = stop;
            }
        for (int64_t g = 0; g < group; g++) { /* scores become probabilities, unnormalized */
            float *s = scores + g * most;
            const float top = max_of(s, n);
            float lane[16] = {0}, sum = 0.0f;
            int64_t i = 0;
            for (; i < n; i++)
                s[i] = exp_nonpositive(s[i] - top);
            for (i = 0; i + 16 <= n; i += 16)
                for (int l = 0; l < 16; l++)
                    lane[l] += s[i + l];
            for (; i < n; i++)
                sum += s[i];
            sum += tree_sum(lane);
            lse[(r * num_kv_heads + h) * group + g] = top + logf(sum);
            float *o = out + ((r * num_kv_heads + h) * group + g) * dim;
            for (int64_t d = 0; d < dim; d++)
                o[d] = 0.0f;
            i = 0;
            for (int range = 0; range < 2; range++)
                for (int64_t p = begin[range]; p < end[range]; p++, i++) {
                    const float *v = values + table[p / block_size] * value_block_stride +
                                     h * value_head_stride + (p % block_size) * dim;
                    for (int64_t d = 0; d < dim; d++)
                        o[d] += s[i] * v[d];
                }
            const float inverse = 1.0f / sum;
            for (int64_t d = 0; d < dim; d++)
                o[d] *= inverse;
        }
    }
    free(scratch);
    return 0;
}
