#include "host.h"

#include <openssl/evp.h>
#include <png.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

namespace fs = std::filesystem;
using nlohmann::json;

namespace unet_edge {

namespace {

[[noreturn]] void usage(const char* runtime, const std::string& problem) {
  throw Error(problem + " (usage: unet_" + std::string(runtime) +
              " MODEL IMAGE.png MASK.png [--threads N] [--repeat N])");
}

int positive(const char* runtime, const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    int value = std::stoi(text, &used);
    if (used == text.size() && value > 0) return value;
  } catch (const std::exception&) {
  }
  usage(runtime, flag + " takes a positive integer, got '" + text + "'");
}

std::string sha256_file(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw Error(path.string() + ": cannot be read");
  EVP_MD_CTX* context = EVP_MD_CTX_new();
  EVP_DigestInit_ex(context, EVP_sha256(), nullptr);
  std::vector<char> buffer(1 << 20);
  while (file.read(buffer.data(), buffer.size()) || file.gcount() > 0) {
    EVP_DigestUpdate(context, buffer.data(), static_cast<size_t>(file.gcount()));
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(context, digest, &length);
  EVP_MD_CTX_free(context);
  std::string hex;
  char byte[3];
  for (unsigned int i = 0; i < length; ++i) {
    std::snprintf(byte, sizeof byte, "%02x", digest[i]);
    hex += byte;
  }
  return hex;
}

// As unet-edge's Python check: missing, truncated or modified, with both digests' first 12 characters.
void check_listed_file(const fs::path& path, const json& record) {
  if (!fs::is_regular_file(path)) throw Error(path.string() + ": listed in manifest.json but missing");
  const std::string expected = record.value("sha256", "");
  const std::string actual = sha256_file(path);
  if (expected.empty() || actual == expected) return;
  const auto size = fs::file_size(path);
  const auto listed = record.value("size_bytes", uint64_t{0});
  const std::string hint =
      size < listed ? "truncated: " + std::to_string(size) + " of " + std::to_string(listed) + " bytes" : "modified";
  throw Error(path.string() + ": sha256 " + actual.substr(0, 12) + "... does not match manifest.json (" +
              expected.substr(0, 12) + "...): file was " + hint);
}

template <typename T>
T parse_json(const std::string& text, const std::string& what, const std::string& path) {
  try {
    return json::parse(text).get<T>();
  } catch (const json::exception&) {
    throw Error(path + ": unreadable '" + what + "' in the model's metadata");
  }
}

}  // namespace

Options parse_args(int argc, char** argv, const char* runtime) {
  Options options;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--threads" || arg == "--repeat") {
      if (i + 1 == argc) usage(runtime, arg + " needs a value");
      (arg == "--threads" ? options.threads : options.repeat) = positive(runtime, arg, argv[++i]);
    } else if (arg.rfind("--", 0) == 0) {
      usage(runtime, "unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 3) usage(runtime, "expected MODEL IMAGE.png MASK.png");
  options.model = positional[0], options.image = positional[1], options.mask = positional[2];
  return options;
}

void check_model_file(const std::string& model) {
  const fs::path path(model);
  if (!fs::is_regular_file(path)) throw Error(model + ": file not found");
  const fs::path manifest_path = path.parent_path() / "manifest.json";
  if (!fs::is_regular_file(manifest_path)) return;  // a file copied out alone: nothing to check it against
  json manifest;
  try {
    manifest = json::parse(std::ifstream(manifest_path));
  } catch (const json::exception& exc) {
    throw Error(manifest_path.string() + ": not a valid manifest (" + first_line(exc.what()) + ")");
  }
  for (const json& entry : manifest.value("artifacts", json::array())) {
    if (entry.value("file", "") != path.filename().string()) continue;
    check_listed_file(path, entry);
    for (const json& companion : entry.value("companions", json::array())) {
      check_listed_file(path.parent_path() / companion.value("file", ""), companion);
    }
  }
}

ModelInfo model_info(const Metadata& meta, const std::string& path) {
  for (const char* key : {"classes", "mean", "std"}) {
    if (!meta.count(key)) throw Error(path + ": not a unet-edge model (no '" + key + "' in its metadata)");
  }
  ModelInfo info;
  info.classes = parse_json<std::vector<std::string>>(meta.at("classes"), "classes", path);
  const auto mean = parse_json<std::vector<float>>(meta.at("mean"), "mean", path);
  const auto std = parse_json<std::vector<float>>(meta.at("std"), "std", path);
  if (info.classes.empty() || info.classes.size() > 256 || mean.size() != 3 || std.size() != 3) {
    throw Error(path + ": the metadata needs 1 to 256 classes and 3 values of mean and of std");
  }
  std::copy(mean.begin(), mean.end(), info.mean);
  std::copy(std.begin(), std.end(), info.std);
  return info;
}

Metadata parse_metadata(const std::string& text, const std::string& path) {
  return parse_json<Metadata>(text, "metadata", path);
}

Image read_png(const std::string& path) {
  png_image png{};
  png.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&png, path.c_str())) {
    throw Error(path + ": not a readable PNG (" + png.message + ")");
  }
  png.format = PNG_FORMAT_RGB;
  Image image;
  image.width = static_cast<int>(png.width), image.height = static_cast<int>(png.height);
  image.rgb.resize(PNG_IMAGE_SIZE(png));
  if (!png_image_finish_read(&png, nullptr, image.rgb.data(), 0, nullptr)) {
    const std::string message = png.message;
    png_image_free(&png);
    throw Error(path + ": not a readable PNG (" + message + ")");
  }
  return image;
}

std::vector<float> normalise(const Image& image, const ModelInfo& info) {
  const size_t plane = static_cast<size_t>(image.width) * image.height;
  std::vector<float> chw(3 * plane);
  for (size_t pixel = 0; pixel < plane; ++pixel) {
    for (size_t channel = 0; channel < 3; ++channel) {
      const float scaled = static_cast<float>(image.rgb[pixel * 3 + channel]) / 255.0f;
      chw[channel * plane + pixel] = (scaled - info.mean[channel]) / info.std[channel];
    }
  }
  return chw;
}

std::vector<uint8_t> argmax(const float* logits, int classes, int height, int width) {
  const size_t plane = static_cast<size_t>(width) * height;
  std::vector<uint8_t> mask(plane, 0);
  std::vector<float> best(logits, logits + plane);
  for (int k = 1; k < classes; ++k) {
    const float* scores = logits + k * plane;
    for (size_t pixel = 0; pixel < plane; ++pixel) {
      if (scores[pixel] > best[pixel]) best[pixel] = scores[pixel], mask[pixel] = static_cast<uint8_t>(k);
    }
  }
  return mask;
}

void write_mask_png(const std::string& path, const std::vector<uint8_t>& mask, int width, int height, int classes) {
  std::vector<png_color> palette(classes);
  for (int index = 0; index < classes; ++index) {  // unet_edge.predict.class_palette
    int value = index, colour[3] = {0, 0, 0};
    for (int bit = 0; bit < 8; ++bit) {
      for (int channel = 0; channel < 3; ++channel) colour[channel] |= ((value >> channel) & 1) << (7 - bit);
      value >>= 3;
    }
    palette[index] = {static_cast<png_byte>(colour[0]), static_cast<png_byte>(colour[1]),
                      static_cast<png_byte>(colour[2])};
  }
  png_image png{};
  png.version = PNG_IMAGE_VERSION;
  png.width = static_cast<png_uint_32>(width), png.height = static_cast<png_uint_32>(height);
  png.format = PNG_FORMAT_RGB_COLORMAP;
  png.colormap_entries = static_cast<png_uint_32>(classes);
  // Written beside the target and renamed into place, so a failure leaves no half-written mask.
  const std::string staged = path + ".partial";
  if (!png_image_write_to_file(&png, staged.c_str(), 0, mask.data(), 0, palette.data())) {
    std::remove(staged.c_str());
    throw Error(path + ": cannot write the mask (" + png.message + ")");
  }
  std::error_code failed;
  fs::rename(staged, path, failed);
  if (failed) throw Error(path + ": cannot write the mask (" + failed.message() + ")");
}

void print_timings(const char* runtime, const Options& options, const std::function<void()>& run) {
  run();  // warm-up: first-call allocations and kernel selection
  std::vector<double> latency_ms;
  for (int call = 0; call < options.repeat; ++call) {
    const auto start = std::chrono::steady_clock::now();
    run();
    latency_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::vector<double> sorted = latency_ms;
  std::sort(sorted.begin(), sorted.end());
  const size_t n = sorted.size();
  const double p50 = n % 2 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
  double mean = 0;
  for (double value : sorted) mean += value / n;
  std::cout << json{{"runtime", runtime}, {"model", options.model},   {"image", options.image},
                    {"threads", options.threads}, {"calls", n},   {"p50_ms", p50},
                    {"mean_ms", mean},      {"min_ms", sorted.front()}, {"latency_ms", latency_ms}}
                   .dump()
            << std::endl;
}

std::string first_line(const std::string& message) {
  const auto start = message.find_first_not_of(" \n");
  if (start == std::string::npos) return "unknown error";
  return message.substr(start, message.find('\n', start) - start).substr(0, 300);
}

int run_host(const std::function<void()>& host) {
  try {
    host();
    return 0;
  } catch (const std::exception& exc) {
    std::cerr << "error: " << first_line(exc.what()) << std::endl;
  } catch (...) {
    std::cerr << "error: unknown failure" << std::endl;
  }
  return 1;
}

}  // namespace unet_edge
