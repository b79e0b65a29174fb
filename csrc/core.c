/* initdiag C core: housekeeping entry points. */
#include "initdiag.h"

#ifdef _OPENMP
#include <omp.h>
#endif

int idg_version(int *major, int *minor, int *has_openmp)
{
    *major = 0;
    *minor = 1;
#ifdef _OPENMP
    *has_openmp = 1;
#else
    *has_openmp = 0;
#endif
    return IDG_OK;
}

int idg_selftest(double *out, long n)
{
    if (n < 0)
        return IDG_EINVAL;
    for (long i = 0; i < n; ++i)
        out[i] = (double)i;
    return IDG_OK;
}

int idg_num_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
