// `pithtrain plot RUN_DIR`: PNG charts of a run's metrics.jsonl, drawn by gnuplot.
#pragma once
#include <string>
#include <vector>

namespace pithtrain {

// Writes loss.png, lr.png, throughput.png and router_load.png into `run_dir`; returns their paths.
// Throws Error when metrics.jsonl is missing or gnuplot is not installed (scripts/setup.sh installs it).
std::vector<std::string> plot_run(const std::string& run_dir);

}  // namespace pithtrain
