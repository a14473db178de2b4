// The feature dtypes every launcher takes, by name, and the name tables (EnumName) behind
// them and pair.h's Epilogue. Plain C++ (no CUDA or torch headers), so bindings.cpp and
// every launch declaration header can include it.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace flashcontrast {

// One spelling of an enum value. A table of them gives both directions: the value of a
// name (any spelling, find_enum) and the name of a value (its first row, enum_name).
template <typename E>
struct EnumName {
  E value;
  const char* name;
};

// The value `name` spells in `table`; nullptr when it spells none.
template <typename E, std::size_t N>
const E* find_enum(const EnumName<E> (&table)[N], const std::string& name) {
  for (const auto& row : table) {
    if (name == row.name) return &row.value;
  }
  return nullptr;
}

// The first spelling of `value` in `table`; "?" for a value it does not have.
template <typename E, std::size_t N>
const char* enum_name(const EnumName<E> (&table)[N], E value) {
  for (const auto& row : table) {
    if (row.value == value) return row.name;
  }
  return "?";
}

enum class DType { kFloat32, kFloat16, kBFloat16 };

// The names first (dtype_name), then the aliases parse_dtype accepts as well.
inline constexpr EnumName<DType> kDTypeNames[] = {
    {DType::kFloat32, "float32"}, {DType::kFloat16, "float16"}, {DType::kBFloat16, "bfloat16"},
    {DType::kFloat32, "float"},   {DType::kFloat16, "half"},    {DType::kBFloat16, "bf16"}};

// "float32" | "float16" | "bfloat16" (also "float", "half", "bf16"); else invalid_argument
// naming `field` (the argument or struct field the name came from).
inline DType parse_dtype(const std::string& name, const char* field = "dtype") {
  if (const DType* dtype = find_enum(kDTypeNames, name)) return *dtype;
  throw std::invalid_argument(std::string(field) +
                              " must be float32, float16 or bfloat16, got '" + name + "'");
}

inline const char* dtype_name(DType dtype) { return enum_name(kDTypeNames, dtype); }

}  // namespace flashcontrast
