/* threads.c — one knob for the engine's OpenMP loops and OpenBLAS's own threads.
 * Both default to the number of cores; they never run nested (OpenBLAS is called
 * outside our parallel regions), so there is no oversubscription. */
#include "iddpm/core.h"

#include <omp.h>

void openblas_set_num_threads(int n);

int idd_num_threads(void) { return omp_get_max_threads(); }

void idd_set_num_threads(int n) {
    if (n < 1) n = 1;
    if (n > IDD_MAX_THREADS) n = IDD_MAX_THREADS;   /* libgomp crashes creating 100000 */
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
}
