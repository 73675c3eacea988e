// The one place every fastpeft op schema lives. Kernels register per backend in csrc/cpu/*.cpp and
// csrc/cuda/*.cu; Python wrappers, fakes and autograd formulas are in python/fastpeft/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fastpeft._C` loads this library so the static registrations below run. The module
// carries the build facts that fastpeft.build_info() reports.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", FASTPEFT_TORCH_VERSION);
  PyModule_AddStringConstant(m, "cuda_archs", FASTPEFT_CUDA_ARCHS);
#ifdef FASTPEFT_WITH_CUDA
  PyModule_AddIntConstant(m, "cuda_compiled", 1);
#else
  PyModule_AddIntConstant(m, "cuda_compiled", 0);
#endif
  return m;
}
}

TORCH_LIBRARY(fastpeft, m) {
  // ---- lora family -------------------------------------------------------------------------
  // Dropout with a mask regenerated from (seed, element index) by a counter-based hash: the same
  // bits on every device, never stored. Element index = row * cols + col of the logical 2-D input.
  // `seed` is a one-element int64 CPU tensor (so torch.compile can trace drawing it).
  m.def("seeded_dropout(Tensor x, float p, Tensor seed) -> Tensor");
  // y = x W^T + b + s (drop(x) A^T) B^T;  returns (y, u = drop(x) A^T).
  m.def(
      "lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, float dropout_p, Tensor seed) -> (Tensor, Tensor)");
  // Gradients through rank-r intermediates only; returns (grad_x, grad_A, grad_B). With
  // need_grad_x=False the input-gradient GEMM is skipped and grad_x is an empty [0] tensor.
  m.def(
      "lora_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor u, float scaling, float dropout_p, Tensor seed, bool need_grad_x=True) "
      "-> (Tensor, Tensor, Tensor)");
  // fp32 per-output-row norm ||W + s B A||_2 without materialising B A.
  m.def("dora_weight_norm(Tensor weight, Tensor lora_A, Tensor lora_B, float scaling) -> Tensor");
  // DoRA (peft's formula): y = x W^T + b + (m/n - 1) drop(x) W^T + (m/n) s u B^T with
  // u = drop(x) A^T and n the (detached) weight norm; returns (y, u, z = drop(x) W^T + s u B^T).
  m.def(
      "dora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, Tensor weight_norm, float scaling, float dropout_p, Tensor seed) "
      "-> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_A, grad_B, grad_magnitude); need_grad_x as in lora_backward.
  m.def(
      "dora_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, Tensor weight_norm, Tensor u, Tensor z, float scaling, float dropout_p, "
      "Tensor seed, bool need_grad_x=True) -> (Tensor, Tensor, Tensor, Tensor)");
  // Multi-adapter LoRA mix (X-LoRA; formulas in csrc/common/multi_lora_impl.h and reference.py):
  // y = base + sum_j scalings[:, j] * (x A_j^T) B_j^T over n adapters of one rank r (smaller ranks
  // zero-padded): x [T, in], lora_A [n, r, in], lora_B [n, out, r], scalings [T, n] (x's dtype or
  // float32; the per-token weight of each adapter with any per-adapter scale folded in), base
  // [T, out] or None (then 0). One shrink GEMM over all adapters, a block scaling, one expand GEMM.
  // With dropout_p > 0 each adapter sees its own seeded mask (the lora family's hash): adapter j's
  // input is drop(x) taken as rows j T .. j T + T - 1 of a virtual [n T, in] input, i.e. the masks of
  // seeded_dropout(x repeated n times along dim 0); the shrink is then one GEMM per adapter.
  // Returns (y, u = drop_j(x) A_j^T side by side [T, n r], saved for backward).
  m.def(
      "multi_lora_mix(Tensor x, Tensor lora_A, Tensor lora_B, Tensor scalings, Tensor? base, "
      "float dropout_p=0., Tensor? seed=None) -> (Tensor, Tensor)");
  // Returns (grad_x, grad_A, grad_B, grad_scalings) through [T, n r] intermediates; grad_x is an
  // empty [0] tensor unless need_grad_x, grad_A / grad_B unless need_grad_weights. grad_scalings has
  // scalings' dtype. (grad_base is grad_y.)
  m.def(
      "multi_lora_mix_backward(Tensor grad_y, Tensor x, Tensor lora_A, Tensor lora_B, Tensor scalings, "
      "Tensor u, bool need_grad_x=True, bool need_grad_weights=True, float dropout_p=0., Tensor? seed=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // Mixed-adapter batches (segmented multi-LoRA, punica SGMV/BGMV style): x [T, in], adapter k has
  // lora_A[k] [r_k, in] and lora_B[k] [out, r_k] (ranks may differ, r_k = 0 allowed), scaling
  // scalings[k]; adapter_index int64 [T] on x's device, row t uses adapter adapter_index[t], -1 = none.
  // Returns delta [T, out] in x's dtype: delta[t] = s_k (x[t] A_k^T) B_k^T, zero rows for -1.
  // Rows are grouped by adapter; work is O(sum over rows of r_k (in + out)), independent of n.
  m.def(
      "segmented_lora(Tensor x, Tensor[] lora_A, Tensor[] lora_B, float[] scalings, Tensor adapter_index) "
      "-> Tensor");

  // ---- nf4 family --------------------------------------------------------------------------
  // bitsandbytes 0.50.2's NF4 bytes (formulas in csrc/common/nf4_impl.h and reference.py).
  // w (fp32/bf16/fp16, any shape) is flattened row-major and quantised in blocks of `blocksize`
  // (a power of two in [32, 4096]); returns (packed uint8 [(n+1)//2, 1], absmax fp32 [blocks]).
  m.def("nf4_quantize(Tensor w, int blocksize) -> (Tensor, Tensor)");
  // code[q] * absmax in fp32, cast once to `dtype`; returns a tensor of `shape`.
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, int[] shape, ScalarType dtype) -> Tensor");
  // bitsandbytes' CPU 8-bit blockwise quantiser with a 256-entry codebook `code` (the
  // double-quant statistics use its signed dynamic map, blocksize 256); returns (q uint8 shaped
  // like x, absmax fp32 [blocks]).
  m.def("blockwise8_quantize(Tensor x, Tensor code, int blocksize) -> (Tensor, Tensor)");
  // code[q] * absmax in fp32, cast once to `dtype`; shaped like q.
  m.def("blockwise8_dequantize(Tensor q, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor");
  // ---- fused NF4 matmul (QLoRA base path) -------------------------------------------------
  // The NF4 weight W [out_features, in_features] (bitsandbytes' row-major packing, see above) is
  // never dequantised whole: each kernel decodes tiles of it in fp32 and rounds them to x's dtype.
  // Its quant state: `absmax` float32 [blocks]; or, double-quantised, `absmax` the uint8 codes of
  // the 8-bit step with `nested_absmax` float32 [ceil(blocks / 256)], `nested_code` float32 [256]
  // and `offset` a float32 scalar (all three given or none), the float absmax of block b being
  // nested_code[absmax[b]] * nested_absmax[b / 256] + offset.
  // y = x W^T + bias; x [N, in_features] (float32/bfloat16/float16, the compute dtype).
  m.def(
      "nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int out_features, Tensor? bias) -> Tensor");
  // grad_x = grad_y W; grad_y [N, out_features].
  m.def(
      "nf4_linear_grad_input(Tensor grad_y, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? offset, int blocksize, int in_features) -> Tensor");
  // QLoRA: lora_forward/lora_backward with the base weight in NF4 (the same outputs and saved
  // tensors: y = x W^T + b + s (drop(x) A^T) B^T, returns (y, u)).
  m.def(
      "qlora_forward(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, Tensor seed) -> (Tensor, Tensor)");
  m.def(
      "qlora_backward(Tensor grad_y, Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? offset, int blocksize, Tensor lora_A, Tensor lora_B, Tensor u, "
      "float scaling, float dropout_p, Tensor seed, bool need_grad_x=True) -> (Tensor, Tensor, Tensor)");

  // ---- kron family (LoKr) ------------------------------------------------------------------
  // y = scale x (W1 kron W2)^T, x [N, c*d], y [N, a*b], computed input-centrically (the Kronecker
  // product is never built): X = x viewed [N, c, d], T = X W2^T [N, c, b], Y = W1 T [N, a, b].
  // W1 [a, c] is w1, or w1_a [a, r1] @ w1_b [r1, c] (exactly one of the two given); W2 [b, d] is
  // w2, or w2_a [b, r2] @ w2_b [r2, d] (then T = (X w2_b^T) w2_a^T when that is cheaper).
  m.def(
      "kron_forward(Tensor x, Tensor? w1, Tensor? w1_a, Tensor? w1_b, Tensor? w2, Tensor? w2_a, "
      "Tensor? w2_b, float scale) -> Tensor");
  // Returns (grad_x, grad_1, grad_1b, grad_2, grad_2b): grad_1 is grad_w1 (w1 given) or grad_w1_a,
  // grad_1b is grad_w1_b or an empty [0] tensor; likewise for W2. T is recomputed, not saved.
  m.def(
      "kron_backward(Tensor grad_y, Tensor x, Tensor? w1, Tensor? w1_a, Tensor? w1_b, Tensor? w2, "
      "Tensor? w2_a, Tensor? w2_b, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- ia3 family (IA3) ---------------------------------------------------------------------
  // peft's IA3 Linear over a frozen base weight [out, in] and bias [out] (or none); x [N, in].
  // scale_input=True (scale [in]): y = (x * scale) W^T + b;  False (scale [out]): y = (x W^T + b) * scale.
  // scale has x's dtype or float32; the scaling is op-math, rounded once to x's dtype. Returns
  // (y, y0): y0 = x W^T + b (saved for backward) when scale_input=False, an empty [0] tensor otherwise.
  m.def("ia3_forward(Tensor x, Tensor weight, Tensor? bias, Tensor scale, bool scale_input) -> (Tensor, Tensor)");
  // `saved` is x (scale_input=True) or y0 (False). Returns (grad_x, grad_scale, grad_bias): grad_x an
  // empty [0] tensor unless need_grad_x, grad_bias one unless need_grad_bias; grad_scale in scale's
  // dtype (op-math sums). The weight gets no gradient.
  m.def(
      "ia3_backward(Tensor grad_y, Tensor saved, Tensor weight, Tensor scale, bool scale_input, "
      "bool need_grad_x=True, bool need_grad_bias=False) -> (Tensor, Tensor, Tensor)");

  // ---- hadamard family (LoHa) --------------------------------------------------------------
  // dW = scale (w1_a w1_b) * (w2_a w2_b)   (w1_a [out, r1], w1_b [r1, in], w2_a [out, r2],
  // w2_b [r2, in]), both products and the elementwise product in one fused pass.
  m.def("hadamard_delta(Tensor w1_a, Tensor w1_b, Tensor w2_a, Tensor w2_b, float scale) -> Tensor");
  // Gradients of the four factors from grad [out, in]; the two products are recomputed.
  m.def(
      "hadamard_delta_backward(Tensor grad, Tensor w1_a, Tensor w1_b, Tensor w2_a, Tensor w2_b, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // y = x dW^T, x [N, in]. strategy: 0 = pick the cheaper per shape, 1 = materialise dW (fused)
  // then one GEMM, 2 = face-splitting: y = (x (w1_b^T . w2_b^T)) (scale w1_a . w2_a)^T with '.'
  // the row-wise Kronecker product ([in, r1 r2] and [out, r1 r2]), O(N d r1 r2).
  m.def(
      "hadamard_linear_forward(Tensor x, Tensor w1_a, Tensor w1_b, Tensor w2_a, Tensor w2_b, "
      "float scale, int strategy=0) -> Tensor");
  // Returns (grad_x, grad_w1_a, grad_w1_b, grad_w2_a, grad_w2_b); everything recomputed from x and
  // the factors (dW or the [N, r1 r2] projection), nothing saved but those.
  m.def(
      "hadamard_linear_backward(Tensor grad_y, Tensor x, Tensor w1_a, Tensor w1_b, Tensor w2_a, "
      "Tensor w2_b, float scale, int strategy=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- cayley family (OFT, BOFT) -----------------------------------------------------------
  // Batched Cayley transform of square blocks skew [n, b, b] -> R [n, b, b] (formulas in
  // csrc/common/cayley_impl.h and reference.py): num_neumann_terms = 0 is the exact
  // R = (I - S)(I + S)^-1, k >= 1 peft OFT's truncated Neumann polynomial. Op-math float32
  // (float64 for float64), rounded once.
  m.def("cayley(Tensor skew, int num_neumann_terms=0) -> Tensor");
  // dL/dskew from grad_r = dL/dR; r is cayley's output (the exact form's backward rebuilds
  // (I + S)^-1 = (R + I) / 2 from it when it holds op-math values, else from skew).
  m.def("cayley_backward(Tensor grad_r, Tensor skew, Tensor r, int num_neumann_terms=0) -> Tensor");

  // ---- rotation family (OFT, BOFT) ---------------------------------------------------------
  // y = x @ blockdiag(rot): x [..., d], rot [n, b, b] with n * b == d, or n == 1 (one block shared by
  // all d / b slices); y[..., k b + c] = sum_j x[..., k b + j] rot[k, j, c]. The dense [d, d] matrix
  // is never built; sums are op-math (fp32; fp64 for fp64), rounded once.
  m.def("block_diag_rotate(Tensor x, Tensor rot) -> Tensor");
  // Returns (grad_x, grad_rot); grad_rot sums over tokens (and over the slices of a shared block)
  // in op-math and rounds once. An output not asked for (need_grad_x / need_grad_rot False) is
  // not computed and comes back as an empty [0] tensor.
  m.def(
      "block_diag_rotate_backward(Tensor grad_y, Tensor x, Tensor rot, bool need_grad_x=True, "
      "bool need_grad_rot=True) -> (Tensor, Tensor)");
  // y = x @ M_0 @ ... @ M_(m-1), M_i = P_i blockdiag(rot[i]) P_i^T, P_i[j, perm[i, j]] = 1:
  // x [..., d], rot [m, n, b, b] (n * b == d or n == 1), perm int64 [m, d] (each row a permutation of
  // 0..d-1, on x's device). The permutations are index maps (consecutive ones composed), never
  // matrices: O(m d b) work per token. Each factor's output is held in x's dtype, or in fp32 where
  // the kernel computes from fp32 (fp16; bf16 without the CPU's bf16 dot products, or odd b).
  m.def("butterfly_rotate(Tensor x, Tensor rot, Tensor perm) -> Tensor");
  // Returns (grad_x, grad_rot) as block_diag_rotate_backward; saves nothing: the factor inputs are
  // recomputed from x.
  m.def(
      "butterfly_rotate_backward(Tensor grad_y, Tensor x, Tensor rot, Tensor perm, bool need_grad_x=True, "
      "bool need_grad_rot=True) -> (Tensor, Tensor)");
}
