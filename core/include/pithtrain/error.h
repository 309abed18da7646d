// The one exception type of PithTrain: its message says what was wrong, where, and how to fix it.
#pragma once
#include <stdexcept>
#include <string>

namespace pithtrain {

// Thrown by the core and by plugins for anything a user can act on (bad config, bad file, bad plugin).
// The CLI prints what() as one line and exits non-zero.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace pithtrain
