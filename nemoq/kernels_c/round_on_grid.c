/* GPTQ's inner loop over one block's columns (compensate.py's round_on_grid and nearest_code):
 * each column's weight rounded to the nearest value on its block's grid, the column's scaled
 * error pushed into the block's later columns through U; and the coordinate descent's column
 * loop after the sweep (compensate.refine). Rows are independent, so a row at a time. Every
 * operation in numpy's order and precision (double weights, U and H, float32 grid): the codes
 * equal the numpy reference's. */
#include <stdint.h>

/* The first index i in levels[0..n) with levels[i] >= t (numpy's searchsorted, side left). */
static int64_t search_left(const float * levels, int64_t n, double t) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if ((double)levels[mid] < t) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* The code of the level nearest to t on the grid a * level + b (ties to the larger level);
 * keep where a = 0 (every code then gives b). */
static uint8_t nearest_code(double t_w, float a, float b, const float * levels, const uint8_t * level_codes,
                            int64_t n_levels, uint8_t keep) {
    if (a == 0.0f) return keep;
    const double t = (t_w - (double)b) / (double)a;
    int64_t i = search_left(levels, n_levels, t);
    i = i < 1 ? 1 : (i > n_levels - 1 ? n_levels - 1 : i);
    const double lower = levels[i - 1], upper = levels[i];
    if (__builtin_fabs(t - lower) < __builtin_fabs(upper - t)) i -= 1;
    return level_codes[i];
}

/* w: (rows, ldw) doubles, the block's bs columns first, updated in place; a, b: (rows, bs) grid;
 * u: (bs, ldu) doubles, U's rows and columns of the block; levels (n_levels, sorted) with a code
 * each; code_values: each code's level; keep: the codes where a = 0. Out: codes and the scaled
 * errors (w - q) / u_jj, both (rows, bs). */
void nemoq_round_on_grid(double * w, int64_t ldw, const float * a, const float * b, int64_t rows, int64_t bs,
                         const double * u, int64_t ldu, const float * levels, const uint8_t * level_codes,
                         int64_t n_levels, const float * code_values, const uint8_t * keep,
                         uint8_t * codes, double * err) {
    for (int64_t r = 0; r < rows; r++) {
        double * wr = w + r * ldw;
        for (int64_t j = 0; j < bs; j++) {
            const int64_t k = r * bs + j;
            const uint8_t code = nearest_code(wr[j], a[k], b[k], levels, level_codes, n_levels, keep[k]);
            codes[k] = code;
            const float q = a[k] * code_values[code] + b[k];   /* float32, as dequantize */
            const double e = (wr[j] - (double)q) / u[j * ldu + j];
            err[k] = e;
            for (int64_t c = j + 1; c < bs; c++) wr[c] -= e * u[j * ldu + c];
        }
    }
}

/* The coordinate descent's column loop over m columns (compensate.refine): each column's code
 * moved to the one nearest its best value given the others, w_j + (r_j - h_jj d_j) / h_jj, and
 * the later columns of r = D H updated for the change (the earlier ones are not read again). Per row: w, d, r (rows, m) doubles (d and r updated in place);
 * a, b (rows, m) the grid; codes (rows, m) in and out; h (m, ldh) doubles, H's rows and columns
 * of these m columns. */
void nemoq_descend_codes(const double * w, double * d, double * r, const float * a, const float * b,
                         uint8_t * codes, int64_t rows, int64_t m, const double * h, int64_t ldh,
                         const float * levels, const uint8_t * level_codes, int64_t n_levels,
                         const float * code_values) {
    for (int64_t row = 0; row < rows; row++) {
        const double * wr = w + row * m;
        double * dr = d + row * m, * rr = r + row * m;
        for (int64_t j = 0; j < m; j++) {
            const int64_t k = row * m + j;
            const double hjj = h[j * ldh + j];
            const double target = wr[j] + (rr[j] - hjj * dr[j]) / hjj;
            const uint8_t code = nearest_code(target, a[k], b[k], levels, level_codes, n_levels, codes[k]);
            const float q = a[k] * code_values[code] + b[k];
            const double delta = wr[j] - (double)q - dr[j];
            if (delta != 0.0) {
                codes[k] = code;
                dr[j] += delta;
                for (int64_t c = j + 1; c < m; c++) rr[c] += delta * h[j * ldh + c];
            }
        }
    }
}
