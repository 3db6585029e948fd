// unet_executorch MODEL.pte IMAGE.png MASK.png: a unet-edge ExecuTorch program (XNNPACK delegate) on the CPU.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <nlohmann/json.hpp>

#include "host.h"

using namespace unet_edge;
using executorch::extension::Module;

namespace {

struct Bounds {
  int min_height = 2, max_height = 1024, min_width = 2, max_width = 1024;  // programs that predate the metadata
};

// The height and width the program accepts: its `size_contract` metadata.
Bounds side_bounds(const Metadata& meta, const std::string& path) {
  Bounds bounds;
  if (!meta.count("size_contract")) return bounds;
  try {
    const auto contract = nlohmann::json::parse(meta.at("size_contract"));
    contract.at("height").at(0).get_to(bounds.min_height), contract.at("height").at(1).get_to(bounds.max_height);
    contract.at("width").at(0).get_to(bounds.min_width), contract.at("width").at(1).get_to(bounds.max_width);
  } catch (const nlohmann::json::exception&) {
    throw Error(path + ": the program's size_contract metadata is not readable");
  }
  return bounds;
}

std::string describe(executorch::runtime::Error error) {
  return "ExecuTorch error " + std::to_string(static_cast<int>(error));
}

}  // namespace

int main(int argc, char** argv) {
  return run_host([&] {
    const Options options = parse_args(argc, argv, "executorch");
    if (options.threads) {
      throw Error("--threads: the ExecuTorch host keeps XNNPACK's thread pool at its default (one thread per core)");
    }
    check_model_file(options.model);
    Module module(options.model, Module::LoadMode::File);
    // unet-edge stores its metadata as a constant method returning one JSON string.
    const auto meta_result = module.execute("unet_edge_metadata");
    if (!meta_result.ok()) {
      throw Error(options.model + ": not a loadable unet-edge ExecuTorch program (" + describe(meta_result.error()) +
                  ")");
    }
    const Metadata meta = parse_metadata(std::string(meta_result->at(0).toString()), options.model);
    const ModelInfo info = model_info(meta, options.model);
    const Image image = read_png(options.image);
    // The program's memory is planned for the bounds it was exported with (--max-size), and the runtime does not
    // refuse a larger input: the host does, as unet-edge's Python backend does.
    const Bounds bounds = side_bounds(meta, options.model);
    if (image.height < bounds.min_height || image.height > bounds.max_height || image.width < bounds.min_width ||
        image.width > bounds.max_width) {
      throw Error(options.image + ": a " + std::to_string(image.height) + "x" + std::to_string(image.width) +
                  " image is outside the program's bounds (height " + std::to_string(bounds.min_height) + ".." +
                  std::to_string(bounds.max_height) + ", width " + std::to_string(bounds.min_width) + ".." +
                  std::to_string(bounds.max_width) + "; export with a larger --max-size)");
    }
    std::vector<float> input = normalise(image, info);

    auto tensor = executorch::extension::from_blob(input.data(), {1, 3, image.height, image.width});
    const auto run = [&] {
      auto outputs = module.forward(tensor);
      if (!outputs.ok()) {
        throw Error(options.model + ": forward failed on a " + std::to_string(image.height) + "x" +
                    std::to_string(image.width) + " image (" + describe(outputs.error()) + ")");
      }
      return outputs;
    };
    const auto outputs = run();
    const auto& logits = outputs->at(0).toTensor();
    const int classes = static_cast<int>(logits.size(1));
    write_mask_png(options.mask, argmax(logits.const_data_ptr<float>(), classes, image.height, image.width),
                   image.width, image.height, classes);
    if (options.repeat) print_timings("executorch", options, [&] { run(); });
  });
}
