// Options: TOML++ behind a small typed reader that records every key read, so unknown keys can be named.
#include "pithtrain/options.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include <toml++/toml.h>

#include "pithtrain/error.h"

namespace pithtrain {

struct Options::State {
  toml::table root;                 // what the file and --set overrides say
  toml::table resolved;             // every value read, defaults included
  std::set<std::string> read_keys;  // dotted paths asked for by some reader
  std::map<std::string, std::string> override_keys;  // dotted path -> "--set" for values set on the CLI
  std::string source;               // the file name, for messages
};

namespace {

std::string join(const std::string& prefix, const std::string& key) {
  return prefix.empty() ? key : prefix + "." + key;
}

std::vector<std::string> split_dotted(const std::string& path) {
  std::vector<std::string> parts;
  std::stringstream stream(path);
  std::string part;
  while (std::getline(stream, part, '.')) parts.push_back(part);
  return parts;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// The shortest text that reads back as `value` (0.003, not 0.0030000000000000001); "nan", "inf", "-inf".
std::string number_text(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[32];
  for (int digits = 15; digits <= 17; ++digits) {
    std::snprintf(buffer, sizeof(buffer), "%.*g", digits, value);
    if (std::strtod(buffer, nullptr) == value) break;
  }
  return buffer;
}

const char* type_name(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a number";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::table: return "a table";
    case toml::node_type::array: return "an array";
    default: return "a date/time";
  }
}

// Inserts `value` at dotted `path` in `table`, creating intermediate tables.
void insert_at(toml::table& table, const std::string& path, toml::node&& value) {
  auto parts = split_dotted(path);
  toml::table* current = &table;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    auto* next = current->get(parts[i]);
    if (next == nullptr) {
      current->insert(parts[i], toml::table{});
      next = current->get(parts[i]);
    }
    if (!next->is_table()) throw Error("cannot set '" + path + "': '" + parts[i] + "' is not a table");
    current = next->as_table();
  }
  current->insert_or_assign(parts.back(), std::move(value));
}

}  // namespace

Range Range::at_least(double lower) { return {Bound::closed, Bound::absent, lower, 0}; }
Range Range::above(double lower) { return {Bound::open, Bound::absent, lower, 0}; }
Range Range::at_most(double upper) { return {Bound::absent, Bound::closed, 0, upper}; }
Range Range::below(double upper) { return {Bound::absent, Bound::open, 0, upper}; }
Range Range::closed(double lower, double upper) { return {Bound::closed, Bound::closed, lower, upper}; }
Range Range::half_open(double lower, double upper) { return {Bound::closed, Bound::open, lower, upper}; }
Range Range::open(double lower, double upper) { return {Bound::open, Bound::open, lower, upper}; }
Range Range::left_open(double lower, double upper) { return {Bound::open, Bound::closed, lower, upper}; }

bool Range::contains(double value) const {
  if (std::isnan(value)) return false;
  if (lower_bound == Bound::closed && !(value >= lower)) return false;
  if (lower_bound == Bound::open && !(value > lower)) return false;
  if (upper_bound == Bound::closed && !(value <= upper)) return false;
  if (upper_bound == Bound::open && !(value < upper)) return false;
  return true;
}

std::string Range::text() const {
  if (lower_bound == Bound::absent && upper_bound == Bound::absent) return "any number";
  if (upper_bound == Bound::absent) return (lower_bound == Bound::closed ? ">= " : "> ") + number_text(lower);
  if (lower_bound == Bound::absent) return (upper_bound == Bound::closed ? "<= " : "< ") + number_text(upper);
  return std::string("in ") + (lower_bound == Bound::closed ? "[" : "(") + number_text(lower) + ", " +
         number_text(upper) + (upper_bound == Bound::closed ? "]" : ")");
}

Options::Options(std::shared_ptr<State> state, std::string path)
    : state_(std::move(state)), path_(std::move(path)) {}

Options Options::from_string(const std::string& text, const std::string& source_name) {
  auto state = std::make_shared<State>();
  state->source = source_name;
  try {
    state->root = toml::parse(text, source_name);
  } catch (const toml::parse_error& error) {
    std::ostringstream message;
    message << source_name << ":" << error.source().begin.line << ":" << error.source().begin.column
            << ": TOML syntax error: " << error.description();
    throw Error(message.str());
  }
  return Options(state, "");
}

Options Options::from_file(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw Error("cannot read config file '" + path + "': no such file or not readable");
  std::stringstream buffer;
  buffer << file.rdbuf();
  return from_string(buffer.str(), path);
}

void Options::set_override(const std::string& assignment) {
  auto equals = assignment.find('=');
  if (equals == std::string::npos || equals == 0)
    throw Error("--set '" + assignment + "': expected dotted.key=value, e.g. --set train.steps=100");
  std::string key = assignment.substr(0, equals);
  std::string value_text = assignment.substr(equals + 1);
  std::string full_key = join(path_, key);
  try {
    toml::table parsed = toml::parse("value = " + value_text);
    insert_at(state_->root, full_key, std::move(*parsed.get("value")));
  } catch (const toml::parse_error&) {
    insert_at(state_->root, full_key, toml::value<std::string>(value_text));
  }
  state_->override_keys[full_key] = "--set " + assignment;
}

namespace {

const toml::node* find_node(const toml::table& root, const std::string& full_key) {
  toml::node_view<const toml::node> view{root};
  for (const auto& part : split_dotted(full_key)) view = view[part];
  return view.node();
}

}  // namespace

bool Options::has(const std::string& key) const {
  return find_node(state_->root, join(path_, key)) != nullptr;
}

std::string Options::where(const std::string& key) const {
  std::string full_key = join(path_, key);
  auto override_entry = state_->override_keys.find(full_key);
  if (override_entry != state_->override_keys.end()) return override_entry->second;
  const toml::node* node = find_node(state_->root, full_key);
  if (node != nullptr && node->source().begin.line > 0)
    return state_->source + ":" + std::to_string(node->source().begin.line);
  return state_->source;
}

const std::string& Options::path() const { return path_; }
const std::string& Options::source() const { return state_->source; }

Options Options::table(const std::string& key) const {
  std::string full_key = join(path_, key);
  const toml::node* node = find_node(state_->root, full_key);
  if (node != nullptr && !node->is_table())
    throw Error(where(key) + ": '" + full_key + "' must be a table, got " + type_name(*node));
  return Options(state_, full_key);
}

namespace {

bool has_read_key_below(const std::set<std::string>& read_keys, const std::string& full_key) {
  auto lower = read_keys.lower_bound(full_key + ".");
  return lower != read_keys.end() && lower->rfind(full_key + ".", 0) == 0;
}

// Whether `distance` edits make `name` a likely misspelling: the rule behind every "did you mean".
bool spelled_close(const std::string& name, size_t distance) {
  return distance <= std::max<size_t>(2, name.size() / 3);
}

// The names valid in the table `parent` so far: every key read there and every sub-table holding read keys.
std::vector<std::string> valid_names(const std::set<std::string>& read_keys, const std::string& parent) {
  std::vector<std::string> names;
  for (const auto& key : read_keys) {
    auto key_dot = key.rfind('.');
    std::string key_parent = key_dot == std::string::npos ? "" : key.substr(0, key_dot);
    if (key_parent == parent) names.push_back(key.substr(key_dot == std::string::npos ? 0 : key_dot + 1));
    if (key.rfind(join(parent, ""), 0) == 0 || parent.empty()) {
      std::string rest = parent.empty() ? key : key.substr(parent.size() + 1);
      auto rest_dot = rest.find('.');
      if (rest_dot != std::string::npos) names.push_back(rest.substr(0, rest_dot));
    }
  }
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return names;
}

// "<location>: unknown key '<unknown>' (not read by <owner>); did you mean '<parent>.<suggestion>'?", the
// suggestion being the nearest valid name when `suggestion` is empty (and only if spelled close); with
// `list_valid`, followed by the valid names of that table.
std::string unknown_key_message(const std::set<std::string>& read_keys, const std::string& unknown,
                                const std::string& location, const std::string& owner, std::string suggestion,
                                bool list_valid) {
  auto dot = unknown.rfind('.');
  std::string parent = dot == std::string::npos ? "" : unknown.substr(0, dot);
  std::string leaf = dot == std::string::npos ? unknown : unknown.substr(dot + 1);
  std::vector<std::string> siblings = valid_names(read_keys, parent);
  if (suggestion.empty()) {
    size_t best = std::string::npos;
    for (const auto& sibling : siblings) {
      size_t distance = edit_distance(leaf, sibling);
      if (distance < best && spelled_close(leaf, distance)) best = distance, suggestion = sibling;
    }
  }
  std::ostringstream message;
  message << location << ": unknown key '" << unknown << "' (not read by " << owner << ")";
  if (!suggestion.empty()) message << "; did you mean '" << join(parent, suggestion) << "'?";
  if (list_valid && !siblings.empty()) {
    message << " Valid keys in " << (parent.empty() ? "the top level" : "[" + parent + "]") << ":";
    for (const auto& sibling : siblings) message << " " << sibling;
  }
  return message.str();
}

// The key nobody read, in the table of the missing `full_key`, spelled closest to it ("" if none is close).
std::string misspelling_of(const toml::table& root, const std::set<std::string>& read_keys, const std::string& full_key) {
  auto dot = full_key.rfind('.');
  std::string parent = dot == std::string::npos ? "" : full_key.substr(0, dot);
  std::string leaf = dot == std::string::npos ? full_key : full_key.substr(dot + 1);
  const toml::node* table = parent.empty() ? &root : find_node(root, parent);
  if (table == nullptr || !table->is_table()) return "";
  std::string closest;
  size_t best = std::string::npos;
  for (const auto& [name, node] : *table->as_table()) {
    std::string candidate = join(parent, std::string(name.str()));
    if (read_keys.count(candidate) || has_read_key_below(read_keys, candidate)) continue;
    size_t distance = edit_distance(std::string(name.str()), leaf);
    if (distance < best && spelled_close(std::string(name.str()), distance)) best = distance, closest = candidate;
  }
  return closest;
}

// Reads the node at `key` as T, records it (or the fallback) in the resolved table.
template <typename T>
T read_value(Options& options, toml::table& root, toml::table& resolved, std::set<std::string>& read_keys,
             const std::string& full_key, const std::string& key, const T& fallback, bool required,
             const char* wanted) {
  read_keys.insert(full_key);
  const toml::node* node = find_node(root, full_key);
  T result = fallback;
  if (node == nullptr) {
    if (required) {
      // A misspelling of the key is reported as such, not as the key missing.
      const std::string misspelled = misspelling_of(root, read_keys, full_key);
      if (!misspelled.empty()) {
        auto key_dot = key.rfind('.');
        std::string written = (key_dot == std::string::npos ? "" : key.substr(0, key_dot + 1)) +
                              misspelled.substr(misspelled.rfind('.') + 1);
        std::string leaf = full_key.substr(full_key.rfind('.') + 1);
        throw Error(unknown_key_message(read_keys, misspelled, options.where(written), "pithtrain", leaf, false));
      }
      auto dot = full_key.rfind('.');
      std::string table_name = dot == std::string::npos ? "the top level" : "[" + full_key.substr(0, dot) + "]";
      throw Error(options.where(key) + ": missing required key '" + full_key + "' (" + wanted +
                  "); add it under " + table_name + " or pass --set " + full_key + "=...");
    }
  } else {
    std::optional<T> value;
    if constexpr (std::is_same_v<T, double>) {
      if (node->is_floating_point() || node->is_integer()) value = node->value<double>();
    } else {
      if (node->is<T>()) value = node->value<T>();
    }
    if (!value)
      throw Error(options.where(key) + ": '" + full_key + "' must be " + wanted + ", got " +
                  type_name(*node));
    result = *value;
  }
  insert_at(resolved, full_key, toml::value<T>(result));
  return result;
}

void check_finite(const Options& options, const std::string& key, double value) {
  if (!std::isfinite(value))
    throw Error(options.where(key) + ": " + join(options.path(), key) + " = " + number_text(value) +
                " is not a finite number");
}

void check_range(const Options& options, const std::string& key, double value, const std::string& value_text,
                 const Range& range) {
  if (!range.contains(value))
    throw Error(options.where(key) + ": " + join(options.path(), key) + " = " + value_text +
                " is out of range: it must be " + range.text());
}

}  // namespace

double Options::number(const std::string& key, double fallback) {
  double value = read_value<double>(*this, state_->root, state_->resolved, state_->read_keys, join(path_, key), key,
                                    fallback, false, "a number");
  check_finite(*this, key, value);
  return value;
}
double Options::number(const std::string& key, double fallback, const Range& range) {
  double value = number(key, fallback);
  check_range(*this, key, value, number_text(value), range);
  return value;
}
int64_t Options::integer(const std::string& key, int64_t fallback) {
  return read_value<int64_t>(*this, state_->root, state_->resolved, state_->read_keys, join(path_, key), key,
                             fallback, false, "an integer");
}
int64_t Options::integer(const std::string& key, int64_t fallback, const Range& range) {
  int64_t value = integer(key, fallback);
  check_range(*this, key, static_cast<double>(value), std::to_string(value), range);
  return value;
}
bool Options::boolean(const std::string& key, bool fallback) {
  return read_value<bool>(*this, state_->root, state_->resolved, state_->read_keys, join(path_, key), key,
                          fallback, false, "a boolean (true or false)");
}
std::string Options::text(const std::string& key, const std::string& fallback) {
  return read_value<std::string>(*this, state_->root, state_->resolved, state_->read_keys, join(path_, key),
                                 key, fallback, false, "a string");
}
double Options::required_number(const std::string& key) {
  double value = read_value<double>(*this, state_->root, state_->resolved, state_->read_keys, join(path_, key), key,
                                    0.0, true, "a number");
  check_finite(*this, key, value);
  return value;
}
double Options::required_number(const std::string& key, const Range& range) {
  double value = required_number(key);
  check_range(*this, key, value, number_text(value), range);
  return value;
}
int64_t Options::required_integer(const std::string& key) {
  return read_value<int64_t>(*this, state_->root, state_->resolved, state_->read_keys, join(path_, key), key,
                             0, true, "an integer");
}
int64_t Options::required_integer(const std::string& key, const Range& range) {
  int64_t value = required_integer(key);
  check_range(*this, key, static_cast<double>(value), std::to_string(value), range);
  return value;
}
std::string Options::required_text(const std::string& key) {
  return read_value<std::string>(*this, state_->root, state_->resolved, state_->read_keys, join(path_, key),
                                 key, "", true, "a string");
}

void Options::require(const std::string& key, bool ok, const std::string& allowed) const {
  if (ok) return;
  std::string full_key = join(path_, key);
  // The value as read (defaults included), else as written.
  const toml::node* node = find_node(state_->resolved, full_key);
  if (node == nullptr) node = find_node(state_->root, full_key);
  std::string value_text;
  if (node != nullptr) {
    if (const auto* number = node->as_floating_point()) value_text = number_text(number->get());
    else if (const auto* string = node->as_string()) value_text = "\"" + string->get() + "\"";
    else if (node->is_table()) value_text = "(a table)";
    else {
      std::ostringstream out;
      node->visit([&](const auto& value) { out << toml::toml_formatter(value); });
      value_text = out.str();
    }
  }
  throw Error(where(key) + ": " + full_key + (value_text.empty() ? "" : " = " + value_text) +
              " is out of range: it must be " + allowed);
}

std::vector<std::string> Options::text_list(const std::string& key, const std::vector<std::string>& fallback) {
  std::string full_key = join(path_, key);
  state_->read_keys.insert(full_key);
  const toml::node* node = find_node(state_->root, full_key);
  std::vector<std::string> result = fallback;
  if (node != nullptr) {
    const toml::array* array = node->as_array();
    // An empty array counts as one of strings (toml++ calls it not homogeneous): config.toml writes `freeze = []`.
    if (array == nullptr || (!array->empty() && !array->is_homogeneous(toml::node_type::string)))
      throw Error(where(key) + ": '" + full_key + "' must be an array of strings, got " + type_name(*node));
    result.clear();
    for (const auto& element : *array) result.push_back(*element.value<std::string>());
  }
  toml::array resolved_array;
  for (const auto& element : result) resolved_array.push_back(element);
  insert_at(state_->resolved, full_key, std::move(resolved_array));
  return result;
}

void Options::check_unknown_keys(const std::string& owner) const {
  const toml::node* start = path_.empty() ? &state_->root : find_node(state_->root, path_);
  if (start == nullptr || !start->is_table()) return;
  std::string unknown;
  // Depth-first over the table; a key is known if it was read or some read key lies below it.
  std::function<void(const toml::table&, const std::string&)> visit = [&](const toml::table& table,
                                                                          const std::string& prefix) {
    for (const auto& [name, node] : table) {
      if (!unknown.empty()) return;
      std::string full_key = join(prefix, std::string(name.str()));
      if (state_->read_keys.count(full_key)) continue;
      if (has_read_key_below(state_->read_keys, full_key) && node.is_table()) {
        visit(*node.as_table(), full_key);
      } else {
        unknown = full_key;
      }
    }
  };
  visit(*start->as_table(), path_);
  if (unknown.empty()) return;
  auto dot = unknown.rfind('.');
  std::string parent = dot == std::string::npos ? "" : unknown.substr(0, dot);
  std::string leaf = dot == std::string::npos ? unknown : unknown.substr(dot + 1);
  throw Error(unknown_key_message(state_->read_keys, unknown, Options(state_, parent).where(leaf), owner, "", true));
}

namespace {

// Prints a table as TOML with numbers in their shortest exact-enough form (0.003, not
// 0.0030000000000000001): scalars first, then each sub-table as its own [section].
void print_table(std::ostream& out, const toml::table& table, const std::string& prefix) {
  for (const auto& [name, node] : table) {
    if (node.is_table()) continue;
    out << name.str() << " = ";
    if (const auto* number = node.as_floating_point()) {
      char buffer[32];
      std::snprintf(buffer, sizeof(buffer), "%.15g", number->get());
      std::string text = buffer;
      if (text.find_first_of(".eni") == std::string::npos) text += ".0";
      out << text;
    } else if (node.is_array()) {
      out << toml::toml_formatter(*node.as_array());
    } else {
      node.visit([&](const auto& value) { out << toml::toml_formatter(value); });
    }
    out << "\n";
  }
  for (const auto& [name, node] : table) {
    if (!node.is_table()) continue;
    std::string path = join(prefix, std::string(name.str()));
    bool has_scalars = false;
    for (const auto& entry : *node.as_table()) has_scalars |= !entry.second.is_table();
    if (has_scalars) out << "\n[" << path << "]\n";
    print_table(out, *node.as_table(), path);
  }
}

}  // namespace

std::string Options::resolved_toml() const {
  std::ostringstream out;
  const toml::node* start = path_.empty() ? &state_->resolved : find_node(state_->resolved, path_);
  if (start != nullptr && start->is_table()) print_table(out, *start->as_table(), path_);
  return out.str();
}

}  // namespace pithtrain
