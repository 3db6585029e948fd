// Drive the example page in headless Chromium as a person would: open it, choose an image in its file
// input, wait for the mask, save a screenshot. Prints {width, height, state, status} as JSON and writes
// the mask's class indices (height * width bytes, row by row) to MASK.bin. The tests run this.
// usage: node headless.mjs PAGE_URL IMAGE MASK.bin SCREENSHOT.png [CHROMIUM_PATH]
import { writeFileSync } from "node:fs";
import { chromium } from "playwright-core";

const [pageUrl, imagePath, maskPath, screenshotPath, executablePath = "/usr/bin/chromium"] = process.argv.slice(2);
if (!screenshotPath) {
  console.error("usage: node headless.mjs PAGE_URL IMAGE MASK.bin SCREENSHOT.png [CHROMIUM_PATH]");
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
});
try {
  const page = await browser.newPage({ viewport: { width: 760, height: 560 } });
  page.on("console", (message) => console.error(`[page ${message.type()}] ${message.text()}`));
  page.on("pageerror", (error) => console.error(`[page error] ${error.message}`));
  await page.goto(pageUrl);
  await page.waitForFunction(() => document.body.dataset.state !== "loading", null, { timeout: 60000 });
  if (await page.evaluate(() => document.body.dataset.state) === "ready") {
    await page.setInputFiles("#file", imagePath);
    await page.waitForFunction(() => ["done", "error"].includes(document.body.dataset.state), null, { timeout: 60000 });
  }
  await page.screenshot({ path: screenshotPath, fullPage: true });
  const state = await page.evaluate(() => document.body.dataset.state);
  const status = await page.textContent("#status");
  const result = await page.evaluate(() => window.unetEdgeResult ?? null);
  if (result) writeFileSync(maskPath, Buffer.from(result.mask));
  console.log(JSON.stringify({ width: result?.width, height: result?.height, state, status }));
  process.exitCode = state === "done" ? 0 : 1;
} finally {
  await browser.close();
}
