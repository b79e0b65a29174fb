/* initdiag C core: prototypes only.  This file is the cffi cdef (read by
 * csrc/build_cffi.py), so it must stay plain declarations that cffi can parse:
 * no #include, no macros other than simple integer #defines.
 * Every function returns 0 on success or a negative IDG_E* code. */

#define IDG_OK 0
#define IDG_EINVAL -1
#define IDG_ENOTIMPL -2

/* Version of the C core and whether it was compiled with OpenMP. */
int idg_version(int *major, int *minor, int *has_openmp);

/* Smoke test: writes 0, 1, ..., n-1 as doubles into out (n >= 0). */
int idg_selftest(double *out, long n);
