#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* GCC/Clang vector extensions: AVX2 registers with -march=native on x86, plain code elsewhere. */
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 ld(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }
static inline v8 vmax(v8 a, v8 b) { const v8i m = a > b; return (v8)((m & (v8i)a) | (~m & (v8i)b)); }
static inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* exp(x) for x <= 0 (Cephes' expf polynomial: ~1 ulp); below -87 it returns ~1e-38 rather than 0. */
static inline v8 vexp(v8 x) {
    x = vmax(x, splat(-87.0f));
    const v8 magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v8 n = (x * splat(1.44269504088896341f) + magic) - magic;
    v8 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    v8 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8 scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

/* out[t] = scale * <q, k[t * row : t * row + D]> for t < tn; four tokens at a time keep four FMA chains busy. */
static inline __attribute__((always_inline)) void dots(const float *q, const float *k, int64_t row, int64_t tn,
                                                       float *out, float scale, const int64_t D) {
    int64_t t = 0;
    for (; t + 4 <= tn; t += 4) {
        const float *k0 = k + t * row, *k1 = k0 + row, *k2 = k1 + row, *k3 = k2 + row;
        v8 s0 = splat(0.0f), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t d = 0; d < D; d += 8) {
            const v8 qv = ld(q + d);
            s0 += qv * ld(k0 + d);
            s1 += qv * ld(k1 + d);
            s2 += qv * ld(k2 + d);
            s3 += qv * ld(k3 + d);
        }
        out[t] = hsum(s0) * scale;
        out[t + 1] = hsum(s1) * scale;
        out[t + 2] = hsum(s2) * scale;
        out[t + 3] = hsum(s3) * scale;
    }
    for (; t < tn; t++) {
        v8 s = splat(0.0f);
        for (int64_t d = 0; d < D; d += 8) s += ld(q + d) * ld(k + t * row + d);
        out[t] = hsum(s) * scale;
    }
}

/* acc[0:D] += sum_t p[t] * v[t * row : t * row + D], with acc held in registers for a constant D. */
static inline __attribute__((always_inline)) void axpys(float *acc, const float *p, const float *v, int64_t row,
                                                        int64_t tn, const int64_t D) {
    v8 a[32];
    for (int64_t d = 0; d < D; d += 8) a[d / 8] = ld(acc + d);
    for (int64_t t = 0; t < tn; t++) {
        const v8 pt = splat(p[t]);
        const float *vt = v + t * row;
        for (int64_t d = 0; d < D; d += 8) a[d / 8] += pt * ld(vt + d);
    }
    for (int64_t d = 0; d < D; d += 8) st(acc + d, a[d / 8]);
}

static inline __attribute__((always_inline)) void decode_one(
        const float *pool, const int64_t *chunks, int64_t L, const float *q, float *out, float *scores,
        int64_t chunk, int64_t H, int64_t G, float scale, const int64_t D) {
    const int64_t row = H * D, slot_stride = 2 * chunk * row, QH = H * G;
    for (int64_t c = 0; c * chunk < L; c++) { /* scores[(h * G + g) * L + t] */
        const float *kc = pool + chunks[c] * slot_stride;
        const int64_t tn = (L - c * chunk) < chunk ? (L - c * chunk) : chunk;
        for (int64_t h = 0; h < H; h++)
            for (int64_t g = 0; g < G; g++)
                dots(q + (h * G + g) * D, kc + h * D, row, tn, scores + (h * G + g) * L + c * chunk, scale, D);
    }
    float sums[QH];
    for (int64_t r = 0; r < QH; r++) { /* softmax numerators; the sums divide at the end */
        float *sr = scores + r * L;
        int64_t t = 0;
        v8 mv = splat(sr[0]);
        for (; t + 8 <= L; t += 8) { const v8 x = ld(sr + t); mv = vmax(x, mv); }
        float m = mv[0];
        for (int j = 1; j < 8; j++) m = mv[j] > m ? mv[j] : m;
        for (; t < L; t++) m = sr[t] > m ? sr[t] : m;
        v8 sv = splat(0.0f);
        for (t = 0; t + 8 <= L; t += 8) { const v8 e = vexp(ld(sr + t) - splat(m)); st(sr + t, e); sv += e; }
        float sum = hsum(sv);
        if (t < L) { /* the tail, through a padded vector */
            float tail[8] = {0};
            memcpy(tail, sr + t, sizeof(float) * (size_t)(L - t));
            const v8 e = vexp(ld(tail) - splat(m));
            for (int64_t j = 0; j < L - t; j++) { sr[t + j] = e[j]; sum += e[j]; }
        }
        sums[r] = sum;
    }
    memset(out, 0, sizeof(float) * (size_t)(QH * D));
    for (int64_t c = 0; c * chunk < L; c++) {
        const float *vc = pool + chunks[c] * slot_stride + chunk * row;
        const int64_t tn = (L - c * chunk) < chunk ? (L - c * chunk) : chunk;
        for (int64_t h = 0; h < H; h++)
            for (int64_t g = 0; g < G; g++)
                axpys(out + (h * G + g) * D, scores + (h * G + g) * L + c * chunk, vc + h * D, row, tn, D);
    }
    for (int64_t r = 0; r < QH; r++) {
        const float inv = 1.0f / sums[r];
        for (int64_t d = 0; d < D; d++) out[r * D + d] *= inv;
    }
}

/* One query token per sequence against its paged history, fp32.
   pool:    one layer, [slots, 2, chunk, H, D] contiguous (index 0 of dim 1 is K, 1 is V)
   chunks:  [n, max_chunks] slot of each of a sequence's chunks
   kv_lens: [n] positions 0..kv_len-1 are attended
   q, out:  [n, H * G, D] contiguous (query head h * G + g uses KV head h)
   D must be a multiple of 8 and at most 256. Returns 0, or -1 when out of memory.                */
int paged_decode_f32(const float *pool, const int64_t *chunks, const int64_t *kv_lens, const float *q,
                     float *out, int64_t n, int64_t max_chunks, int64_t chunk, int64_t H, int64_t G,
                     int64_t D, float scale, int threads) {
    const int64_t QH = H * G;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic, 1) reduction(| : failed) num_threads(threads)
    for (int64_t i = 0; i < n; i++) {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(QH * kv_lens[i]));
        if (scores == NULL) { failed = 1; continue; }
        const int64_t *ci = chunks + i * max_chunks;
        const float *qi = q + i * QH * D;
        float *oi = out + i * QH * D;
        if (D == 64) decode_one(pool, ci, kv_lens[i], qi, oi, scores, chunk, H, G, scale, 64);
        else if (D == 128) decode_one(pool, ci, kv_lens[i], qi, oi, scores, chunk, H, G, scale, 128);
        else decode_one(pool, ci, kv_lens[i], qi, oi, scores, chunk, H, G, scale, D);
        free(scores);
    }
    return failed ? -1 : 0;
}
/* ---------------------------------------------------------------- small-batch linear layers
   C[M, N] = X[M, K] . W^T with W packed once as [ceil(N / 16), K, 16] (zero-padded panels).
   MKL packs the weight on every call, which dominates when M is a decode batch; the packed
   panels stream from memory once and each 16-column panel stays in cache across M.        */

/* rows x 16 block of C; with few rows, even and odd k accumulate apart to keep more FMA chains busy. */
static inline __attribute__((always_inline)) void linear_block(const float *x, int64_t ldx, const float *w,
                                                               int64_t K, float *c, int64_t ldc, int64_t nn,
                                                               const int rows) {
    v8 a0[6], a1[6], b0[6], b1[6];
    for (int r = 0; r < rows; r++) a0[r] = a1[r] = b0[r] = b1[r] = splat(0.0f);
    int64_t k = 0;
    if (rows <= 2) {
        for (; k + 2 <= K; k += 2) {
            const v8 w0 = ld(w + k * 16), w1 = ld(w + k * 16 + 8), w2 = ld(w + k * 16 + 16), w3 = ld(w + k * 16 + 24);
            for (int r = 0; r < rows; r++) {
                const v8 xa = splat(x[r * ldx + k]), xb = splat(x[r * ldx + k + 1]);
                a0[r] += xa * w0;
                a1[r] += xa * w1;
                b0[r] += xb * w2;
                b1[r] += xb * w3;
            }
        }
    }
    for (; k < K; k++) {
        const v8 w0 = ld(w + k * 16), w1 = ld(w + k * 16 + 8);
        for (int r = 0; r < rows; r++) {
            const v8 xb = splat(x[r * ldx + k]);
            a0[r] += xb * w0;
            a1[r] += xb * w1;
        }
    }
    for (int r = 0; r < rows; r++) {
        if (rows <= 2) { a0[r] += b0[r]; a1[r] += b1[r]; }
        if (nn == 16) {
            st(c + r * ldc, a0[r]);
            st(c + r * ldc + 8, a1[r]);
        } else {
            float tmp[16];
            st(tmp, a0[r]);
            st(tmp + 8, a1[r]);
            memcpy(c + r * ldc, tmp, sizeof(float) * (size_t)nn);
        }
    }
}

void linear_packed_f32(const float *x, int64_t ldx, const float *wp, float *c, int64_t ldc, int64_t M, int64_t N,
                       int64_t K, int threads) {
    const int64_t panels = (N + 15) / 16;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < panels; p++) {
        const float *w = wp + p * K * 16;
        const int64_t n0 = p * 16, nn = (N - n0) < 16 ? (N - n0) : 16;
        int64_t m0 = 0;
        for (; m0 + 6 <= M; m0 += 6) linear_block(x + m0 * ldx, ldx, w, K, c + m0 * ldc + n0, ldc, nn, 6);
        const float *xr = x + m0 * ldx;
        float *cr = c + m0 * ldc + n0;
        switch (M - m0) {
            case 5: linear_block(xr, ldx, w, K, cr, ldc, nn, 5); break;
            case 4: linear_block(xr, ldx, w, K, cr, ldc, nn, 4); break;
            case 3: linear_block(xr, ldx, w, K, cr, ldc, nn, 3); break;
            case 2: linear_block(xr, ldx, w, K, cr, ldc, nn, 2); break;
            case 1: linear_block(xr, ldx, w, K, cr, ldc, nn, 1); break;
            default: break;
        }
    }
}
