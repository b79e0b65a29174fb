/* initdiag C core: residual add, scalar scale and inverted-dropout masking for
 * float and double (bodies in residual_tmpl.inc, included once per element type).
 * Formulas and NaN semantics: initdiag/kernels/residual.py.
 *
 * Arithmetic in the element type: scale is rounded to it first, then one multiply
 * and one add, each rounded (this file is built with -std=c99, i.e. without FP
 * contraction), so the results equal the NumPy reference bit for bit. */
#include "initdiag.h"

/* a parallel region costs a wake-up of the pool: only open one for at least this
 * many elements per chunk (as csrc/kernels.c) */
#define RES_PAR_MIN 65536L

#define T float
#define SUF(name) name##_f32
#include "residual_tmpl.inc"
#undef T
#undef SUF

#define T double
#define SUF(name) name##_f64
#include "residual_tmpl.inc"
#undef T
#undef SUF
