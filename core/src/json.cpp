// A small recursive-descent JSON parser (RFC 8259, with \uXXXX escapes decoded to UTF-8).
#include "json.h"

#include <cstdlib>

#include "pithtrain/error.h"

namespace pithtrain {
namespace {

class Parser {
 public:
  Parser(const std::string& text, const std::string& where) : text_(text), where_(where) {}

  JsonValue document() {
    JsonValue value = parse_value();
    skip_space();
    if (position_ != text_.size()) fail("trailing characters");
    return value;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw Error(where_ + ": malformed JSON (" + what + ") at offset " + std::to_string(position_));
  }
  void skip_space() {
    while (position_ < text_.size() && (text_[position_] == ' ' || text_[position_] == '\n' ||
                                        text_[position_] == '\r' || text_[position_] == '\t'))
      ++position_;
  }
  char peek() {
    skip_space();
    if (position_ >= text_.size()) fail("unexpected end");
    return text_[position_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++position_;
  }
  bool consume_word(const char* word) {
    size_t length = std::char_traits<char>::length(word);
    if (text_.compare(position_, length, word) != 0) return false;
    position_ += length;
    return true;
  }

  JsonValue parse_value() {
    JsonValue value;
    char c = peek();
    if (c == '{') {
      value.type = JsonValue::Type::Object;
      ++position_;
      if (peek() == '}') return ++position_, value;
      while (true) {
        if (peek() != '"') fail("expected a key");
        std::string key = parse_string();
        expect(':');
        value.members.emplace_back(key, parse_value());
        if (peek() == ',') { ++position_; continue; }
        expect('}');
        return value;
      }
    }
    if (c == '[') {
      value.type = JsonValue::Type::Array;
      ++position_;
      if (peek() == ']') return ++position_, value;
      while (true) {
        value.items.push_back(parse_value());
        if (peek() == ',') { ++position_; continue; }
        expect(']');
        return value;
      }
    }
    if (c == '"') {
      value.type = JsonValue::Type::String;
      value.text = parse_string();
      return value;
    }
    if (consume_word("true")) { value.type = JsonValue::Type::Bool; value.boolean = true; return value; }
    if (consume_word("false")) { value.type = JsonValue::Type::Bool; return value; }
    if (consume_word("null")) return value;
    const char* start = text_.c_str() + position_;
    char* end = nullptr;
    value.number = std::strtod(start, &end);
    if (end == start) fail("unexpected character");
    position_ += static_cast<size_t>(end - start);
    value.type = JsonValue::Type::Number;
    return value;
  }

  static void append_utf8(std::string& out, uint32_t code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  uint32_t parse_hex4() {
    if (position_ + 4 > text_.size()) fail("short \\u escape");
    uint32_t code = static_cast<uint32_t>(std::strtoul(text_.substr(position_, 4).c_str(), nullptr, 16));
    position_ += 4;
    return code;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    while (true) {
      if (position_ >= text_.size()) fail("unterminated string");
      char c = text_[position_++];
      if (c == '"') return out;
      if (c != '\\') { out += c; continue; }
      if (position_ >= text_.size()) fail("unterminated escape");
      char escape = text_[position_++];
      switch (escape) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t code = parse_hex4();
          if (code >= 0xD800 && code < 0xDC00 && text_.compare(position_, 2, "\\u") == 0) {
            position_ += 2;
            uint32_t low = parse_hex4();
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, code);
          break;
        }
        default: fail("bad escape");
      }
    }
  }

  const std::string& text_;
  const std::string& where_;
  size_t position_ = 0;
};

}  // namespace

const JsonValue* JsonValue::find(const std::string& key) const {
  for (const auto& [name, value] : members)
    if (name == key) return &value;
  return nullptr;
}

JsonValue parse_json(const std::string& text, const std::string& where) { return Parser(text, where).document(); }

std::string json_quote(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') out += '\\', out += static_cast<char>(c);
    else if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20) {
      char buffer[8];
      std::snprintf(buffer, sizeof(buffer), "\\u%04x", c);
      out += buffer;
    } else out += static_cast<char>(c);
  }
  return out + "\"";
}

}  // namespace pithtrain
