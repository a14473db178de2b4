// The feature dtypes every launcher takes, by name. Plain C++ (no CUDA or torch headers), so
// bindings.cpp and every launch declaration header can include it.
#pragma once

#include <stdexcept>
#include <string>

namespace flashcontrast {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// "float32" | "float16" | "bfloat16" (also "float", "half", "bf16"); else invalid_argument
// naming `field` (the argument or struct field the name came from).
inline DType parse_dtype(const std::string& name, const char* field = "dtype") {
  if (name == "float32" || name == "float") return DType::kFloat32;
  if (name == "float16" || name == "half") return DType::kFloat16;
  if (name == "bfloat16" || name == "bf16") return DType::kBFloat16;
  throw std::invalid_argument(std::string(field) +
                              " must be float32, float16 or bfloat16, got '" + name + "'");
}

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "?";
}

}  // namespace flashcontrast
