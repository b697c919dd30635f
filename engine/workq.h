/* workq.h — a fixed pool of worker threads for blocking work.
 *
 * The HTTP loop is single-threaded; anything that can block (store_append
 * waits for the group commit's fsync, reads touch the disk) runs here.
 * A job is an intrusive struct the caller embeds in its own context:
 * run() executes on a worker thread, then the job joins the completion
 * list and notify(ud) is called (from the worker; it must be thread-safe,
 * e.g. event_active).  The owner thread calls workq_complete(), which runs
 * done() for every finished job, in its own thread.
 *
 * Many threads matter: store_append blocks until its batch is synced, and
 * group commit only helps when many appends wait at once.
 */
#ifndef TM_WORKQ_H
#define TM_WORKQ_H

typedef struct workq workq;

typedef struct workq_job {
    struct workq_job *next;              /* owned by the queue while queued */
    void (*run)(struct workq_job *job);  /* worker thread */
    void (*done)(struct workq_job *job); /* owner thread, from workq_complete */
} workq_job;

/* Start nthreads workers.  NULL if no thread could be started. */
workq *workq_new(unsigned nthreads, void (*notify)(void *ud), void *ud);
/* Queue a job (any thread). */
void workq_submit(workq *q, workq_job *job);
/* Owner thread: call done() on every finished job; returns how many. */
unsigned workq_complete(workq *q);
/* Owner thread: wait until every job submitted so far has run, then
 * workq_complete (returns how many done() ran). */
unsigned workq_wait(workq *q);
/* Jobs submitted and not yet passed to done(). */
unsigned workq_inflight(workq *q);
/* Finish every queued job, join the workers, run remaining done()s, free. */
void workq_free(workq *q);

#endif
