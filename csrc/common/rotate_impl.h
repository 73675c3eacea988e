// Device-independent drivers of the orthogonal-family rotation ops (OFT, BOFT):
//   block_diag_rotate(x, rot)          y = x @ blockdiag(rot)
//   butterfly_rotate(x, rot, perm)     y = x @ M_0 @ ... @ M_(m-1),  M_i = P_i blockdiag(rot[i]) P_i^T
// and their backward ops. Here: argument checks, flattening x to [N, d], allocation and the empty
// cases. block_diag_rotate is the butterfly with one factor and no permutation, so a backend
// implements one engine:
//   using Guard;                                   // device guard from an at::Device
//   void rotate_forward(x, rot, perm, y);          // x, y [N, d] (stride(1) == 1), rot [m, n, b, b]
//                                                  // contiguous, perm [m, d] int64 or undefined
//   void rotate_backward(gy, x, rot, perm, gx, grot_acc);
//                                                  // gx [N, d] or undefined (not wanted); grot_acc
//                                                  // [m, n, b, b] op-math zeros or undefined
// N > 0 and d > 0 whenever a backend is called. Factor i in index-map form (perm row p = perm[i]):
//   u[..., p[j]] = z[..., j];  v = block_diag_rotate(u, rot[i]);  z'[..., j] = v[..., p[j]].
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Device.h>

#include <tuple>

#include "common/checks.h"

namespace fastpeft {

struct RotateShape {
  int64_t d = 0, m = 0, n = 0, b = 0;
};

// rot4: [m, n, b, b]; `rot_name` names it in messages.
inline RotateShape check_rotate_args(const at::Tensor& x, const at::Tensor& rot4, const char* rot_name) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 1, "fastpeft: 'x' must have at least one dimension (its last is the feature dim d)");
  check_same_dtype(rot4, x, rot_name, "x");
  check_same_device(rot4, x, rot_name, "x");
  RotateShape s;
  s.d = x.size(-1);
  s.m = rot4.size(0);
  s.n = rot4.size(1);
  s.b = rot4.size(2);
  TORCH_CHECK(rot4.size(3) == s.b, "fastpeft: the blocks of '", rot_name, "' must be square, got shape ",
              rot4.sizes());
  TORCH_CHECK(s.n >= 1, "fastpeft: '", rot_name, "' must hold at least one block, got shape ", rot4.sizes());
  if (s.b == 0) {
    TORCH_CHECK(s.d == 0, "fastpeft: '", rot_name, "' has 0x0 blocks but 'x' has ", s.d, " features");
  } else if (s.n == 1) {
    TORCH_CHECK(s.d % s.b == 0, "fastpeft: 'x' has ", s.d, " features, not a multiple of the block size ", s.b,
                " of the shared block in '", rot_name, "' (shape ", rot4.sizes(), ")");
  } else {
    TORCH_CHECK(s.n * s.b == s.d, "fastpeft: '", rot_name, "' has ", s.n, " blocks of size ", s.b, " (shape ",
                rot4.sizes(), ") but 'x' has ", s.d, " features: n * b must equal d (or n == 1, one shared block)");
  }
  return s;
}

inline void check_perm(const at::Tensor& perm, const at::Tensor& x, const RotateShape& s) {
  TORCH_CHECK(perm.scalar_type() == at::kLong, "fastpeft: 'perm' must be int64, got ", perm.scalar_type());
  check_same_device(perm, x, "perm", "x");
  check_dim(perm, 2, "perm");
  TORCH_CHECK(perm.size(0) == s.m && perm.size(1) == s.d, "fastpeft: 'perm' must be [m, d] = [", s.m, ", ", s.d,
              "] (one permutation of the d features per factor of 'rot'), got shape ", perm.sizes());
}

inline void check_grad_y(const at::Tensor& grad_y, const at::Tensor& x) {
  check_same_dtype(grad_y, x, "grad_y", "x");
  check_same_device(grad_y, x, "grad_y", "x");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "fastpeft: 'grad_y' has shape ", grad_y.sizes(), " but 'x' has shape ",
              x.sizes(), " (the output has x's shape)");
}

// x viewed [N, d] with unit column stride (a copy only when needed).
inline at::Tensor rotate_rows(const at::Tensor& x, int64_t d) {
  at::Tensor x2 = x.reshape({-1, d});
  if (x2.size(0) > 0 && x2.stride(1) != 1) x2 = x2.contiguous();
  return x2;
}

inline at::ScalarType rotate_op_math(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <class BK>
at::Tensor rotate_forward_impl(const at::Tensor& x, const at::Tensor& rot4, const at::Tensor& perm, const char* rot_name) {
  const RotateShape s = check_rotate_args(x, rot4, rot_name);
  if (perm.defined()) check_perm(perm, x, s);
  typename BK::Guard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const at::Tensor x2 = rotate_rows(x, s.d);
  at::Tensor y2 = y.view({-1, s.d});
  BK::rotate_forward(x2, rot4.contiguous(), perm.defined() ? perm.contiguous() : perm, y2);
  return y;
}

template <class BK>
std::tuple<at::Tensor, at::Tensor> rotate_backward_impl(const at::Tensor& grad_y, const at::Tensor& x,
                                                        const at::Tensor& rot4, const at::Tensor& perm,
                                                        bool need_grad_x, bool need_grad_rot, const char* rot_name,
                                                        at::IntArrayRef rot_shape) {
  const RotateShape s = check_rotate_args(x, rot4, rot_name);
  if (perm.defined()) check_perm(perm, x, s);
  check_grad_y(grad_y, x);
  typename BK::Guard guard(x.device());
  // A fresh [0] tensor per output not asked for: outputs of one op must not alias each other.
  at::Tensor gx = need_grad_x ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                              : at::empty({0}, x.options());
  at::Tensor acc = need_grad_rot ? at::zeros(rot4.sizes(), rot4.options().dtype(rotate_op_math(x.scalar_type())))
                                 : at::Tensor();
  const int64_t N = s.d == 0 ? 0 : x.numel() / s.d;
  if (N == 0 || s.d == 0) {
    if (need_grad_x) gx.zero_();
  } else if (need_grad_x || need_grad_rot) {
    at::Tensor gx2 = need_grad_x ? gx.view({-1, s.d}) : at::Tensor();
    BK::rotate_backward(rotate_rows(grad_y, s.d), rotate_rows(x, s.d), rot4.contiguous(),
                        perm.defined() ? perm.contiguous() : perm, gx2, acc);
  }
  at::Tensor grot = need_grad_rot ? acc.to(x.scalar_type()).view(rot_shape) : at::empty({0}, x.options());
  return {gx, grot};
}

template <class BK>
at::Tensor block_diag_rotate_impl(const at::Tensor& x, const at::Tensor& rot) {
  check_dim(rot, 3, "rot");
  return rotate_forward_impl<BK>(x, rot.unsqueeze(0), at::Tensor(), "rot");
}

template <class BK>
std::tuple<at::Tensor, at::Tensor> block_diag_rotate_backward_impl(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const at::Tensor& rot, bool need_grad_x,
                                                                   bool need_grad_rot) {
  check_dim(rot, 3, "rot");
  return rotate_backward_impl<BK>(grad_y, x, rot.unsqueeze(0), at::Tensor(), need_grad_x, need_grad_rot, "rot",
                                  rot.sizes());
}

template <class BK>
at::Tensor butterfly_rotate_impl(const at::Tensor& x, const at::Tensor& rot, const at::Tensor& perm) {
  check_dim(rot, 4, "rot");
  TORCH_CHECK(rot.size(0) >= 1, "fastpeft: 'rot' must hold at least one butterfly factor, got shape ", rot.sizes());
  return rotate_forward_impl<BK>(x, rot, perm, "rot");
}

template <class BK>
std::tuple<at::Tensor, at::Tensor> butterfly_rotate_backward_impl(const at::Tensor& grad_y, const at::Tensor& x,
                                                                  const at::Tensor& rot, const at::Tensor& perm,
                                                                  bool need_grad_x, bool need_grad_rot) {
  check_dim(rot, 4, "rot");
  TORCH_CHECK(rot.size(0) >= 1, "fastpeft: 'rot' must hold at least one butterfly factor, got shape ", rot.sizes());
  return rotate_backward_impl<BK>(grad_y, x, rot, perm, need_grad_x, need_grad_rot, "rot", rot.sizes());
}

}  // namespace fastpeft
