#!/usr/bin/env node
// Regenerate example_workflows/*.json in the real frontend: each graph is built with LiteGraph in a
// running ComfyUI (with this pack and the example inputs/model present, e.g. from
// `python tests/e2e/comfy_server.py --keep`) and saved with graph.serialize(), so the files are
// exactly what the frontend itself writes.
//   node tests/e2e/build_workflows.mjs --url http://127.0.0.1:PORT [--out example_workflows]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';

const args = Object.fromEntries(process.argv.slice(2).reduce((a, v, i, all) => (v.startsWith('--') ? [...a, [v.slice(2), all[i + 1]]] : a), []));
const url = args.url || 'http://127.0.0.1:8188';
const outDir = args.out || path.join(path.dirname(new URL(import.meta.url).pathname), '..', '..', 'example_workflows');
const require = createRequire(path.join(process.env.PLAYWRIGHT_CORE_DIR || '/work/pw/node_modules', 'noop.js'));
const { chromium } = require('playwright-core');

// One spec per workflow: nodes [key, type, [x, y], {widget: value}, title?], links [from, slot, to, input].
const DEMO = 'upsr_demo_x4.safetensors';
const MODEL = ['model', 'LoadUPSRModel', [30, 760], { model_name: DEMO, estimator_name: '(from the model file)', precision: 'auto', implementation: 'fast' }, null, [400, 154]];
const SAMPLE = { seed: 0, control_after_generate: 'fixed', tile: 512, overlap: 64, tile_batch: 1, same_noise: false };
const SPECS = {
  upsr_basic: {
    note: [30, 20, 400, 260, `# UPSR ×4: the four stages
**Load UPSR Model** → **Estimate Uncertainty** (a first ×4 estimate g(y) and the uncertainty ψ; its preview shows ψ as a heat map) → **Weight Noise** (w = b_u + (1 − b_u)·min(ψ/ψ_max, 1); heat map: bright = full noise) → **UPSR Sample** (5 diffusion steps from the weighted noise).

With these default values and seed 0 the result equals \`python -m upsr_core upscale --fast\` on the CPU (on a GPU choose precision fp32 for that; implementation reference: without \`--fast\`). **UPSR Upscale ×4** does all four in one node.`],
    nodes: [
      ['img', 'LoadImage', [30, 320], { image: 'upsr_example_bee.png' }, 'Load LR image', [400, 400]],
      MODEL,
      ['est', 'EstimateUncertainty', [470, 20], {}, null, [340, 330]],
      ['wn', 'WeightNoise', [470, 400], { b_u: 0.4, psi_max: 0.05 }, null, [340, 380]],
      ['smp', 'UPSRSample', [850, 20], SAMPLE, null, [320, 276]],
      ['save', 'SaveImage', [1210, 20], { filename_prefix: 'UPSR/basic' }, null, [460, 470]],
    ],
    links: [['model', 0, 'est', 'upsr_model'], ['img', 0, 'est', 'image'], ['est', 1, 'wn', 'uncertainty'],
      ['model', 0, 'smp', 'upsr_model'], ['img', 0, 'smp', 'image'], ['est', 0, 'smp', 'sr_estimate'],
      ['wn', 0, 'smp', 'noise_weight'], ['smp', 0, 'save', 'images']],
  },
  upsr_paint_uncertainty: {
    note: [30, 20, 400, 260, `# Inspect and paint the uncertainty
The uncertainty ψ decides where UPSR adds noise (new detail) and where it keeps the low-resolution look. Here ψ comes out as a **MASK**, is grown a little, and the region painted on the input (right-click **Load LR image** → *Open in MaskEditor*) is **added**: the dandelion gets full noise. Use *subtract* in **ψ + painted** to protect the painted region instead.
The painted mask has the LR size, so it is scaled ×4 to match ψ.`],
    nodes: [
      ['img', 'LoadImage', [30, 320], { image: 'upsr_example_dandelion_painted.png' }, 'Load LR image (painted)', [400, 400]],
      MODEL,
      ['est', 'EstimateUncertainty', [470, 20], {}, null, [340, 330]],
      ['m2i', 'MaskToImage', [470, 400], {}, 'Painted mask → image', [340, 60]],
      ['up', 'ImageScaleBy', [470, 500], { upscale_method: 'nearest-exact', scale_by: 4.0 }, 'Painted mask ×4', [340, 110]],
      ['i2m', 'ImageToMask', [470, 650], { channel: 'red' }, 'Painted mask ×4 → mask', [340, 90]],
      ['grow', 'GrowMask', [850, 20], { expand: 2, tapered_corners: true }, 'Grow ψ', [300, 110]],
      ['comp', 'MaskComposite', [850, 400], { x: 0, y: 0, operation: 'add' }, 'ψ + painted', [300, 170]],
      ['show', 'MaskToImage', [850, 610], {}, 'Edited ψ → image', [300, 60]],
      ['prev', 'PreviewImage', [850, 710], {}, 'Preview edited ψ', [300, 280]],
      ['wn', 'WeightNoise', [1190, 400], { b_u: 0.4, psi_max: 0.05 }, null, [340, 380]],
      ['smp', 'UPSRSample', [1190, 20], SAMPLE, null, [340, 276]],
      ['save', 'SaveImage', [1570, 20], { filename_prefix: 'UPSR/paint' }, null, [460, 400]],
    ],
    links: [['model', 0, 'est', 'upsr_model'], ['img', 0, 'est', 'image'], ['est', 2, 'grow', 'mask'],
      ['img', 1, 'm2i', 'mask'], ['m2i', 0, 'up', 'image'], ['up', 0, 'i2m', 'image'],
      ['grow', 0, 'comp', 'destination'], ['i2m', 0, 'comp', 'source'], ['comp', 0, 'show', 'mask'],
      ['show', 0, 'prev', 'images'], ['comp', 0, 'wn', 'uncertainty_mask'],
      ['model', 0, 'smp', 'upsr_model'], ['img', 0, 'smp', 'image'], ['est', 0, 'smp', 'sr_estimate'],
      ['wn', 0, 'smp', 'noise_weight'], ['smp', 0, 'save', 'images']],
  },
  upsr_large_tiled: {
    note: [30, 20, 400, 260, `# A large image, in tiles
512×368 → 2048×1472. **UPSR Upscale ×4** runs the four stages tile by tile, so memory stays bounded by the tile: here tiles of 192 LR px with 32 px overlap, 2 tiles per denoiser batch (the progress bar counts steps × tiles).
Raise *tile* on a big GPU (512 = the official size); lower it when memory runs out — the node also retries with smaller tiles by itself.`],
    nodes: [
      ['img', 'LoadImage', [30, 320], { image: 'upsr_example_bridge.jpg' }, 'Load LR image', [400, 400]],
      MODEL,
      ['up', 'UPSRUpscale', [470, 20], { seed: 0, control_after_generate: 'fixed', b_u: 0.4, psi_max: 0.05, tile: 192, overlap: 32, tile_batch: 2, same_noise: false }, null, [340, 326]],
      ['save', 'SaveImage', [850, 20], { filename_prefix: 'UPSR/large' }, null, [720, 580]],
    ],
    links: [['model', 0, 'up', 'upsr_model'], ['img', 0, 'up', 'image'], ['up', 0, 'save', 'images']],
  },
  upsr_color_fix: {
    note: [30, 20, 400, 260, `# Colour fix (optional)
**UPSR Upscale ×4**, then **UPSR Color Fix**: the result keeps its fine detail and takes its colours and soft shading from the input (upscaled bicubically), so its colours stay close to the input's. Compare the two images: the fix is not part of the official UPSR. On the bundled demo model it raised PSNR by 0.22 dB on its validation photos, NIQE unchanged.
*levels*: detail finer than about 2^levels pixels stays the upscaler's; fewer levels copy more of the blurry input.`],
    nodes: [
      ['img', 'LoadImage', [30, 320], { image: 'upsr_example_bee.png' }, 'Load LR image', [400, 400]],
      MODEL,
      ['up', 'UPSRUpscale', [470, 20], { seed: 0, control_after_generate: 'fixed', b_u: 0.4, psi_max: 0.05, tile: 512, overlap: 64, tile_batch: 1, same_noise: false }, null, [340, 326]],
      ['cf', 'UPSRColorFix', [470, 420], { levels: 5 }, null, [340, 110]],
      ['prev', 'PreviewImage', [850, 20], {}, 'As sampled', [460, 470]],
      ['save', 'SaveImage', [1350, 20], { filename_prefix: 'UPSR/color_fix' }, 'Colour-fixed', [460, 470]],
    ],
    links: [['model', 0, 'up', 'upsr_model'], ['img', 0, 'up', 'image'], ['up', 0, 'prev', 'images'],
      ['up', 0, 'cf', 'image'], ['img', 0, 'cf', 'reference'], ['cf', 0, 'save', 'images']],
  },
};
// The view saved with each workflow: the whole graph in the canvas of a 1800×1000 window (sidebar and menu bar excluded).
const VIEW = { w: 1800 - 70, h: 1000 - 80, left: 0, top: 0, margin: 16 };

const ctx = await chromium.launchPersistentContext(fs.mkdtempSync(path.join(os.tmpdir(), 'upsr-build-')), {
  executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium', headless: true, viewport: { width: 1600, height: 1000 },
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-sync'],
});
try {
  const page = ctx.pages()[0] || await ctx.newPage();
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph &&
    Object.keys(window.LiteGraph.registered_node_types).length > 0, null, { timeout: 90000 });
  for (const [name, spec] of Object.entries(SPECS)) {
    const wf = await page.evaluate(({ view, ...spec }) => {
      const g = window.app.graph;
      g.clear();
      const byKey = {};
      const note = window.LiteGraph.createNode('MarkdownNote');
      note.pos = [spec.note[0], spec.note[1]];
      note.size = [spec.note[2], spec.note[3]];
      note.widgets[0].value = spec.note[4];
      g.add(note);
      for (const [key, type, pos, values, title, size] of spec.nodes) {
        const n = window.LiteGraph.createNode(type);
        if (!n) throw new Error(`unknown node type ${type}`);
        n.pos = pos;
        if (title) n.title = title;
        g.add(n);
        for (const [w, v] of Object.entries(values)) {
          const widget = n.widgets.find((x) => x.name === w);
          if (!widget) throw new Error(`${type} has no widget ${w}`);
          widget.value = v;
        }
        byKey[key] = n;
      }
      for (const [from, slot, to, input] of spec.links) {
        const dst = byKey[to];
        const idx = dst.inputs.findIndex((i) => i.name === input);
        if (idx < 0) throw new Error(`${dst.type} has no input ${input}`);
        if (!byKey[from].connect(slot, dst, idx)) throw new Error(`cannot link ${from}:${slot} -> ${to}.${input}`);
      }
      for (const [key, , , , , size] of spec.nodes) {
        const n = byKey[key];
        const min = n.computeSize();
        n.setSize(size ? [Math.max(size[0], min[0]), Math.max(size[1], min[1])] : min);
      }
      const wf = g.serialize();
      const xs = wf.nodes.map((n) => [n.pos[0], n.pos[0] + n.size[0]]).flat();
      const ys = wf.nodes.map((n) => [n.pos[1] - 30, n.pos[1] + n.size[1]]).flat();
      const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
      const scale = Math.min(1, (view.w - 2 * view.margin) / (x1 - x0), (view.h - 2 * view.margin) / (y1 - y0));
      wf.extra = { ...(wf.extra || {}), ds: { scale, offset: [(view.left + view.margin) / scale - x0, (view.top + view.margin) / scale - y0] } };
      return wf;
    }, { ...spec, view: VIEW });
    wf.id = '00000000-0000-4000-8000-' + name.split('').reduce((h, c) => (h * 31 + c.charCodeAt(0)) >>> 0, 7).toString(16).padStart(12, '0');
    fs.writeFileSync(path.join(outDir, `${name}.json`), JSON.stringify(wf, null, 2) + '\n');
    console.log(`wrote ${name}.json (${wf.nodes.length} nodes, ${wf.links.length} links)`);
  }
} finally {
  await ctx.close();
}
