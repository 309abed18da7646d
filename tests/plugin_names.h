// What an "available: ..." list of router plugins must say, read from the plugin folder itself, so the
// tests hold whichever plugins are installed.
#pragma once
#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

// The router plugins whose files `dir` holds, in name order (as the registry lists them).
inline std::string router_names_in(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string file = entry.path().filename().string();
    if (file.rfind("router_", 0) == 0 && entry.path().extension() == ".so") names.push_back(file.substr(7, file.size() - 10));
  }
  std::sort(names.begin(), names.end());
  std::string joined;
  for (const auto& name : names) joined += (joined.empty() ? "" : ", ") + name;
  return joined;
}
