/* A whole routed-experts call in one C call: routing, both phases, on pool.c's threads.
 *
 *     y_t = sum_j  w_j * down[e_j] @ relu(up[e_j] @ x_t)^2        (moe.c, or moe_q8.c for q8)
 *
 * The caller (nemoq/kernels_c/moe.py) fills a nemoq_moe_call and calls nemoq_moe_matvec once.
 * Steps, with a barrier between:
 *   x -> Q8_0 (q8) or sums of x per 32 values (f32, k-quants with mins), split by blocks / slots
 *   up phase: rows of I in chunks claimed by the threads (claim_rows)
 *   hidden vectors -> Q8_0, or their sums, as for x
 *   down phase: rows of H in chunks
 * One thread computes each row, whichever it is, so the result does not depend on the thread
 * count, and it is the result of the per-phase functions run one after the other. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "moe_phases.h"
#include "pool.h"

typedef struct {
    const uint8_t * up;          /* (E, I, H) in up_type */
    const uint8_t * down;        /* (E, H, I) in down_type */
    int32_t up_type, down_type;  /* ggml type ids */
    int64_t n_experts, n_ff, hidden, n_tokens, top_k;
    const float * x;             /* (T, H) */
    const int32_t * expert_ids;  /* (T, k), each in 0 .. E - 1 */
    const float * expert_weights;   /* (T, k); slots with weight 0 are skipped */
    const float * up_scale;      /* (E,) or NULL */
    const float * down_scale;    /* (E,) or NULL */
    int32_t q8;                  /* 1: activations rounded to Q8_0 (moe_q8.c), 0: float32 (moe.c) */
    int32_t threads;
    float * out;                 /* (T, H), written */
} nemoq_moe_call;

/* The (T, k) slots grouped by expert, as moe.py's route(): groups in expert order, a group's
 * slots in token order, weight-0 slots dropped (a counting sort). */
typedef struct {
    int64_t n_groups, n_slots;
    int32_t * group_expert;   /* (G,) */
    int64_t * group_start;    /* (G + 1,) */
    int32_t * slot_token;     /* (S,) */
    float * slot_weight;      /* (S,) */
} routing;

/* Scratch kept between calls (calls are serialised by scratch_lock). */
static pthread_mutex_t scratch_lock = PTHREAD_MUTEX_INITIALIZER;
static void * scratch;
static size_t scratch_size;

/* A child forked while another thread was in a call inherits the lock held: it starts unlocked. */
static void unlock_in_child(void) { pthread_mutex_init(&scratch_lock, NULL); }
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void register_fork_handler(void) { pthread_atfork(NULL, NULL, unlock_in_child); }

static void * scratch_of(size_t bytes) {
    if (bytes > scratch_size) {
        void * grown = realloc(scratch, bytes);
        if (!grown) return NULL;
        scratch = grown;
        scratch_size = bytes;
    }
    return scratch;
}

/* Carves aligned arrays from one buffer: first with base NULL to size it, then for real. */
typedef struct {
    char * base;
    size_t used;
} carver;

static void * carve(carver * c, size_t bytes) {
    void * at = c->base ? c->base + c->used : NULL;
    c->used += (bytes + 63) / 64 * 64;
    return at;
}

/* Rows handed out in chunks, large first and smaller towards the end (guided scheduling), so
 * that a thread that started late or runs on a slower (or busier) core takes fewer rows and
 * nobody waits long at the barrier. Which thread computes a row does not change its value. */
#define MIN_CHUNK_ROWS 8

typedef struct {
    atomic_llong next;
    int64_t n;
} row_queue;

static int claim_rows(row_queue * q, int threads, int64_t * lo, int64_t * hi) {
    long long start = atomic_load_explicit(&q->next, memory_order_relaxed);
    for (;;) {
        if (start >= q->n) return 0;
        int64_t size = (q->n - start) / (2 * threads);
        size = size < MIN_CHUNK_ROWS ? MIN_CHUNK_ROWS : size;
        const long long end = start + size < q->n ? start + size : q->n;
        if (atomic_compare_exchange_weak_explicit(&q->next, &start, end, memory_order_relaxed, memory_order_relaxed)) {
            *lo = start;
            *hi = end;
            return 1;
        }
    }
}

typedef struct {
    const nemoq_moe_call * c;
    routing r;
    float * h;                          /* (S, I) hidden vectors */
    int8_t * xq, * hq;                  /* q8: Q8_0 levels of x (T, H) and of h (S, I) */
    float * xd, * xds, * hd, * hds;     /* q8: their block scales and scale * sum of levels */
    float * xs16, * hs16;               /* q8: sums of levels per 16 values */
    float * dots;                       /* q8: (S, H) scratch of the down phase */
    float * xsums, * hsums;             /* f32 with a k-quant: sums per 32 values of each slot's x, h */
    row_queue up_rows, down_rows;
    atomic_int failed;                  /* the first nonzero code of any thread */
} run;

static void carve_run(carver * c, run * R, const nemoq_moe_call * call, int64_t n_slots) {
    const int64_t T = call->n_tokens, H = call->hidden, I = call->n_ff, S = n_slots, E = call->n_experts;
    R->r.group_expert = carve(c, sizeof(int32_t) * (size_t)(E < S ? E : S));
    R->r.group_start = carve(c, sizeof(int64_t) * (size_t)(E + 1));
    R->r.slot_token = carve(c, sizeof(int32_t) * (size_t)S);
    R->r.slot_weight = carve(c, sizeof(float) * (size_t)S);
    R->h = carve(c, sizeof(float) * (size_t)(S * I));
    if (!call->q8) {   /* formats without mins leave them unused */
        R->xsums = carve(c, sizeof(float) * (size_t)(S * H / 32));
        R->hsums = carve(c, sizeof(float) * (size_t)(S * I / 32));
        return;
    }
    R->xq = carve(c, (size_t)(T * H));
    R->xd = carve(c, sizeof(float) * (size_t)(T * H / 32));
    R->xds = carve(c, sizeof(float) * (size_t)(T * H / 32));
    R->xs16 = carve(c, sizeof(float) * (size_t)(T * H / 16));
    R->hq = carve(c, (size_t)(S * I));
    R->hd = carve(c, sizeof(float) * (size_t)(S * I / 32));
    R->hds = carve(c, sizeof(float) * (size_t)(S * I / 32));
    R->hs16 = carve(c, sizeof(float) * (size_t)(S * I / 16));
    R->dots = carve(c, sizeof(float) * (size_t)(S * H));
}

/* Fills r, its arrays carved for n_experts experts and T * k slots; -3 for an expert id out of
 * range. */
static int route(const nemoq_moe_call * c, routing * r, int64_t * offset) {
    const int64_t E = c->n_experts, n = c->n_tokens * c->top_k;
    memset(offset, 0, sizeof(int64_t) * (size_t)E);
    for (int64_t i = 0; i < n; i++) {
        if (c->expert_ids[i] < 0 || c->expert_ids[i] >= E) return -3;
        offset[c->expert_ids[i]] += c->expert_weights[i] != 0.0f;
    }
    int64_t g = 0, s = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t count = offset[e];
        if (!count) continue;
        r->group_expert[g] = (int32_t)e;
        r->group_start[g++] = s;
        offset[e] = s;
        s += count;
    }
    r->group_start[g] = s;
    r->n_groups = g;
    r->n_slots = s;
    for (int64_t i = 0; i < n; i++)
        if (c->expert_weights[i] != 0.0f) {
            const int64_t at = offset[c->expert_ids[i]]++;
            r->slot_token[at] = (int32_t)(i / c->top_k);
            r->slot_weight[at] = c->expert_weights[i];
        }
    return 0;
}

/* This thread's share [lo, hi) of n items split in `parts` near-equal ranges. */
static void share(int64_t n, int index, int parts, int64_t * lo, int64_t * hi) {
    *lo = n * index / parts;
    *hi = n * (index + 1) / parts;
}

static void note_failure(run * R, int code) {
    int expected = 0;
    if (code) atomic_compare_exchange_strong(&R->failed, &expected, code);
}

/* This thread's share of the activations (Q8_0 or Q8_K, as nemoq_q8_quantize) of `rows` vectors of
 * n values, for weights in `type`, in whole units (nemoq_q8_unit). */
static void q8_share(const float * v, int64_t rows, int64_t n, int type, int8_t * q, float * d, float * ds,
                     float * s16, int index, int threads) {
    const int64_t unit = nemoq_q8_unit(type, n);
    int64_t lo, hi;
    share(rows * n / unit, index, threads, &lo, &hi);
    if (hi > lo)
        nemoq_q8_quantize(v + unit * lo, hi - lo, unit, type, q + unit * lo, d + unit / 32 * lo, ds + unit / 32 * lo,
                          s16 + unit / 16 * lo);
}

/* f32 with a format with mins: this thread's slots' sums per 32 values (moe_slot_sums). */
static void sums_share(int type, const float * base, int64_t n, const routing * r, const int32_t * row_of,
                       float * sums, int index, int threads) {
    int64_t lo, hi;
    share(r->n_slots, index, threads, &lo, &hi);
    if (hi > lo)
        moe_slot_sums(type, row_of ? base : base + lo * n, n, hi - lo, row_of ? row_of + lo : NULL, sums + lo * (n / 32));
}

static void moe_job(void * ctx, int index, int n) {
    run * R = ctx;
    const nemoq_moe_call * c = R->c;
    const routing * r = &R->r;
    const int64_t T = c->n_tokens, H = c->hidden, I = c->n_ff, S = r->n_slots, G = r->n_groups;
    int64_t lo, hi;
    if (c->q8)
        q8_share(c->x, T, H, c->up_type, R->xq, R->xd, R->xds, R->xs16, index, n);
    else
        sums_share(c->up_type, c->x, H, r, r->slot_token, R->xsums, index, n);
    pool_barrier();
    while (claim_rows(&R->up_rows, n, &lo, &hi))
        note_failure(R, c->q8 ? nemoq_moe_q8_up(c->up, c->up_type, I, H, R->xq, R->xd, R->xds, R->xs16, G, r->group_expert,
                                                r->group_start, r->slot_token, c->up_scale, R->h, lo, hi)
                              : moe_up_rows(c->up, c->up_type, I, H, c->x, G, r->group_expert, r->group_start,
                                            r->slot_token, c->up_scale, R->xsums, R->h, lo, hi));
    pool_barrier();
    if (atomic_load(&R->failed)) return;   /* every thread sees the same flag after the barrier */
    if (c->q8)
        q8_share(R->h, S, I, c->down_type, R->hq, R->hd, R->hds, R->hs16, index, n);
    else
        sums_share(c->down_type, R->h, I, r, NULL, R->hsums, index, n);
    pool_barrier();
    while (claim_rows(&R->down_rows, n, &lo, &hi))
        note_failure(R, c->q8 ? nemoq_moe_q8_down(c->down, c->down_type, H, I, R->hq, R->hd, R->hds, R->hs16, G,
                                                  r->group_expert, r->group_start, r->slot_token, r->slot_weight,
                                                  c->down_scale, R->dots, c->out, lo, hi)
                              : moe_down_rows(c->down, c->down_type, H, I, R->h, G, r->group_expert,
                                              r->group_start, r->slot_token, r->slot_weight, c->down_scale,
                                              R->hsums, c->out, lo, hi));
}

/* Returns 0; -1 for a format (or width) the kernels do not read, -2 when memory runs out, -3 for
 * an expert id out of range. */
int nemoq_moe_matvec(const nemoq_moe_call * c) {
    if (!nemoq_moe_supports(c->up_type) || !nemoq_moe_supports(c->down_type)) return -1;
    memset(c->out, 0, sizeof(float) * (size_t)(c->n_tokens * c->hidden));
    const int64_t max_slots = c->n_tokens * c->top_k;
    run R = {.c = c};
    carver size = {NULL, 0};
    carve_run(&size, &R, c, max_slots);
    carve(&size, sizeof(int64_t) * (size_t)c->n_experts);
    pthread_once(&fork_once, register_fork_handler);
    pthread_mutex_lock(&scratch_lock);
    carver at = {scratch_of(size.used), 0};
    int code = -2;
    if (at.base) {
        carve_run(&at, &R, c, max_slots);
        code = route(c, &R.r, carve(&at, sizeof(int64_t) * (size_t)c->n_experts));
    }
    if (!code && R.r.n_slots) {
        R.up_rows = (row_queue){0, c->n_ff};
        R.down_rows = (row_queue){0, c->hidden};
        pool_run(c->threads, moe_job, &R);
        code = atomic_load(&R.failed);
    }
    pthread_mutex_unlock(&scratch_lock);
    return code;
}
