/* A persistent thread pool for kernels that run several phases per call (moe_run.c).
 *
 * Handing each phase to a Python thread pool costs a wake-up and the GIL per phase (about
 * 0.15 ms each on a small VM, a tenth of a one-token MoE call). Here one C call runs all
 * phases: the threads meet at a spinning barrier between phases, and after a run the workers
 * spin a short while before they sleep, so back-to-back calls find them awake. */
#ifndef NEMOQ_POOL_H
#define NEMOQ_POOL_H

/* job(ctx, index, n) on threads 0 .. n - 1, thread 0 being the caller; returns n once all are
 * done. n is `threads`, or fewer where the system refuses to start more. One run at a time:
 * a second caller waits for the first. */
typedef void (*pool_job)(void * ctx, int index, int n);
int pool_run(int threads, pool_job job, void * ctx);

/* Inside a job: wait until all n threads of the run have arrived. Every thread of a run must
 * pass the same barriers. */
void pool_barrier(void);

#endif
