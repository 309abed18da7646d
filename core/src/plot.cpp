// Reads metrics.jsonl, writes whitespace-separated columns and a gnuplot script, runs gnuplot.
#include "plot.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "json.h"
#include "pithtrain/error.h"

namespace pithtrain {
namespace fs = std::filesystem;

namespace {

double number_or_nan(const JsonValue& record, const char* key) {
  const JsonValue* value = record.find(key);
  return value != nullptr && value->type == JsonValue::Type::Number ? value->number : std::nan("");
}

}  // namespace

std::vector<std::string> plot_run(const std::string& run_dir) {
  const fs::path metrics_path = fs::path(run_dir) / "metrics.jsonl";
  std::ifstream metrics(metrics_path);
  if (!metrics) throw Error("no metrics at '" + metrics_path.string() + "': pass a run directory (e.g. runs/tiny)");
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0)
    throw Error("gnuplot is not installed; scripts/setup.sh installs it (Debian package gnuplot-nox)");

  const fs::path data_path = fs::path(run_dir) / "plot_data.txt";
  std::ofstream data(data_path);
  data << "# step cross_entropy val_loss lr tokens_per_s mfu max_over_mean[layer...]\n";
  std::string line;
  size_t layers = 0, line_number = 0;
  bool has_validation = false, has_mfu = false;
  auto column = [&](double value) { return std::isnan(value) ? std::string("NaN") : std::to_string(value); };
  while (std::getline(metrics, line)) {
    ++line_number;
    if (line.empty()) continue;
    JsonValue record = parse_json(line, metrics_path.string() + ":" + std::to_string(line_number));
    has_validation |= !std::isnan(number_or_nan(record, "val_loss"));
    has_mfu |= !std::isnan(number_or_nan(record, "mfu"));
    data << column(number_or_nan(record, "step")) << " " << column(number_or_nan(record, "cross_entropy")) << " "
         << column(number_or_nan(record, "val_loss")) << " " << column(number_or_nan(record, "lr")) << " "
         << column(number_or_nan(record, "tokens_per_s")) << " " << column(number_or_nan(record, "mfu"));
    if (const JsonValue* router = record.find("router")) {
      layers = std::max(layers, router->items.size());
      for (const auto& layer : router->items) data << " " << column(number_or_nan(layer, "max_over_mean"));
    }
    data << "\n";
  }
  data.close();

  const std::string d = "'" + data_path.string() + "'";
  auto out = [&](const char* name) { return (fs::path(run_dir) / name).string(); };
  std::ostringstream script;
  script << "set terminal pngcairo size 900,500\nset grid\nset key top right\nset datafile missing NaN\nset xlabel 'step'\n"
         << "set output '" << out("loss.png") << "'\nset title 'loss'\nset ylabel 'cross-entropy (nats)'\n"
         << "plot " << d << " using 1:2 with lines title 'train'"
         << (has_validation ? ", " + d + " using 1:3 with linespoints title 'validation'" : std::string()) << "\n"
         << "set output '" << out("lr.png") << "'\nset title 'learning rate'\nset ylabel 'lr'\n"
         << "plot " << d << " using 1:4 with lines title 'lr'\n"
         << "set output '" << out("throughput.png") << "'\nset title 'throughput'\nset ylabel 'tokens/s'\nset y2label 'MFU'\n"
         << "set ytics nomirror\nset y2tics\nplot " << d << " using 1:5 with lines title 'tokens/s'"
         << (has_mfu ? ", " + d + " using 1:6 axes x1y2 with lines title 'MFU'" : std::string())
         << "\nunset y2tics\nunset y2label\nset ytics mirror\n"
         << "set output '" << out("router_load.png") << "'\nset title 'router load: max/mean tokens per expert (1 = balanced)'\n"
         << "set ylabel 'max / mean'\n";
  if (layers == 0) script << "plot 1 title 'no MoE layers'\n";
  for (size_t layer = 0; layer < layers; ++layer)
    script << (layer ? ", " : "plot ") << d << " using 1:" << 7 + layer << " with lines title 'MoE layer " << layer << "'";
  script << "\n";
  const fs::path script_path = fs::path(run_dir) / "plot.gnuplot";
  std::ofstream(script_path) << script.str();
  if (std::system(("gnuplot '" + script_path.string() + "'").c_str()) != 0)
    throw Error("gnuplot failed on " + script_path.string());
  return {out("loss.png"), out("lr.png"), out("throughput.png"), out("router_load.png")};
}

}  // namespace pithtrain
