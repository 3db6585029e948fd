// unet_openvino MODEL.xml IMAGE.png MASK.png: a unet-edge OpenVINO IR (model.bin beside it) on the CPU plugin.
#include <openvino/openvino.hpp>

#include "host.h"

using namespace unet_edge;

int main(int argc, char** argv) {
  return run_host([&] {
    const Options options = parse_args(argc, argv, "openvino");
    check_model_file(options.model);
    ov::Core core;
    std::shared_ptr<ov::Model> model;
    try {
      model = core.read_model(options.model);
    } catch (const ov::Exception& exc) {
      throw Error(options.model + ": OpenVINO cannot read it (" + first_line(exc.what()) + ")");
    }
    Metadata meta;  // unet-edge keeps its metadata in the IR's rt_info, section "unet_edge"
    for (const char* key : {"classes", "mean", "std", "inference_precision_hint"}) {
      if (model->has_rt_info("unet_edge", key)) meta[key] = model->get_rt_info<std::string>("unet_edge", key);
    }
    const ModelInfo info = model_info(meta, options.model);
    const Image image = read_png(options.image);
    std::vector<float> input = normalise(image, info);

    // The IR says which precision to compute in: "f32" (model.xml) or "bf16" (model_bf16.xml).
    ov::AnyMap config{ov::hint::inference_precision(ov::element::Type(meta.count("inference_precision_hint")
                                                                          ? meta["inference_precision_hint"]
                                                                          : "f32"))};
    if (options.threads) config.emplace(ov::inference_num_threads(options.threads));
    ov::InferRequest request = core.compile_model(model, "CPU", config).create_infer_request();
    request.set_input_tensor(ov::Tensor(ov::element::f32, {1, 3, size_t(image.height), size_t(image.width)},
                                        input.data()));
    request.infer();
    const ov::Tensor logits = request.get_output_tensor();
    const int classes = static_cast<int>(logits.get_shape()[1]);
    write_mask_png(options.mask, argmax(logits.data<const float>(), classes, image.height, image.width), image.width,
                   image.height, classes);
    if (options.repeat) print_timings("openvino", options, [&] { request.infer(); });
  });
}
