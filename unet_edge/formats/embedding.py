"""How a program loads each format and segments one image with its runtime alone: the README's embedding
snippets (a test keeps them equal to the README's text), which `deploy` writes beside the model it chose.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SNIPPETS", "Snippet", "embedding_markdown"]


@dataclass(frozen=True)
class Snippet:
    """The README's lead-in line, the imports the snippet assumes, and the code (each file named as the fp32 export names it)."""

    intro: str
    imports: str
    code: str


SNIPPETS: dict[str, Snippet] = {
    "onnx": Snippet(
        "ONNX Runtime, with only onnxruntime, numpy and Pillow (`model.onnx`, `model_fp16.onnx` and `model_int8.onnx` alike: float32 in and out)",
        "import json\n\nimport numpy as np\nimport onnxruntime as ort\nfrom PIL import Image",
        """\
options = ort.SessionOptions()
options.intra_op_num_threads = 4
session = ort.InferenceSession("model.onnx", options, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
mean, std = (np.array(json.loads(meta[key]), np.float32) for key in ("mean", "std"))
image = np.asarray(Image.open("image.png").convert("RGB"))  # H x W x 3 uint8, any size
x = np.ascontiguousarray(((image / 255.0 - mean) / std).transpose(2, 0, 1)[None], np.float32)  # 1 x 3 x H x W
(logits,) = session.run(["logits"], {"image": x})
mask = logits[0].argmax(0)  # H x W class indices
""",
    ),
    "torchscript": Snippet(
        "TorchScript, with only torch, numpy and Pillow (LibTorch's `torch::jit::load` reads the same file in C++)",
        "import json\n\nimport numpy as np\nimport torch\nfrom PIL import Image",
        """\
torch.set_num_threads(4)
extra = {"unet_edge.json": ""}
model = torch.jit.load("model.ts", _extra_files=extra)  # the metadata rides in the archive
meta = json.loads(extra["unet_edge.json"])
mean, std = (np.array(json.loads(meta[key]), np.float32) for key in ("mean", "std"))
image = np.asarray(Image.open("image.png").convert("RGB"))  # H x W x 3 uint8, any size
x = np.ascontiguousarray(((image / 255.0 - mean) / std).transpose(2, 0, 1)[None], np.float32)  # 1 x 3 x H x W
with torch.inference_mode():
    mask = model(torch.from_numpy(x))[0].argmax(0).numpy()  # H x W class indices
""",
    ),
    "openvino": Snippet(
        "OpenVINO, with only openvino, numpy and Pillow",
        "import json\n\nimport numpy as np\nimport openvino as ov\nfrom PIL import Image",
        """\
core = ov.Core()
model = core.read_model("model.xml")  # model.bin beside it
meta = {key: json.loads(model.get_rt_info(["unet_edge", key]).astype(str)) for key in ("classes", "mean", "std")}
hint = model.get_rt_info(["unet_edge", "inference_precision_hint"]).astype(str)  # "f32"; "bf16" in model_bf16.xml
compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": 4})
image = np.asarray(Image.open("image.png").convert("RGB"))  # H x W x 3 uint8, any size
x = ((image / 255.0 - meta["mean"]) / meta["std"]).transpose(2, 0, 1)[None].astype(np.float32)  # 1 x 3 x H x W
mask = compiled(x)[0][0].argmax(0)  # H x W class indices
""",
    ),
    "ncnn": Snippet(
        "ncnn, with only ncnn, numpy and Pillow",
        "import json\n\nimport ncnn\nimport numpy as np\nfrom PIL import Image",
        """\
meta = json.load(open("model.ncnn.json"))
net = ncnn.Net()
net.opt.num_threads = 4
net.load_param("model.ncnn.param")
net.load_model("model.ncnn.bin")
mean, std = (np.array(json.loads(meta[key]), np.float32) for key in ("mean", "std"))
image = np.asarray(Image.open("image.png").convert("RGB"))  # H x W x 3 uint8, any size
x = np.ascontiguousarray(((image / 255.0 - mean) / std).transpose(2, 0, 1), np.float32)  # 3 x H x W
extractor = net.create_extractor()
extractor.input(meta["input_blob"], ncnn.Mat(x))
status, logits = extractor.extract(meta["output_blob"])  # status 0 on success
mask = np.array(logits).argmax(0)  # H x W class indices
""",
    ),
    "executorch": Snippet(
        "ExecuTorch, with only executorch (its Python runtime uses torch tensors), numpy and Pillow",
        "import json\n\nimport numpy as np\nimport torch\nfrom executorch.runtime import Runtime\nfrom PIL import Image",
        """\
program = Runtime.get().load_program("model.pte")  # from executorch.runtime import Runtime
meta = json.loads(program.load_method("unet_edge_metadata").execute(())[0])
mean, std = (np.array(json.loads(meta[key]), np.float32) for key in ("mean", "std"))
forward = program.load_method("forward")
image = np.asarray(Image.open("image.png").convert("RGB"))  # H x W x 3 uint8, each side 2..the export's --max-size (1024)
x = np.ascontiguousarray(((image / 255.0 - mean) / std).transpose(2, 0, 1)[None], np.float32)  # 1 x 3 x H x W, contiguous
mask = forward.execute((torch.from_numpy(x),))[0][0].argmax(0).numpy()  # H x W class indices
""",
    ),
    "litert": Snippet(
        "LiteRT, with only ai-edge-litert, numpy and Pillow (an image of the export size, `model.json`'s `input_size`)",
        "import json\n\nimport numpy as np\nfrom ai_edge_litert.interpreter import Interpreter\nfrom PIL import Image",
        """\
meta = json.load(open("model.json"))
interpreter = Interpreter(model_path="model.tflite", num_threads=4)  # from ai_edge_litert.interpreter
interpreter.allocate_tensors()
mean, std = (np.array(json.loads(meta[key]), np.float32) for key in ("mean", "std"))
image = np.asarray(Image.open("image.png").convert("RGB"))  # H x W x 3 uint8, H x W = meta["input_size"]
x = np.ascontiguousarray(((image / 255.0 - mean) / std).transpose(2, 0, 1)[None], np.float32)  # 1 x 3 x H x W, contiguous
interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
interpreter.invoke()
mask = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0].argmax(0)  # H x W class indices
""",
    ),
}

# Reduced-precision files whose interface differs from the fp32 file's, in words for EMBEDDING.md.
_INTERFACE_NOTES = {
    ("litert", "int8"): "This file has int8 input and output: quantise `x` with the input's `quantization` (scale, zero point) "
    "from `get_input_details()` and dequantise the output with the output's before the argmax.",
}


def embedding_markdown(format_name: str, file: str, companions: list[str], precision: str = "fp32") -> str:
    """EMBEDDING.md for a model file: what to ship and the README's snippet for its runtime."""
    ship = ", ".join(f"`{name}`" for name in [file, *companions])
    lines = [f"# Embedding `{file}`", "", f"Ship {ship} (`manifest.json` lists each file's sha256).", ""]
    snippet = SNIPPETS.get(format_name)
    if snippet is None:
        return "\n".join([*lines, f"unet-edge has no embedding snippet for the {format_name} format.", ""])
    lines += [f"{snippet.intro}; the snippet names the fp32 export's files, this model is `{file}`:", ""]
    note = _INTERFACE_NOTES.get((format_name, precision))
    if note:
        lines += [note, ""]
    lines += ["```python", snippet.imports, "", snippet.code.rstrip("\n"), "```", ""]
    return "\n".join(lines)
