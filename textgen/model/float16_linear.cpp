// textgen::float16_linear: FBGEMM's float16-weight product on all of torch's threads, for the handle that
// torch's `_quantized.wrapped_fbgemm_pack_gemm_matrix_fp16` returns (textgen/model/float16_op.py says why).
//
// The handle is a uint8 tensor whose storage is a c10::intrusive_ptr<LinearPackedParamsBase> (torch's
// cpp_custom_type_hack): the same PackedLinearWeightFp16 that quantized::linear_dynamic_fp16 multiplies by,
// packed without its bias. Its apply_dynamic splits the output columns over at::get_num_threads() threads;
// torch's own op on the handle (fbgemm_linear_fp16_weight_fp32_activation) asks FBGEMM for one.
#include <ATen/core/Tensor.h>
#include <ATen/native/quantized/PackedParams.h>
#include <torch/library.h>

namespace {

at::Tensor float16_linear(const at::Tensor& x, const at::Tensor& handle,
                          const std::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "textgen::float16_linear multiplies float32 activations");
  using Handle = c10::intrusive_ptr<LinearPackedParamsBase>;
  TORCH_CHECK(handle.scalar_type() == at::kByte && handle.storage().nbytes() == sizeof(Handle),
              "textgen::float16_linear takes a handle from _quantized.wrapped_fbgemm_pack_gemm_matrix_fp16");
  auto& weight = *static_cast<Handle*>(handle.storage().mutable_data());
  at::Tensor out = weight->apply_dynamic(x.contiguous());
  TORCH_CHECK(out.size(-1) == out_features, "textgen::float16_linear: the handle's matrix has ", out.size(-1),
              " outputs, not ", out_features);
  if (bias.has_value()) out.add_(*bias);
  return out;
}

}  // namespace

TORCH_LIBRARY(textgen, m) {
  m.def("float16_linear(Tensor x, Tensor handle, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(textgen, CPU, m) { m.impl("float16_linear", float16_linear); }
