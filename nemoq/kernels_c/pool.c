/* pool.h's thread pool: pthreads and C11 atomics. */
#define _POSIX_C_SOURCE 200809L
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define MAX_THREADS 256
/* How long an idle worker spins before it sleeps: long enough to span the Python between two
 * calls of a loop, short enough not to hold a core away from other work for long. */
#define IDLE_SPIN_NS 200000
#define SPINS_PER_YIELD 1024   /* a waiter yields now and then, for when threads outnumber cores */

static struct {
    pthread_mutex_t run_lock;   /* one run at a time */
    pthread_mutex_t lock;       /* with `wake`: sleeping workers */
    pthread_cond_t wake;
    int n_workers;              /* started, all waiting for the next generation */
    atomic_uint generation;     /* one per run */
    atomic_int finished;        /* workers done with this run (all of them report) */
    atomic_int arrived;         /* at the current barrier */
    atomic_uint barrier_phase;
    pool_job job;
    void * ctx;
    int n;
} P = {.run_lock = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static unsigned start_generation[MAX_THREADS];   /* the generation a worker was started in */

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void wait_while_equal(atomic_uint * v, unsigned old) {
    for (unsigned spins = 1; atomic_load_explicit(v, memory_order_acquire) == old; spins++) {
        if (spins % SPINS_PER_YIELD == 0) sched_yield();
        else cpu_relax();
    }
}

/* Spin, then sleep, until the generation moves past *seen. */
static void wait_for_run(unsigned * seen) {
    const int64_t start = now_ns();
    for (unsigned spins = 1; atomic_load_explicit(&P.generation, memory_order_acquire) == *seen; spins++) {
        cpu_relax();
        if (spins % 256 == 0 && now_ns() - start > IDLE_SPIN_NS) {
            pthread_mutex_lock(&P.lock);
            while (atomic_load_explicit(&P.generation, memory_order_acquire) == *seen)
                pthread_cond_wait(&P.wake, &P.lock);
            pthread_mutex_unlock(&P.lock);
        }
    }
    *seen = atomic_load_explicit(&P.generation, memory_order_acquire);   /* runs never overlap: one step */
}

static void * worker(void * arg) {
    const int index = (int)(intptr_t)arg;
    unsigned seen = start_generation[index];
    for (;;) {
        wait_for_run(&seen);
        if (index < P.n) P.job(P.ctx, index, P.n);
        atomic_fetch_add_explicit(&P.finished, 1, memory_order_acq_rel);
    }
    return NULL;
}

/* A forked child has none of the parent's threads: it starts its own. */
static void forget_workers(void) {
    pthread_mutex_init(&P.run_lock, NULL);
    pthread_mutex_init(&P.lock, NULL);
    pthread_cond_init(&P.wake, NULL);
    P.n_workers = 0;
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void register_fork_handler(void) { pthread_atfork(NULL, NULL, forget_workers); }

int pool_run(int threads, pool_job job, void * ctx) {
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    pthread_once(&fork_once, register_fork_handler);
    pthread_mutex_lock(&P.run_lock);
    const unsigned generation = atomic_load(&P.generation);
    while (P.n_workers < threads - 1) {
        pthread_t t;
        start_generation[P.n_workers + 1] = generation;
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)(P.n_workers + 1))) break;
        pthread_detach(t);
        P.n_workers++;
    }
    const int n = threads < P.n_workers + 1 ? threads : P.n_workers + 1;
    P.job = job;
    P.ctx = ctx;
    P.n = n;
    atomic_store(&P.arrived, 0);
    atomic_store(&P.finished, 0);
    if (n > 1) {
        pthread_mutex_lock(&P.lock);
        atomic_fetch_add_explicit(&P.generation, 1, memory_order_acq_rel);
        pthread_cond_broadcast(&P.wake);
        pthread_mutex_unlock(&P.lock);
    }
    job(ctx, 0, n);
    if (n > 1)
        for (unsigned spins = 1; atomic_load_explicit(&P.finished, memory_order_acquire) < P.n_workers; spins++) {
            if (spins % SPINS_PER_YIELD == 0) sched_yield();
            else cpu_relax();
        }
    pthread_mutex_unlock(&P.run_lock);
    return n;
}

void pool_barrier(void) {
    const unsigned phase = atomic_load_explicit(&P.barrier_phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&P.arrived, 1, memory_order_acq_rel) == P.n - 1) {
        atomic_store_explicit(&P.arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&P.barrier_phase, 1, memory_order_release);
    } else
        wait_while_equal(&P.barrier_phase, phase);
}
