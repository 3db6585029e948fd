// Segment a PNG with unet-edge's end-to-end ONNX model in Node.js: uint8 RGB in, class mask out,
// no normalisation or argmax code here, the model holds both.
// usage: node segment.mjs MODEL_E2E.onnx IMAGE.png MASK.png
import { readFileSync, writeFileSync } from "node:fs";
import * as ort from "onnxruntime-node";
import { PNG } from "pngjs";

const [modelPath, imagePath, maskPath] = process.argv.slice(2);
if (!maskPath) {
  console.error("usage: node segment.mjs MODEL_E2E.onnx IMAGE.png MASK.png");
  process.exit(2);
}

const session = await ort.InferenceSession.create(modelPath);
const png = PNG.sync.read(readFileSync(imagePath)); // RGBA, 8 bits per channel
const { width, height } = png;
const rgb = new Uint8Array(width * height * 3);
for (let i = 0; i < width * height; i++) {
  rgb.set(png.data.subarray(4 * i, 4 * i + 3), 3 * i);
}
const { mask } = await session.run({ image: new ort.Tensor("uint8", rgb, [1, height, width, 3]) });
// mask.data: Uint8Array of height * width class indices, row by row

const out = new PNG({ width, height, colorType: 0, inputColorType: 0 }); // 8-bit grayscale
out.data = Buffer.from(mask.data.buffer, mask.data.byteOffset, mask.data.byteLength);
writeFileSync(maskPath, PNG.sync.write(out, { colorType: 0, inputColorType: 0 }));
const counts = new Array(Math.max(...mask.data) + 1).fill(0);
for (const value of mask.data) counts[value]++;
console.log(JSON.stringify({ width, height, dims: mask.dims, pixelsPerClass: counts }));
