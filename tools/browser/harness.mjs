// The real kefu binary and Debian's Chromium, for the browser tests.
//
// A Gateway is `kefu serve` on a free loopback port with its own data
// directory; it can be killed with SIGKILL and started again on the same
// port and data (the pages must come back by themselves). A browser is
// /usr/bin/chromium driven by playwright-core (never a downloaded build).

import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { createRequire } from 'node:module';
import { join } from 'node:path';

// playwright-core is installed outside the source tree (under the cargo
// target dir, by tools/browser-test.sh), which ES module resolution does
// not search: load it from there by path.
const require = createRequire(join(process.env.KEFU_NODE_MODULES || join(process.cwd(), 'node_modules'), 'x.js'));
const { chromium } = require('playwright-core');

export const KEFU_BIN = process.env.KEFU_BIN;
export const ARTIFACTS = process.env.KEFU_ARTIFACTS || join(tmpdir(), 'kefu-browser-artifacts');
mkdirSync(ARTIFACTS, { recursive: true });

if (!KEFU_BIN) throw new Error('KEFU_BIN must name the kefu binary (tools/browser-test.sh sets it)');

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export class Gateway {
  constructor(env = {}) {
    this.env = env;
    this.data = mkdtempSync(join(tmpdir(), 'kefu-browser-'));
    this.log = [];
  }

  async start() {
    if (!this.port) this.port = await freePort();
    this.origin = `http://127.0.0.1:${this.port}`;
    const child = spawn(KEFU_BIN, [
      'serve', '--listen', `127.0.0.1:${this.port}`, '--admin-listen', '127.0.0.1:0',
      '--data', this.data, '--shards', '2',
    ], { env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1', ...this.env }, stdio: ['ignore', 'ignore', 'pipe'] });
    this.child = child;
    let buf = '';
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('kefu did not start in 20 s:\n' + this.log.join('\n'))), 20000);
      child.stderr.on('data', (chunk) => {
        buf += chunk;
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          this.log.push(line);
          const admin = line.match(/kefu listening .*admin=(\S+)/);
          if (admin) this.admin = `http://${admin[1]}`;
          if (line.includes('demo shop with the visitor widget')) {
            clearTimeout(timer);
            resolve();
          }
        }
      });
      child.on('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`kefu exited with ${code}:\n${this.log.join('\n')}`));
      });
    });
    child.removeAllListeners('exit');
  }

  // The console link the gateway logged at start.
  consoleLink() {
    const line = this.log.find((l) => l.includes('agent console: '));
    return line && line.match(/(http:\/\/\S+\/console#token=[\w.-]+)/)[1];
  }

  // A control-plane REST call (needs KEFU_ADMIN_API_KEYS to hold `key`).
  async api(method, path, key, body) {
    const res = await fetch(this.admin + path, {
      method,
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
    return text ? JSON.parse(text) : null;
  }

  token(role, sub, ...extra) {
    return execFileSync(KEFU_BIN, ['token', '--role', role, '--sub', sub, '--data', this.data, ...extra],
      { encoding: 'utf8' }).trim();
  }

  kill9() {
    return new Promise((resolve) => {
      this.child.on('exit', resolve);
      this.child.kill('SIGKILL');
    });
  }

  async stop() {
    if (this.child && this.child.exitCode === null && this.child.signalCode === null) await this.kill9();
    rmSync(this.data, { recursive: true, force: true });
  }
}

// A shop on another origin (its own port) whose page embeds the widget
// from `gatewayOrigin()`: the widget as a customer's site would carry it.
export async function shopServer(gatewayOrigin) {
  const server = createHttpServer((req, res) => {
    const page = `<!doctype html><html><head><meta charset="utf-8"><title>Another shop</title>
<script src="${gatewayOrigin()}/widget.js" async></script></head>
<body><h1>Another shop</h1></body></html>`;
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(page);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}

export async function launch() {
  // playwright-core gives each launch a fresh --user-data-dir of its own
  // (and refuses one passed in args), so no profile outlives a run.
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
}

// A page whose console errors, uncaught exceptions and CSP violations are
// collected, so a test can fail on them.
export async function newPage(browser, options = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, ...options });
  const page = await context.newPage();
  page.problems = [];
  page.on('pageerror', (e) => page.problems.push('exception: ' + e.message));
  page.on('console', (m) => {
    // A refused WebSocket while the gateway is down is expected noise.
    if (m.type() === 'error' && !/WebSocket|ERR_CONNECTION_REFUSED/.test(m.text())) {
      page.problems.push('console: ' + m.text());
    }
  });
  return page;
}

export function shot(page, name) {
  return page.screenshot({ path: join(ARTIFACTS, name + '.png') });
}
