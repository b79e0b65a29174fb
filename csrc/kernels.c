/* initdiag C core: the CPU kernels (activation, dense epilogue, BatchNorm,
 * statistics, residual add / dropout masking) for float and double.  The bodies
 * live in kernels_tmpl.inc and residual_tmpl.inc, included once per element type.
 * Formulas: initdiag/kernels/{activation,batchnorm,stats,residual}.py.
 *
 * Rules: plain C99 (+ OpenMP when available); no allocation (fixed-size stack
 * scratch per column block only); no error other than a negative return code;
 * NaN and inf propagate.  Column sums of BatchNorm and the statistics run in the
 * element type over blocks of ROW_BLOCK rows and in double across blocks; other
 * reductions accumulate in double; variances use sums shifted by the first row
 * (Chan, Golub & LeVeque 1983). */
#include <math.h>
#include <string.h>

#include "initdiag.h"

enum { ACT_RELU, ACT_LEAKY, ACT_TANH, ACT_SIGMOID, ACT_GELU, ACT_SILU, ACT_SELU,
       ACT_ERF, ACT_IDENTITY, ACT_COUNT };

/* a parallel region costs a wake-up of the pool (~10-50 us, passive policy): only
 * open one for at least this many elements */
#define PAR_MIN 65536L
/* widest column block (stack scratch per thread: a few doubles per column) */
#define MAXBLK 1024L
/* column block of row_correlation and colsum */
#define STATS_BLK 256L
/* rows summed in the element type before each double update of a column sum */
#define ROW_BLOCK 64L
/* LayerNorm: rows per chunk (initdiag/kernels/layernorm.py ROW_CHUNK) and
 * features summed in the element type before each double update of a row sum
 * (SPAN) */
#define LN_ROWS 64L
#define LN_SPAN 1024L

#define SELU_ALPHA 1.6732632423543772848170429916717
#define SELU_SCALE 1.0507009873554804934193349852946
#define INV_SQRT2 0.70710678118654752440084436210485
#define INV_SQRT2PI 0.39894228040143267793994605993438
#define TWO_OVER_SQRTPI 1.1283791670955125738961589031215

static inline double act_d(double v, int code, double slope)
{
    switch (code) {
    case ACT_RELU: return v <= 0 ? 0.0 : v;
    case ACT_LEAKY: return v < 0 ? v * slope : v;
    case ACT_TANH: return tanh(v);
    case ACT_SIGMOID: return 1.0 / (1.0 + exp(-v));
    case ACT_GELU: return v * (0.5 * erfc(-v * INV_SQRT2));
    case ACT_SILU: return v * (1.0 / (1.0 + exp(-v)));
    case ACT_SELU: return v > 0 ? SELU_SCALE * v : (SELU_SCALE * SELU_ALPHA) * expm1(v);
    case ACT_ERF: return erf(v);
    default: return v;
    }
}

/* g * act'(v); NaN v gives NaN except where relu passes no gradient */
static inline double act_grad_d(double g, double v, int code, double slope)
{
    double s, t;
    switch (code) {
    case ACT_RELU: return v > 0 ? g : (v <= 0 ? 0.0 : v);
    case ACT_LEAKY: return v < 0 ? g * slope : (v >= 0 ? g : v);
    case ACT_TANH: t = tanh(v); return g * (1.0 - t * t);
    case ACT_SIGMOID: s = 1.0 / (1.0 + exp(-v)); return g * (s * (1.0 - s));
    case ACT_GELU:
        return g * (0.5 * erfc(-v * INV_SQRT2) + v * (INV_SQRT2PI * exp(-0.5 * v * v)));
    case ACT_SILU: s = 1.0 / (1.0 + exp(-v)); return g * (s + v * s * (1.0 - s));
    case ACT_SELU: return v > 0 ? g * SELU_SCALE : g * ((SELU_SCALE * SELU_ALPHA) * exp(v));
    case ACT_ERF: return g * (TWO_OVER_SQRTPI * exp(-v * v));
    default: return g;
    }
}

#define T float
#define SUF(name) name##_f32
#include "kernels_tmpl.inc"
#include "residual_tmpl.inc"
#include "optim_tmpl.inc"
#undef T
#undef SUF

#define T double
#define SUF(name) name##_f64
#include "kernels_tmpl.inc"
#include "residual_tmpl.inc"
#include "optim_tmpl.inc"
#undef T
#undef SUF
