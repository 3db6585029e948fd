// unet_executorch MODEL.pte IMAGE.png MASK.png: a unet-edge ExecuTorch program (XNNPACK delegate) on the CPU.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include "host.h"

using namespace unet_edge;
using executorch::extension::Module;

namespace {

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
    const ModelInfo info = model_info(parse_metadata(std::string(meta_result->at(0).toString()), options.model),
                                      options.model);
    const Image image = read_png(options.image);
    std::vector<float> input = normalise(image, info);

    // The program's shape bounds (--max-size at export) are checked by the runtime: an error, not a crash.
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
