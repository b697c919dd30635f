/* workq.c — worker thread pool with a completion hand-back (see workq.h).
 *
 * Invariants: a job is on exactly one of {pending, running, finished};
 * `inflight` counts jobs submitted and not yet given to done(), `running`
 * those a worker has taken and not finished; pending is FIFO.  Workers exit only when `stopping` is set and pending is empty.
 */
#include "workq.h"

#include <pthread.h>
#include <stdlib.h>

struct workq {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_cond_t fin_cv;          /* a job finished (workq_wait) */
    unsigned running;               /* jobs taken by a worker, not yet finished */
    unsigned waiters;               /* threads in workq_wait */
    workq_job *pend_head, *pend_tail;
    workq_job *fin;                 /* LIFO of finished jobs */
    unsigned inflight;
    int stopping;
    void (*notify)(void *ud);
    void *ud;
    unsigned nthreads;
    pthread_t *threads;
};

static void *workq_main(void *arg) {
    workq *q = arg;
    for (;;) {
        pthread_mutex_lock(&q->mu);
        while (!q->pend_head && !q->stopping) pthread_cond_wait(&q->cv, &q->mu);
        workq_job *j = q->pend_head;
        if (!j) {
            pthread_mutex_unlock(&q->mu);
            return NULL;
        }
        q->pend_head = j->next;
        if (!q->pend_head) q->pend_tail = NULL;
        q->running++;
        pthread_mutex_unlock(&q->mu);

        j->run(j);

        pthread_mutex_lock(&q->mu);
        j->next = q->fin;
        q->fin = j;
        q->running--;
        if (q->waiters) pthread_cond_broadcast(&q->fin_cv);
        pthread_mutex_unlock(&q->mu);
        if (q->notify) q->notify(q->ud);
    }
}

workq *workq_new(unsigned nthreads, void (*notify)(void *ud), void *ud) {
    workq *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    pthread_cond_init(&q->fin_cv, NULL);
    q->notify = notify;
    q->ud = ud;
    if (nthreads == 0) nthreads = 1;
    q->threads = calloc(nthreads, sizeof *q->threads);
    if (!q->threads) {
        free(q);
        return NULL;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (unsigned i = 0; i < nthreads; i++) {
        if (pthread_create(&q->threads[i], &attr, workq_main, q) != 0) break;
        q->nthreads++;
    }
    pthread_attr_destroy(&attr);
    if (q->nthreads == 0) {
        free(q->threads);
        free(q);
        return NULL;
    }
    return q;
}

void workq_submit(workq *q, workq_job *job) {
    job->next = NULL;
    pthread_mutex_lock(&q->mu);
    if (q->pend_tail) q->pend_tail->next = job;
    else q->pend_head = job;
    q->pend_tail = job;
    q->inflight++;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

unsigned workq_complete(workq *q) {
    pthread_mutex_lock(&q->mu);
    workq_job *j = q->fin;
    q->fin = NULL;
    pthread_mutex_unlock(&q->mu);
    /* Reverse to completion order. */
    workq_job *rev = NULL;
    while (j) {
        workq_job *n = j->next;
        j->next = rev;
        rev = j;
        j = n;
    }
    unsigned n = 0;
    while (rev) {
        workq_job *next = rev->next;
        pthread_mutex_lock(&q->mu);
        q->inflight--;
        pthread_mutex_unlock(&q->mu);
        rev->done(rev);
        rev = next;
        n++;
    }
    return n;
}

unsigned workq_wait(workq *q) {
    pthread_mutex_lock(&q->mu);
    q->waiters++;
    while (q->pend_head || q->running) pthread_cond_wait(&q->fin_cv, &q->mu);
    q->waiters--;
    pthread_mutex_unlock(&q->mu);
    return workq_complete(q);
}

unsigned workq_inflight(workq *q) {
    pthread_mutex_lock(&q->mu);
    unsigned n = q->inflight;
    pthread_mutex_unlock(&q->mu);
    return n;
}

void workq_free(workq *q) {
    if (!q) return;
    pthread_mutex_lock(&q->mu);
    q->stopping = 1;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
    for (unsigned i = 0; i < q->nthreads; i++) pthread_join(q->threads[i], NULL);
    workq_complete(q);
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
    pthread_cond_destroy(&q->fin_cv);
    free(q->threads);
    free(q);
}
