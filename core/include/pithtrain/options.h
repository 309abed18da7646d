// A typed, validated view of one TOML table: how the core and plugins read their settings.
// Every key read is recorded (with its default when absent); a key in the file that nobody read is an
// unknown key, reported by check_unknown_keys() with the file, line and the nearest valid key. A number
// is read with the Range it must lie in, and NaN or infinity is never a valid number.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace pithtrain {

// The interval a config number must lie in. Each bound is closed (included), open (excluded) or absent;
// a factory names the interval, e.g. Range::above(0) for (0, inf), Range::half_open(0, 1) for [0, 1).
// A default-constructed Range has no bounds.
struct Range {
  enum class Bound { absent, closed, open };
  Bound lower_bound = Bound::absent, upper_bound = Bound::absent;
  double lower = 0, upper = 0;

  static Range at_least(double lower);                 // [lower, inf)
  static Range above(double lower);                    // (lower, inf)
  static Range at_most(double upper);                  // (-inf, upper]
  static Range below(double upper);                    // (-inf, upper)
  static Range closed(double lower, double upper);     // [lower, upper]
  static Range half_open(double lower, double upper);  // [lower, upper)
  static Range open(double lower, double upper);       // (lower, upper)
  static Range left_open(double lower, double upper);  // (lower, upper]

  // Whether `value` lies in the interval; NaN lies in none.
  bool contains(double value) const;
  // The interval as the rest of "it must be ...": "> 0", ">= 1", "< 1", "in [0, 1)", "any number".
  std::string text() const;
};

class Options {
 public:
  // Parses a TOML file; throws Error naming the file and line on a syntax error.
  static Options from_file(const std::string& path);
  // Parses TOML text; `source_name` stands for the file in messages.
  static Options from_string(const std::string& text, const std::string& source_name);

  // Applies a `--set dotted.key=value` override. The value is parsed as a TOML value; if that fails it
  // is taken as a string, so `--set model.moe.router.plugin=aux_free` needs no quotes.
  void set_override(const std::string& assignment);

  // Readers: return the value at `key` (relative to this view), or `fallback` when absent. A present
  // value of the wrong type throws Error. Integers are accepted where a number is asked for; a number
  // that is NaN or infinite throws Error ("<file:line>: <key> = nan is not a finite number").
  double number(const std::string& key, double fallback);
  int64_t integer(const std::string& key, int64_t fallback);
  // The same, and the value read (or the fallback) outside `range` throws Error
  // "<file:line or --set ...>: <key> = <value> is out of range: it must be <range.text()>".
  double number(const std::string& key, double fallback, const Range& range);
  int64_t integer(const std::string& key, int64_t fallback, const Range& range);
  bool boolean(const std::string& key, bool fallback);
  std::string text(const std::string& key, const std::string& fallback);
  std::vector<std::string> text_list(const std::string& key, const std::vector<std::string>& fallback);
  // Required readers: throw Error naming the missing key and the table to add it to. When the table
  // holds a key nobody read that is spelled close to the missing one, that key is reported instead, as
  // check_unknown_keys() would ("unknown key 'model.vocab_sizee' ...; did you mean 'model.vocab_size'?").
  double required_number(const std::string& key);
  int64_t required_integer(const std::string& key);
  std::string required_text(const std::string& key);
  double required_number(const std::string& key, const Range& range);
  int64_t required_integer(const std::string& key, const Range& range);

  // For a rule between keys that no single Range states (min_lr <= lr, num_heads % num_kv_heads == 0):
  // when `ok` is false throws Error "<file:line>: <key> = <value> is out of range: it must be <allowed>",
  // with the value `key` resolved to. Read `key` first.
  void require(const std::string& key, bool ok, const std::string& allowed) const;

  bool has(const std::string& key) const;
  // A view of the sub-table `key` (absent tables read as empty, so every key takes its default).
  Options table(const std::string& key) const;
  // The config file these options were read from (or the source name given to from_string).
  const std::string& source() const;
  // The dotted path of this view from the root ("model.moe.router"), "" for the root.
  const std::string& path() const;
  // The file (or "--set") and line where `key` was written, for messages: "configs/tiny.toml:12".
  std::string where(const std::string& key) const;

  // Throws Error for the first key under this view that no reader asked for, naming the file, line,
  // key and the nearest key that is valid in the same table. `owner` describes who reads the table
  // ("router plugin 'aux_free'") and is named in the message.
  void check_unknown_keys(const std::string& owner = "pithtrain") const;
  // Every value read so far (defaults included) as TOML text: the resolved config.
  std::string resolved_toml() const;

 private:
  struct State;
  Options(std::shared_ptr<State> state, std::string path);
  std::shared_ptr<State> state_;
  std::string path_;
};

}  // namespace pithtrain
