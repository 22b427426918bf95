/* l_dist.h — what the parts of iddpm._dist share: the ring transport of forked ranks
 * (l_dist_ring.c) used by the collectives (l_dist.c), and the launcher (l_dist_launch.c). */
#ifndef IDDPM_L_DIST_H
#define IDDPM_L_DIST_H

#include <stddef.h>
#include <stdint.h>

/* ring of the launcher's socket pairs: left = from rank-1, right = to rank+1 */
void idd_ring_setup(int left, int right, int rank, int world);
int idd_ring_up(void);
/* NULL on success, else a message naming the operation (valid until the next call) */
const char *idd_ring_allreduce(void *buf, int64_t n, int f64, double timeout);   /* sum, in place */
const char *idd_ring_broadcast(void *buf, size_t bytes, double timeout);         /* from rank 0 */
const char *idd_ring_allgather(const void *in, void *out, size_t bytes, double timeout);

/* a rank sees only its own GPU: narrows CUDA_VISIBLE_DEVICES before CUDA starts */
void idd_dist_pick_gpu(void);

#endif
