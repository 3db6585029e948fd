// What every unet-edge C++ host shares: the command line, the manifest's sha256 check, PNG in and out (libpng),
// normalisation and argmax. Each runtime's program supplies only how it loads a model and runs one image.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace unet_edge {

// A failure the program reports as one line on stderr before exiting with status 1.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string model, image, mask;
  int threads = 0;  // 0: the runtime's default
  int repeat = 0;   // > 0: time that many inference calls and print the timings as JSON
};

// The metadata unet-edge stores in every model file: string values, lists JSON-encoded.
using Metadata = std::map<std::string, std::string>;

struct ModelInfo {
  std::vector<std::string> classes;
  float mean[3], std[3];
};

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height x width x 3
};

Options parse_args(int argc, char** argv, const char* runtime);
// Refuse a missing model file, or one whose sha256 (or a companion's) differs from manifest.json beside it.
void check_model_file(const std::string& path);
ModelInfo model_info(const Metadata& meta, const std::string& path);
// Metadata stored as one JSON object of strings (ExecuTorch's metadata method returns it so).
Metadata parse_metadata(const std::string& text, const std::string& path);
Image read_png(const std::string& path);
// 1 x 3 x H x W float32, (pixel / 255 - mean) / std, as the model was trained.
std::vector<float> normalise(const Image& image, const ModelInfo& info);
// K x H x W logits -> H x W class indices (the first maximum, as numpy's argmax).
std::vector<uint8_t> argmax(const float* logits, int classes, int height, int width);
// A palette PNG, colours as `unet-edge predict` writes them (Pascal VOC's colour map), pixel value = class index.
void write_mask_png(const std::string& path, const std::vector<uint8_t>& mask, int width, int height, int classes);
// Time `repeat` calls of `run` (after one warm-up call) and print {"runtime", "calls", "p50_ms", ...} on stdout.
void print_timings(const char* runtime, const Options& options, const std::function<void()>& run);
// The first line of a runtime's (often multi-line) error message.
std::string first_line(const std::string& message);
// main's body: runs `host`, turning any exception into "error: ..." on stderr and exit status 1.
int run_host(const std::function<void()>& host);

}  // namespace unet_edge
