// unet_aoti MODEL.pt2 IMAGE.png MASK.png: a unet-edge pt2 package (torch.export + AOTInductor) with libtorch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "host.h"

using namespace unet_edge;

int main(int argc, char** argv) {
  return run_host([&] {
    const Options options = parse_args(argc, argv, "aoti");
    check_model_file(options.model);
    if (options.threads) at::set_num_threads(options.threads);
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
    try {
      loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(options.model);
    } catch (const std::exception& exc) {
      throw Error(options.model + ": not a loadable pt2 package (" + first_line(exc.what()) + ")");
    }
    Metadata meta;
    for (const auto& [key, value] : loader->get_metadata()) meta[key] = value;
    // The kernels were compiled for the exporting CPU's instruction set: refuse rather than crash on another.
    if (meta["AOTI_CPU_ISA"].find("AVX512") != std::string::npos && !__builtin_cpu_supports("avx512f")) {
      throw Error(options.model + ": compiled for " + meta["AOTI_CPU_ISA"] + ", and this CPU has no AVX512");
    }
    const ModelInfo info = model_info(meta, options.model);
    const Image image = read_png(options.image);
    std::vector<float> input = normalise(image, info);

    const std::vector<at::Tensor> inputs{at::from_blob(input.data(), {1, 3, image.height, image.width}, at::kFloat)};
    std::vector<at::Tensor> outputs;
    try {
      outputs = loader->run(inputs);
    } catch (const std::exception& exc) {  // the package checks the shape bounds it was exported with
      throw Error(options.model + ": the package refused a " + std::to_string(image.height) + "x" +
                  std::to_string(image.width) + " image (" + first_line(exc.what()) + ")");
    }
    const at::Tensor logits = outputs.at(0).contiguous();
    const int classes = static_cast<int>(logits.size(1));
    write_mask_png(options.mask, argmax(logits.const_data_ptr<float>(), classes, image.height, image.width),
                   image.width, image.height, classes);
    if (options.repeat) print_timings("aoti", options, [&] { loader->run(inputs); });
  });
}
