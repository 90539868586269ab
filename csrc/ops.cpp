// Operator schemas of the pareto_lora library.
// Backends register implementations with TORCH_LIBRARY_IMPL (cpu/ops_cpu.cpp, cuda/*.cu);
// fake (meta) implementations for torch.compile live in python/pareto_lora/backends/cpp.py.
// integrate returns (stats [S, 3], group_stats [G, 3], coeffs [G, 2], cases [G]); its optional
// groups / poison / stats make it one training step (python/pareto_lora/backends/protocol.py).
// `params` are the rule's parameters in the order of rule.h kParamNames (rules.KERNEL_PARAMS):
// a new rule parameter changes that table, not these schemas.
// gram / combine_many are the K-objective pair (2 <= K <= 8 buffers; gram's columns in the order of
// python/pareto_lora/multi/gram.py; kernels in cpu/multi_kernels.cpp and cuda/multi_ops.cu).
#include <torch/library.h>

TORCH_LIBRARY(pareto_lora, m) {
  m.def("segment_stats(Tensor a, Tensor b, Tensor offsets) -> Tensor");
  m.def(
      "rule_coefficients(Tensor stats, str rule, float[] params, Tensor? active=None) -> (Tensor, Tensor)");
  m.def("combine(Tensor a, Tensor b, Tensor offsets, Tensor coeffs, Tensor(a!) out) -> ()");
  m.def(
      "integrate(Tensor a, Tensor b, Tensor offsets, Tensor(a!) out, str rule, float[] params, Tensor? active=None, "
      "Tensor? groups=None, Tensor? poison=None, Tensor? stats=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gram(Tensor[] grads, Tensor offsets) -> Tensor");
  m.def("combine_many(Tensor[] grads, Tensor offsets, Tensor coeffs, Tensor(a!) out) -> ()");
}
