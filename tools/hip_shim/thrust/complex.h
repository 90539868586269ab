// Stand-in for rocThrust's thrust/complex.h, which torch's c10/util/complex*.h include under
// __HIPCC__ and Debian does not package (a ROCm install has it). c10 names these in inline
// templates that the kernels never instantiate (they do no complex arithmetic), so declarations
// are enough: were one instantiated, the check would fail to link-free compile loudly, not pass
// silently. Compile check only (tools/compile_hip.py).
#pragma once

#include <hip/hip_runtime.h>

namespace thrust {

template <typename T>
struct complex {
  T re{}, im{};
  __host__ __device__ complex(T r = T(), T i = T()) : re(r), im(i) {}
  template <typename U>
  __host__ __device__ explicit complex(const complex<U>& o) : re(T(o.real())), im(T(o.imag())) {}
  __host__ __device__ T real() const { return re; }
  __host__ __device__ T imag() const { return im; }
};

template <typename T>
__host__ __device__ complex<T> polar(const T& r, const T& theta = T());
template <typename T>
__host__ __device__ T abs(const complex<T>& z);
template <typename T, typename U>
__host__ __device__ complex<T> pow(const complex<T>& x, const complex<U>& y);
template <typename T, typename U>
__host__ __device__ complex<T> pow(const complex<T>& x, const U& y);
template <typename T, typename U>
__host__ __device__ complex<U> pow(const T& x, const complex<U>& y);

#define PL_THRUST_UNARY(name) \
  template <typename T>       \
  __host__ __device__ complex<T> name(const complex<T>& z);
PL_THRUST_UNARY(exp)
PL_THRUST_UNARY(log)
PL_THRUST_UNARY(log10)
PL_THRUST_UNARY(sqrt)
PL_THRUST_UNARY(sin)
PL_THRUST_UNARY(cos)
PL_THRUST_UNARY(tan)
PL_THRUST_UNARY(asin)
PL_THRUST_UNARY(acos)
PL_THRUST_UNARY(atan)
PL_THRUST_UNARY(sinh)
PL_THRUST_UNARY(cosh)
PL_THRUST_UNARY(tanh)
PL_THRUST_UNARY(asinh)
PL_THRUST_UNARY(acosh)
PL_THRUST_UNARY(atanh)
PL_THRUST_UNARY(proj)
#undef PL_THRUST_UNARY

}  // namespace thrust
