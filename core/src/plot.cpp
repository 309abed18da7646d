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
  // Per MoE layer, per logged step: each expert's share of the layer's tokens (the heat map).
  std::vector<std::vector<std::pair<double, std::vector<double>>>> shares;
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
      shares.resize(layers);
      for (size_t index = 0; index < router->items.size(); ++index) {
        const JsonValue* counts = router->items[index].find("tokens_per_expert");
        if (counts == nullptr) continue;
        std::vector<double> share;
        double total = 0;
        for (const auto& count : counts->items) total += count.number;
        for (const auto& count : counts->items) share.push_back(total > 0 ? count.number / total : 0.0);
        shares[index].emplace_back(number_or_nan(record, "step"), share);
      }
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
  // expert_load.png: one heat map per MoE layer, step by expert, coloured by the expert's token share.
  const fs::path load_path = fs::path(run_dir) / "plot_expert_load.txt";
  std::ofstream load_data(load_path);
  for (size_t layer = 0; layer < shares.size(); ++layer) {
    load_data << "# MoE layer " << layer << ": step expert share half_width (a box per logged step and expert)\n";
    for (size_t row = 0; row < shares[layer].size(); ++row) {
      const auto& [step, share] = shares[layer][row];
      const double previous = row > 0 ? shares[layer][row - 1].first : step - 1;
      for (size_t expert = 0; expert < share.size(); ++expert)
        load_data << step << " " << expert << " " << share[expert] << " " << (step - previous) / 2 << "\n";
    }
    load_data << "\n\n";
  }
  load_data.close();
  const size_t panels = std::max<size_t>(1, shares.size());
  script << "unset grid\nset terminal pngcairo size 900," << 120 + 180 * panels << "\nset output '" << out("expert_load.png")
         << "'\nset palette rgbformulae 33,13,10\nset cbrange [0:*]\nset ylabel 'expert'\nset ytics 1\nset autoscale fix\n"
         << "set style fill solid noborder\n"
         << "set multiplot layout " << panels << ",1 title \"share of each layer's tokens per expert (uniform = 1/E)\"\n";
  if (shares.empty()) script << "plot 1 title 'no MoE layers'\n";
  for (size_t layer = 0; layer < shares.size(); ++layer)
    script << "set title 'MoE layer " << layer << "'\nplot '" << load_path.string() << "' index " << layer
           << " using ($1 - $4):2:4:(0.5):3 with boxxyerror fc palette notitle\n";
  script << "unset multiplot\n";
  const fs::path script_path = fs::path(run_dir) / "plot.gnuplot";
  std::ofstream(script_path) << script.str();
  if (std::system(("gnuplot '" + script_path.string() + "'").c_str()) != 0)
    throw Error("gnuplot failed on " + script_path.string());
  return {out("loss.png"), out("lr.png"), out("throughput.png"), out("router_load.png"), out("expert_load.png")};
}

}  // namespace pithtrain
