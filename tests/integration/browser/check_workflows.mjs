// Loads each UI-format workflow into ComfyUI's real frontend in headless Chromium and reports what the frontend made
// of it. Driven by tests/integration/test_browser.py:
//
//   node check_workflows.mjs '{"url": ..., "chromium": ..., "workflows": [{"name", "path", "screenshot"}], "result": ...}'
//
// For each workflow: node types the frontend does not know, open dialogs (missing nodes/models), the output of
// app.graphToPrompt() (API format, what "Queue" would send), and a screenshot of the graph canvas.
import { readFileSync, writeFileSync } from "node:fs";
import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2]);
const FLAGS = [
  "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync",
];

const browser = await chromium.launch({ executablePath: config.chromium, headless: true, args: FLAGS });
const results = { workflows: [], console_errors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
  page.on("console", (message) => {
    if (message.type() === "error") results.console_errors.push(message.text());
  });
  page.on("pageerror", (error) => results.console_errors.push(String(error)));
  await page.goto(config.url, { waitUntil: "domcontentloaded" });
  // The app is ready once the node definitions from /object_info are registered with LiteGraph.
  await page.waitForFunction(
    () => window.app?.graph && window.LiteGraph?.registered_node_types?.KSampler,
    null, { timeout: 120_000, polling: 250 },
  );
  results.frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);

  for (const workflow of config.workflows) {
    const data = JSON.parse(readFileSync(workflow.path, "utf8"));
    const report = await page.evaluate(async ({ data, name }) => {
      const known = window.LiteGraph.registered_node_types;
      const missing = [...new Set(data.nodes.map((node) => node.type).filter((type) => !(type in known)))];
      await window.app.loadGraphData(data, true, true, name);
      const prompt = await window.app.graphToPrompt();
      // What the frontend would save again: positional widgets_values per node id.
      const widgets = Object.fromEntries(prompt.workflow.nodes.map((node) => [node.id, node.widgets_values ?? []]));
      // ... and its links and input slots (a widget fed by a link is an input entry with a "widget" key).
      const inputs = Object.fromEntries(prompt.workflow.nodes.map((node) => [
        node.id, (node.inputs ?? []).map((input) => ({ name: input.name, type: input.type, widget: input.widget?.name ?? null, link: input.link ?? null })),
      ]));
      return {
        missing_node_types: missing, node_count: window.app.graph.nodes.length, output: prompt.output,
        widgets_values: widgets, links: prompt.workflow.links, inputs,
      };
    }, { data, name: workflow.name });
    report.name = workflow.name;
    await page.waitForTimeout(500); // dialogs open asynchronously after loading
    report.dialogs = await page.evaluate(() => [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText.slice(0, 500)));
    for (let i = 0; i < report.dialogs.length; i++) await page.keyboard.press("Escape");

    // Fit the whole graph into the canvas, wait for the LoadImage previews, then take the screenshot.
    await page.evaluate(() => {
      const canvas = window.app.canvas;
      const nodes = window.app.graph.nodes;
      const groups = window.app.graph.groups ?? window.app.graph._groups ?? [];
      const boxes = [
        ...nodes.map((n) => [n.pos[0], n.pos[1] - 30, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]),
        ...groups.map((g) => { const b = g._bounding ?? g.bounding; return [b[0], b[1], b[0] + b[2], b[1] + b[3]]; }),
      ];
      const [x0, y0] = [Math.min(...boxes.map((b) => b[0])), Math.min(...boxes.map((b) => b[1]))];
      const [x1, y1] = [Math.max(...boxes.map((b) => b[2])), Math.max(...boxes.map((b) => b[3]))];
      const element = canvas.canvas;
      const margin = 30;
      const scale = Math.min((element.clientWidth - 2 * margin) / (x1 - x0), (element.clientHeight - 2 * margin) / (y1 - y0));
      canvas.ds.scale = scale;
      canvas.ds.offset[0] = margin / scale - x0;
      canvas.ds.offset[1] = margin / scale - y0;
      canvas.setDirty(true, true);
    });
    await page.waitForFunction(
      () => window.app.graph.nodes.filter((n) => n.type === "LoadImage").every((n) => n.imgs?.[0]?.complete),
      null, { timeout: 15_000, polling: 250 },
    ).catch(() => {});
    await page.waitForTimeout(500);
    await page.locator("#graph-canvas").screenshot({ path: workflow.screenshot });
    results.workflows.push(report);
  }
} finally {
  await browser.close();
}
writeFileSync(config.result, JSON.stringify(results, null, 2));
