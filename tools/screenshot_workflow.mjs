#!/usr/bin/env node
// Load a UI-format ComfyUI workflow into a running ComfyUI frontend (headless
// Chromium via playwright-core), check that every node type resolves, print a
// JSON summary and save a screenshot.
//
// Usage:
//   node tools/screenshot_workflow.mjs --url http://127.0.0.1:8188 \
//        --workflow example_workflows/x.json --out shot.png \
//        [--wait 3000] [--timeout 60000] [--width 1600] [--height 1000] \
//        [--api-out prompt.json] [--keep-dialogs] [--chromium /usr/bin/chromium]
//
// stdout: one JSON object
//   {missing: [types], nodes: N, missing_nodes: [{id,type,title}],
//    error_nodes: [...], not_in_object_info: [...], api_nodes: N|null,
//    page_errors: [...], network_errors: [...], screenshot: path}
// exit code: 0 = all nodes resolved, 2 = missing node types (or nodes with
// has_errors), 1 = other error (bad args, server not reachable, timeout).
// --api-out writes the API-format prompt produced by the frontend itself
// (app.graphToPrompt), i.e. the real UI->API conversion.
// Known noise with stock ComfyUI 0.3.64 / frontend 1.27.10: page_errors always
// contains "pageerror: Cannot read properties of undefined (reading 'id')"
// (settings init) and network_errors lists 404s for user.css / userdata and
// the unreachable api.comfy.org; neither is caused by the workflow.
// SHOT_DEBUG=1 adds JS stacks to page_errors.
//
// playwright-core is resolved from: normal module resolution, then
// $PLAYWRIGHT_CORE_DIR (a node_modules dir or the package dir), then
// /work/pw/node_modules. Install with:
//   mkdir -p /work/pw && cd /work/pw && npm init -y && npm install playwright-core
// (no browser download; Debian's /usr/bin/chromium is used).

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';

function parseArgs(argv) {
  const a = {
    url: 'http://127.0.0.1:8188', workflow: null, out: null, wait: 3000,
    timeout: 60000, width: 1600, height: 1000, apiOut: null, keepDialogs: false,
    chromium: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
  };
  for (let i = 2; i < argv.length; i++) {
    const k = argv[i];
    const v = () => {
      if (i + 1 >= argv.length) throw new Error(`missing value for ${k}`);
      return argv[++i];
    };
    switch (k) {
      case '--url': a.url = v(); break;
      case '--workflow': a.workflow = v(); break;
      case '--out': a.out = v(); break;
      case '--wait': a.wait = Number(v()); break;
      case '--timeout': a.timeout = Number(v()); break;
      case '--width': a.width = Number(v()); break;
      case '--height': a.height = Number(v()); break;
      case '--api-out': a.apiOut = v(); break;
      case '--keep-dialogs': a.keepDialogs = true; break;
      case '--chromium': a.chromium = v(); break;
      case '-h': case '--help':
        process.stdout.write(fs.readFileSync(new URL(import.meta.url)).toString()
          .split('\n').filter((l) => l.startsWith('//')).join('\n') + '\n');
        process.exit(0);
        break;
      default: throw new Error(`unknown argument ${k}`);
    }
  }
  if (!a.workflow || !a.out) throw new Error('--workflow and --out are required');
  return a;
}

async function loadPlaywright() {
  try {
    return await import('playwright-core');
  } catch (_) { /* fall through */ }
  const cands = [];
  if (process.env.PLAYWRIGHT_CORE_DIR) cands.push(process.env.PLAYWRIGHT_CORE_DIR);
  cands.push('/work/pw/node_modules');
  for (const c of cands) {
    for (const base of [c, path.join(c, 'node_modules')]) {
      try {
        const req = createRequire(path.join(base, 'noop.js'));
        return req('playwright-core');
      } catch (_) { /* next */ }
      try {
        const req = createRequire(path.join(base, 'noop.js'));
        return req(base);
      } catch (_) { /* next */ }
    }
  }
  throw new Error('playwright-core not found (npm install playwright-core in /work/pw or set PLAYWRIGHT_CORE_DIR)');
}

async function main() {
  const args = parseArgs(process.argv);
  const wf = JSON.parse(fs.readFileSync(args.workflow, 'utf8'));
  if (!wf || !Array.isArray(wf.nodes)) {
    throw new Error(`${args.workflow} is not a UI-format workflow (no "nodes" array); API-format prompts cannot be loaded into the canvas`);
  }
  const pw = await loadPlaywright();
  const chromium = pw.chromium || (pw.default && pw.default.chromium);
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'upsr-chromium-'));
  const pageErrors = [];
  const networkErrors = [];
  let ctx;
  try {
    ctx = await chromium.launchPersistentContext(userDataDir, {
      executablePath: args.chromium,
      headless: true,
      viewport: { width: args.width, height: args.height },
      args: [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
        '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync',
      ],
      timeout: args.timeout,
    });
    const page = ctx.pages()[0] || await ctx.newPage();
    page.setDefaultTimeout(args.timeout);
    // JS exceptions and console errors; failed / 4xx-5xx requests separately
    // (the stock frontend itself 404s a few optional endpoints and tries to
    // reach external hosts, so network errors are informational only).
    page.on('pageerror', (e) => pageErrors.push(`pageerror: ${e && e.message || e}${process.env.SHOT_DEBUG && e && e.stack ? "\n" + e.stack : ""}`));
    page.on('console', (m) => {
      if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) pageErrors.push(`console: ${m.text()}`);
    });
    page.on('requestfailed', (r) => networkErrors.push(`${r.failure() ? r.failure().errorText : 'failed'} ${r.url()}`));
    page.on('response', (r) => { if (r.status() >= 400) networkErrors.push(`${r.status()} ${r.url()}`); });

    await page.goto(args.url, { waitUntil: 'domcontentloaded' });
    // window.app / window.LiteGraph are set by the frontend once it is ready.
    await page.waitForFunction(() => !!(window.app && window.app.graph && window.app.canvas &&
      window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types || {}).length > 0),
    null, { timeout: args.timeout, polling: 250 });
    await page.waitForTimeout(500);

    const objectInfo = await page.evaluate(async () => {
      const r = await fetch('api/object_info');
      return Object.keys(await r.json());
    });

    const result = await page.evaluate(async ({ wf, keepDialogs }) => {
      const app = window.app;
      const LG = window.LiteGraph;
      const reg = LG.registered_node_types;
      // Same rule the frontend itself uses in loadGraphData (before it
      // renames missing types), incl. nodes inside subgraph definitions.
      const preMissing = [];
      const scan = (nodes, where) => {
        for (const n of nodes || []) {
          if (!(n.type in reg)) preMissing.push({ id: n.id, type: n.type, title: n.title || null, where });
        }
      };
      scan(wf.nodes, 'root');
      for (const sg of (wf.definitions && wf.definitions.subgraphs) || []) scan(sg.nodes, `subgraph:${sg.name || sg.id}`);
      // Subgraph instance nodes use the subgraph id as type; they are
      // registered when the definitions are loaded, so ignore them here.
      const sgIds = new Set(((wf.definitions && wf.definitions.subgraphs) || []).map((s) => s.id));
      const missingPre = preMissing.filter((m) => !sgIds.has(m.type));

      await app.loadGraphData(wf, true, true, null, {
        showMissingNodesDialog: keepDialogs,
        showMissingModelsDialog: keepDialogs,
      });

      // Post-load inspection of the live graph (recursing into subgraphs).
      const live = [];
      const walk = (graph, where) => {
        for (const n of graph._nodes || graph.nodes || []) {
          live.push({ n, where });
          if (n.subgraph && n.subgraph !== graph) walk(n.subgraph, `subgraph:${n.subgraph.name || n.subgraph.id}`);
        }
      };
      walk(app.graph, 'root');
      const errorNodes = [];
      for (const { n, where } of live) {
        const unreg = !(n.type in reg) && !(n.isSubgraphNode && n.isSubgraphNode());
        if (unreg || n.has_errors) {
          errorNodes.push({ id: n.id, type: n.type, title: n.title || null, where, unregistered: unreg, has_errors: !!n.has_errors });
        }
      }
      return {
        missingPre,
        errorNodes,
        liveTypes: live.map(({ n }) => ({ type: n.type, virtual: !!(n.isVirtualNode || (n.constructor && n.constructor.nodeData == null)), subgraph: !!(n.isSubgraphNode && n.isSubgraphNode()) })),
        nodeCount: live.length,
      };
    }, { wf, keepDialogs: args.keepDialogs });

    let apiPrompt = null;
    try {
      apiPrompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
    } catch (e) {
      pageErrors.push(`graphToPrompt failed: ${e.message}`);
    }
    if (args.apiOut && apiPrompt) fs.writeFileSync(args.apiOut, JSON.stringify(apiPrompt, null, 2));

    // Disable LiteGraph's low-quality (LOD) rendering so zoomed-out graphs
    // still show titles and widget values in the screenshot; hide the
    // minimap, which otherwise covers a corner of the graph (and of the
    // Templates thumbnail made from this shot).
    await page.evaluate(async () => {
      const setting = window.app.extensionManager && window.app.extensionManager.setting;
      if (setting && typeof setting.set === 'function') {
        try { await setting.set('Comfy.Minimap.Visible', false); } catch (_) { /* older frontends: no minimap */ }
      }
      const c = window.app.canvas;
      if ('_min_font_size_for_lod' in c) c._min_font_size_for_lod = 0;
      if (typeof c.updateLowQualityThreshold === 'function') c.updateLowQualityThreshold();
      c.setDirty(true, true);
    });
    await page.waitForTimeout(args.wait);
    if (!args.keepDialogs) {
      // Close any dialog that still popped up (first-run templates, etc.).
      for (let i = 0; i < 3; i++) {
        const open = await page.locator('.p-dialog-mask, [role="dialog"]').count();
        if (!open) break;
        await page.keyboard.press('Escape');
        await page.waitForTimeout(300);
      }
    }
    fs.mkdirSync(path.dirname(path.resolve(args.out)), { recursive: true });
    await page.screenshot({ path: args.out });

    const oi = new Set(objectInfo);
    const notInObjectInfo = [...new Set(result.liveTypes
      .filter((t) => !t.virtual && !t.subgraph && !oi.has(t.type)).map((t) => t.type))];
    const missingSet = new Set([
      ...result.missingPre.map((m) => m.type),
      ...result.errorNodes.filter((m) => m.unregistered).map((m) => m.type),
    ]);
    const summary = {
      missing: [...missingSet],
      nodes: result.nodeCount,
      missing_nodes: result.missingPre,
      error_nodes: result.errorNodes,
      not_in_object_info: notInObjectInfo,
      api_nodes: apiPrompt ? Object.keys(apiPrompt).length : null,
      page_errors: pageErrors,
      network_errors: networkErrors,
      screenshot: path.resolve(args.out),
    };
    process.stdout.write(JSON.stringify(summary, null, 2) + '\n');
    return (summary.missing.length || result.errorNodes.length) ? 2 : 0;
  } finally {
    if (ctx) await ctx.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

main().then((code) => process.exit(code), (e) => {
  process.stderr.write(`screenshot_workflow: ${e && e.stack || e}\n`);
  process.exit(1);
});
