// Segment a chosen image in the browser with unet-edge's end-to-end ONNX model (uint8 RGB in, class
// mask out). onnxruntime-web's WASM files are served from node_modules by any static server.
// ?model=URL picks the model (default model_e2e.onnx beside this page); class names come from the
// manifest.json that unet-edge writes beside it, when there is one.
import * as ort from "./node_modules/onnxruntime-web/dist/ort.wasm.min.mjs";

ort.env.wasm.wasmPaths = new URL("./node_modules/onnxruntime-web/dist/", import.meta.url).href;
ort.env.wasm.numThreads = 1; // threads need cross-origin isolation headers a plain static server does not send

const status = document.getElementById("status");
const modelUrl = new URL(new URLSearchParams(location.search).get("model") ?? "model_e2e.onnx", location.href);
document.getElementById("model").textContent = modelUrl.pathname;

/** Pascal VOC's colour map, as unet-edge's predict writes it: class 0 black, then distinct colours. */
function palette(index) {
  const colour = [0, 0, 0];
  for (let bit = 0; bit < 8; bit++, index >>= 3) {
    for (let channel = 0; channel < 3; channel++) colour[channel] |= ((index >> channel) & 1) << (7 - bit);
  }
  return colour;
}

async function classNames() {
  const response = await fetch(new URL("manifest.json", modelUrl));
  return response.ok ? (await response.json()).classes : null;
}

async function segment(session, file, classes) {
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const { width, height } = bitmap;
  const imageCanvas = document.getElementById("image");
  Object.assign(imageCanvas, { width, height });
  const context = imageCanvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, width, height).data;
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0; i < width * height; i++) rgb.set(rgba.subarray(4 * i, 4 * i + 3), 3 * i);

  const { mask } = await session.run({ image: new ort.Tensor("uint8", rgb, [1, height, width, 3]) });
  // mask.data: Uint8Array of height * width class indices, row by row

  const maskCanvas = document.getElementById("mask");
  Object.assign(maskCanvas, { width, height });
  const pixels = new ImageData(width, height);
  mask.data.forEach((value, i) => pixels.data.set([...palette(value), 255], 4 * i));
  maskCanvas.getContext("2d").putImageData(pixels, 0, 0);
  const count = Math.max(classes?.length ?? 0, Math.max(...mask.data) + 1);
  document.getElementById("legend").innerHTML = Array.from({ length: count }, (_, k) =>
    `<span style="background: rgb(${palette(k)})"></span>${classes?.[k] ?? `class ${k}`}`).join("");
  return { width, height, mask: Array.from(mask.data) };
}

try {
  const [session, classes] = await Promise.all([
    ort.InferenceSession.create(modelUrl.href, { executionProviders: ["wasm"] }),
    classNames(),
  ]);
  const input = document.getElementById("file");
  input.disabled = false;
  status.textContent = "ready: choose an image";
  document.body.dataset.state = "ready";
  input.addEventListener("change", async () => {
    document.body.dataset.state = "running";
    try {
      window.unetEdgeResult = await segment(session, input.files[0], classes);
      status.textContent = `segmented ${input.files[0].name} (${window.unetEdgeResult.width}x${window.unetEdgeResult.height})`;
      document.body.dataset.state = "done";
    } catch (error) {
      status.textContent = `error: ${error.message}`;
      document.body.dataset.state = "error";
    }
  });
} catch (error) {
  status.textContent = `error: ${error.message}`;
  document.body.dataset.state = "error";
}
