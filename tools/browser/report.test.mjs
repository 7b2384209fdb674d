// kefu-bench's HTML report (`--html FILE`) opened in headless Chromium:
// a real chat run with an attachment mix against the real kefu binary
// writes the page, and the page must draw its chart: the SVG laid out with
// a non-zero box, one curve per latency the run measured, each curve drawn,
// axes labelled, and the run's parameters listed.
//
// Run by tools/browser-test.sh (node --test), which builds kefu-bench and
// sets KEFU_BENCH_BIN.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { after, before, test } from 'node:test';
import { Gateway, launch, newPage, shot } from './harness.mjs';

const BENCH = process.env.KEFU_BENCH_BIN;
if (!BENCH) throw new Error('KEFU_BENCH_BIN must name the kefu-bench binary (tools/browser-test.sh sets it)');

// chat with a mix measures delivery, ack and its own send lag, then
// delivery and ack of each kind apart: seven curves.
const CURVES = ['delivery', 'ack', 'send lag (client)', 'delivery, with attachment', 'delivery, text only',
  'ack, with attachment', 'ack, text only'];

let gateway;
let browser;
let dir;

before(async () => {
  // Twenty anonymous visitors from one address, each sending a message a
  // second: lift the per-address and per-connection limits as
  // tools/bench-chat.sh does.
  gateway = new Gateway({
    KEFU_LIMITS_MESSAGES_PER_S: '1000', KEFU_LIMITS_BURST: '1000',
    KEFU_LIMITS_NEW_CONNECTIONS_BURST_PER_IP: '1000000', KEFU_LIMITS_ANONYMOUS_PER_MIN_PER_IP: '1000000',
  });
  await gateway.start();
  browser = await launch();
  dir = mkdtempSync(join(tmpdir(), 'kefu-bench-report-'));
});

after(async () => {
  await browser?.close();
  await gateway?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function bench(args) {
  return new Promise((resolve, reject) => {
    execFile(BENCH, args, { timeout: 120000, maxBuffer: 16 << 20 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`kefu-bench ${args.join(' ')}: ${error.message}\n${stderr}`));
      else resolve({ stdout, stderr });
    });
  });
}

test('the HTML report of a chat run draws one curve per latency', async () => {
  const file = join(dir, 'chat.html');
  const { stdout, stderr } = await bench([
    'chat', '--url', `ws://127.0.0.1:${gateway.port}/ws`, '--data', gateway.data,
    '--visitors', '20', '--agents', '2', '--rate', '100', '--duration', '1', '--warmup', '0.3', '--grace', '3',
    '--attachment-share', '0.5', '--attachment-bytes', '20000', '--fsync-probe', '0', '--html', file,
  ]);
  // The JSON line on stdout, the table on stderr.
  const result = JSON.parse(stdout.trim());
  assert.ok(result.with_attachment.sent > 0 && result.text_only.sent > 0, stdout);
  assert.equal(result.undelivered, 0, stdout);
  assert.match(stderr, /delivery, with attachment/);

  const page = await newPage(browser);
  await page.goto(pathToFileURL(file).href);
  const chart = await page.evaluate(() => {
    const svg = document.querySelector('svg#latency-chart');
    const box = svg.getBoundingClientRect();
    const curves = [...svg.querySelectorAll('polyline.series')].map((p) => {
      const b = p.getBBox();
      return { name: p.dataset.name, width: b.width, height: b.height, points: p.points.numberOfItems };
    });
    const labels = [...svg.querySelectorAll('text.axis-label')].map((t) => t.textContent);
    const ticks = [...svg.querySelectorAll('text.x-tick')].map((t) => t.textContent);
    const params = Object.fromEntries([...document.querySelectorAll('#parameters tr')]
      .map((tr) => [...tr.children].map((c) => c.textContent)).filter((r) => r.length === 2));
    return { width: box.width, height: box.height, curves, labels, ticks, params };
  });
  await shot(page, 'bench-report');
  assert.deepEqual(page.problems, []);
  assert.ok(chart.width > 0 && chart.height > 0, JSON.stringify(chart));
  assert.deepEqual(chart.curves.map((c) => c.name), CURVES);
  for (const curve of chart.curves) {
    // Drawn: several points spread across the percentiles (a curve
    // whose latencies are all alike may be flat, so its height may be 0).
    assert.ok(curve.points > 3 && curve.width > 0, JSON.stringify(curve));
  }
  assert.ok(chart.labels.includes('latency (ms)'), chart.labels.join());
  assert.ok(chart.ticks.includes('99%'), chart.ticks.join());
  assert.equal(chart.params['--attachment-share'], '0.5');
  assert.equal(chart.params['--visitors'], '20');
  // Defaults are listed too.
  assert.equal(chart.params['--subprotocol'], 'json');
  assert.ok(readFileSync(file, 'utf8').length > 1000);
});
