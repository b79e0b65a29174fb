/* initdiag C core: prototypes only.  This file is the cffi cdef (read by
 * csrc/build_cffi.py), so it must stay plain declarations that cffi can parse:
 * no #include, no macros other than simple integer #defines.
 * Every function returns 0 on success or a negative IDG_E* code; none allocates.
 * Arrays are C-contiguous, row-major (B, n); _f32 / _f64 name the element type.
 * Activation codes: 0 relu, 1 leaky_relu, 2 tanh, 3 sigmoid, 4 gelu, 5 silu,
 * 6 selu, 7 erf, 8 identity (initdiag/kernels/activation.py: ACT_CODES). */

#define IDG_OK 0
#define IDG_EINVAL -1
#define IDG_ENOTIMPL -2

/* Version of the C core and whether it was compiled with OpenMP. */
int idg_version(int *major, int *minor, int *has_openmp);

/* Smoke test: writes 0, 1, ..., n-1 as doubles into out (n >= 0). */
int idg_selftest(double *out, long n);

/* Threads an OpenMP parallel region would use (1 without OpenMP). */
int idg_num_threads(void);

/* out = act(x) over N elements (out may equal x), on nthr threads (1: serial). */
int idg_activation_forward_f32(const float *x, long N, int act, double slope, float *out,
                               int nthr);
int idg_activation_forward_f64(const double *x, long N, int act, double slope,
                               double *out, int nthr);

/* out = dy * act'(x) over N elements, on nthr threads. */
int idg_activation_backward_f32(const float *dy, const float *x, long N, int act,
                                double slope, float *out, int nthr);
int idg_activation_backward_f64(const double *dy, const double *x, long N, int act,
                                double slope, double *out, int nthr);

/* Epilogue of a dense layer after the GEMM.  pre == NULL: out holds x @ w.T and
 * becomes act(out + b).  pre != NULL: pre holds x @ w.T and becomes pre + b, out
 * becomes act(pre).  b may be NULL (no bias).  On nthr threads. */
int idg_dense_epilogue_f32(float *out, float *pre, const float *b, long B, long n,
                           int act, double slope, int nthr);
int idg_dense_epilogue_f64(double *out, double *pre, const double *b, long B, long n,
                           int act, double slope, int nthr);

/* out[j] = sum_i x[i, j] (float64 accumulation). */
int idg_colsum_f32(const float *x, long B, long n, float *out);
int idg_colsum_f64(const double *x, long B, long n, double *out);

/* Training-mode BatchNorm (+ activation) in column blocks of width blk, on nthr
 * threads (1: serial). */
int idg_batchnorm_forward_f32(const float *x, const float *gamma, const float *beta,
                              long B, long n, double eps, int act, double slope,
                              float *out, float *mean, float *invstd, long blk,
                              int nthr);
int idg_batchnorm_forward_f64(const double *x, const double *gamma, const double *beta,
                              long B, long n, double eps, int act, double slope,
                              double *out, double *mean, double *invstd, long blk,
                              int nthr);

/* BatchNorm (+ activation) backward; beta may be NULL (zero). */
int idg_batchnorm_backward_f32(const float *dy, const float *x, const float *mean,
                               const float *invstd, const float *gamma,
                               const float *beta, long B, long n, int act,
                               double slope, float *dx, float *dgamma, float *dbeta,
                               long blk, int nthr);
int idg_batchnorm_backward_f64(const double *dy, const double *x, const double *mean,
                               const double *invstd, const double *gamma,
                               const double *beta, long B, long n, int act,
                               double slope, double *dx, double *dgamma,
                               double *dbeta, long blk, int nthr);

/* LayerNorm over the n features of each row (+ activation), rows in chunks of 64 on
 * nthr threads; gamma / beta may be NULL (1 / 0), beta only with gamma. */
int idg_layernorm_forward_f32(const float *x, const float *gamma, const float *beta,
                              long B, long n, double eps, int act, double slope,
                              float *out, float *mean, float *invstd, int nthr);
int idg_layernorm_forward_f64(const double *x, const double *gamma, const double *beta,
                              long B, long n, double eps, int act, double slope,
                              double *out, double *mean, double *invstd, int nthr);

/* LayerNorm (+ activation) backward; gamma NULL: no dgamma / dbeta (they, part and
 * acc may be NULL); else part: 2 n ceil(B / 64) elements, acc: 2 n doubles. */
int idg_layernorm_backward_f32(const float *dy, const float *x, const float *mean,
                               const float *invstd, const float *gamma,
                               const float *beta, long B, long n, int act,
                               double slope, float *dx, float *dgamma, float *dbeta,
                               float *part, double *acc, int nthr);
int idg_layernorm_backward_f64(const double *dy, const double *x, const double *mean,
                               const double *invstd, const double *gamma,
                               const double *beta, long B, long n, int act,
                               double slope, double *dx, double *dgamma,
                               double *dbeta, double *part, double *acc, int nthr);

/* Per-column mean, biased variance, fraction <= 0, fraction == 0 (one pass), in
 * column blocks of width blk (<= 1024) on nthr threads. */
int idg_column_stats_f32(const float *x, long B, long n, double *mean, double *var,
                         double *frac_le0, double *frac_eq0, long blk, int nthr);
int idg_column_stats_f64(const double *x, long B, long n, double *mean, double *var,
                         double *frac_le0, double *frac_eq0, long blk, int nthr);

/* The 8 summary numbers of initdiag.kernels.stats.SUMMARY_FIELDS (one pass);
 * blk, nthr as for idg_column_stats. */
int idg_layer_summary_f32(const float *x, long B, long n, double *out, long blk,
                          int nthr);
int idg_layer_summary_f64(const double *x, long B, long n, double *out, long blk,
                          int nthr);

/* Mean cosine between distinct rows; scratch holds 2 B doubles; nthr threads. */
int idg_row_correlation_f32(const float *x, long B, long n, double *scratch,
                            double *out, int nthr);
int idg_row_correlation_f64(const double *x, long B, long n, double *scratch,
                            double *out, int nthr);

/* Residual add out = skip + scale * x over N elements (skip NULL: out = scale * x),
 * and inverted-dropout masking out = x * (mask ? scale : 0) (mask: N bytes, nonzero
 * = kept), in the element type with scale rounded to it; out may equal skip or x;
 * on nthr threads (1: serial).  csrc/residual_tmpl.inc. */
int idg_residual_add_f32(const float *skip, const float *x, long N, double scale,
                         float *out, int nthr);
int idg_residual_add_f64(const double *skip, const double *x, long N, double scale,
                         double *out, int nthr);
int idg_masked_scale_f32(const float *x, const unsigned char *mask, long N,
                         double scale, float *out, int nthr);
int idg_masked_scale_f64(const double *x, const unsigned char *mask, long N,
                         double scale, double *out, int nthr);

/* Optimizer updates in place over N elements, on nthr threads (1: serial); every
 * double argument is rounded to the element type first.  SGD: mode 0 plain, 1
 * momentum, 2 Nesterov (v may be NULL in mode 0).  Adam: wd_mode 0 none, 1 L2
 * (Adam), 2 decoupled (AdamW, p *= decay first); step_size = lr / (1 - beta1^t),
 * bc2_sqrt = sqrt(1 - beta2^t).  csrc/optim_tmpl.inc, initdiag/kernels/optim.py. */
int idg_sgd_update_f32(float *p, const float *g, float *v, long N, double lr,
                       double momentum, double weight_decay, int mode, int nthr);
int idg_sgd_update_f64(double *p, const double *g, double *v, long N, double lr,
                       double momentum, double weight_decay, int mode, int nthr);
int idg_adam_update_f32(float *p, const float *g, float *m, float *v, long N,
                        double one_m_beta1, double beta2, double one_m_beta2,
                        double eps, double weight_decay, double decay,
                        double step_size, double bc2_sqrt, int wd_mode, int nthr);
int idg_adam_update_f64(double *p, const double *g, double *m, double *v, long N,
                        double one_m_beta1, double beta2, double one_m_beta2,
                        double eps, double weight_decay, double decay,
                        double step_size, double bc2_sqrt, int wd_mode, int nthr);

/* Loss heads over (B, n) / (B, C) rows, rows in parallel on nthr threads: the mean
 * squared error loss[0] = mean((y - t)^2) with grad = 2 (y - t) / (B n), and the
 * softmax cross-entropy out[0] = mean loss, out[1] = correct rows, grad =
 * (softmax(z) - onehot(labels)) / B; labels in [0, C) (int64); rows is scratch:
 * B doubles (mse), 2 B doubles (softmax).  csrc/optim_tmpl.inc,
 * initdiag/kernels/loss.py. */
int idg_mse_loss_grad_f32(const float *y, const float *t, long B, long n, float *grad,
                          double *rows, double *loss, int nthr);
int idg_mse_loss_grad_f64(const double *y, const double *t, long B, long n,
                          double *grad, double *rows, double *loss, int nthr);
int idg_softmax_xent_grad_f32(const float *z, const long long *labels, long B, long C,
                              float *grad, double *rows, double *out, int nthr);
int idg_softmax_xent_grad_f64(const double *z, const long long *labels, long B,
                              long C, double *grad, double *rows, double *out,
                              int nthr);
