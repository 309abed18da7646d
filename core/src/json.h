// A minimal JSON reader for the formats the core reads back: safetensors headers, metrics.jsonl,
// .jsonl text corpora. Objects keep key order; numbers are doubles.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace pithtrain {

struct JsonValue {
  enum class Type { Null, Bool, Number, String, Array, Object } type = Type::Null;
  bool boolean = false;
  double number = 0;
  std::string text;
  std::vector<JsonValue> items;                              // Array
  std::vector<std::pair<std::string, JsonValue>> members;    // Object, in file order

  // The member `key` of an object, or nullptr.
  const JsonValue* find(const std::string& key) const;
};

// Parses one JSON document; throws Error("<where>: <what> at offset N") on malformed input.
JsonValue parse_json(const std::string& text, const std::string& where);

// Escapes a string for embedding in JSON output (quotes included).
std::string json_quote(const std::string& text);

}  // namespace pithtrain
