// The agent console and the visitor widget in headless Chromium, against
// the real kefu binary: the flows of issue 9, each step checked on the
// page through the data-testid contract (docs/console.md).
//
// Run by tools/browser-test.sh (node --test). One gateway serves the whole
// file (auto-assign off, so the queue and `accept` are visible); the pages
// live across tests, as a visitor and agents would keep them open.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { Gateway, launch, newPage, shopServer, shot } from './harness.mjs';

const TIMEOUT_MS = 15000;

// Waits until `fn` returns a truthy value (or throws its last failure).
async function eventually(fn, what, timeoutMs = TIMEOUT_MS) {
  const end = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
      last = new Error('still false');
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${last && last.message}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const texts = (locator) => locator.allTextContents();
const count = async (locator, text) => (await texts(locator)).filter((t) => t.includes(text)).length;

// The gateway's attachment limit in these tests (smaller than its default,
// so that the widget's check is seen to follow the gateway's).
const ATTACHMENT_BYTES_MAX = 100000;

// The business system's key for the control plane (SyncUser).
const API_KEY = 'browser-test-key-0123456789';

// A 1×1 PNG.
const PNG = Buffer.from(
  'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==',
  'base64',
);

// The JSON commands of `type` a page sends on its WebSockets, as they go.
function sentCommands(page, type) {
  const seen = [];
  page.on('websocket', (ws) => ws.on('framesent', (frame) => {
    if (typeof frame.payload !== 'string') return;
    try {
      const cmd = JSON.parse(frame.payload);
      if (cmd.type === type) seen.push(cmd);
    } catch {
      // not JSON: not a command of this protocol
    }
  }));
  return seen;
}

// Every send's cid is lowercase hex, which the store packs at 4 bits a
// symbol (storage/src/cid.rs), where other letters take 6.
function hexCids(sends) {
  assert.ok(sends.length > 0, 'no send seen');
  for (const s of sends) assert.match(s.cid, /^[0-9a-f]{16,}$/, JSON.stringify(s));
}

function noProblems(...pages) {
  for (const p of pages) assert.deepEqual(p.problems, [], 'the page logged errors (CSP violations included)');
}

describe('console and widget in Chromium', () => {
  let gw;
  let browser;
  let visitor;
  let agent;
  let agent2;
  let conv;
  let wroteAt;
  let shop;
  let stranger;

  before(async () => {
    // Two other sites embed the widget; only `shop` is allowed to connect.
    shop = await shopServer(() => gw.origin);
    stranger = await shopServer(() => gw.origin);
    gw = new Gateway({
      KEFU_SERVER_ALLOWED_ORIGINS: JSON.stringify([shop.origin]),
      KEFU_ROUTING_AUTO_ASSIGN: 'false',
      KEFU_MESSAGES_MAX_ATTACHMENT_BYTES: String(ATTACHMENT_BYTES_MAX),
      KEFU_ADMIN_API_KEYS: JSON.stringify([API_KEY]),
    });
    await gw.start();
    browser = await launch();
  });

  after(async () => {
    shop.server.close();
    stranger.server.close();
    if (browser) await browser.close();
    if (gw) await gw.stop();
  });

  test('the printed console link signs in the default agent', async () => {
    const link = gw.consoleLink();
    assert.ok(link, 'the start log has a console link:\n' + gw.log.join('\n'));
    assert.ok(gw.log.some((l) => l.includes(`${gw.origin}/demo`)), 'the start log has the demo link');
    const page = await newPage(browser);
    await page.goto(link);
    const state = page.getByTestId('connection-state');
    await eventually(async () => (await state.getAttribute('data-state')) === 'caught-up', 'caught up');
    // The token left the address bar once read.
    assert.ok(!page.url().includes('token='), page.url());
    await eventually(async () => (await page.locator('#me').textContent()) === 'Agent', 'the agent name');
    noProblems(page);
    await page.context().close();
  });

  test('a visitor on /demo opens the widget and writes', async () => {
    visitor = await newPage(browser);
    const sends = sentCommands(visitor, 'send');
    await visitor.goto(`${gw.origin}/demo`);
    const vip = gw.token('visitor', 'v-wang', '--name', 'Wang Fang', '--meta', 'vip_level=3', '--meta', 'orders=12');
    await visitor.evaluate((token) => window.kefu('identify', token), vip);
    await visitor.getByTestId('kefu-launcher').click();
    const input = visitor.getByTestId('kefu-input');
    await input.fill('Hello, my tea has not arrived');
    await input.press('Enter');
    wroteAt = Date.now();
    const mine = visitor.getByTestId('kefu-message').filter({ hasText: 'my tea has not arrived' });
    await eventually(async () => (await mine.getAttribute('data-state')) === 'sent', 'the ack');
    hexCids(sends);
    // The default agent's page has gone: nobody is online to answer.
    const status = visitor.getByTestId('kefu-status');
    await eventually(async () => (await status.getAttribute('data-kind')) === 'offline', 'the offline notice');
    assert.match(await status.textContent(), /No agent is online/);
    await shot(visitor, 'widget-offline');
    noProblems(visitor);
  });

  test('the agent sees the queue with the VIP badge, accepts, sees the profile and replies', async () => {
    // The visitor has waited a while before this agent arrives.
    await new Promise((r) => setTimeout(r, Math.max(0, wroteAt + 3000 - Date.now())));
    agent = await newPage(browser);
    const sends = sentCommands(agent, 'send');
    // Desktop notifications allowed, and counted.
    await agent.context().grantPermissions(['notifications'], { origin: gw.origin });
    await agent.addInitScript(() => {
      const Real = window.Notification;
      window.__notified = [];
      window.Notification = class extends Real {
        constructor(title, options) {
          super(title, options);
          window.__notified.push(options && options.body);
        }
      };
      window.Notification.requestPermission = Real.requestPermission.bind(Real);
      Object.defineProperty(window.Notification, 'permission', { get: () => Real.permission });
    });
    await agent.goto(`${gw.origin}/console#token=${gw.token('agent', 'a1', '--name', 'Alice')}`);
    // Away: the queue is visible whatever the presence.
    await agent.getByTestId('presence').selectOption('away');
    const item = agent.getByTestId('queue-item').filter({ hasText: 'Wang Fang' });
    await item.waitFor({ timeout: TIMEOUT_MS });
    assert.match(await item.textContent(), /VIP 3/);
    // Waiting since it was opened (before this console existed), not since
    // the console saw it.
    const waited = Number((await item.textContent()).match(/waiting (\d+)s/)[1]);
    assert.ok(waited >= Math.floor((Date.now() - wroteAt) / 1000) - 1 && waited >= 2, `waiting ${waited}s`);
    conv = await item.getAttribute('data-conv');
    await agent.getByTestId('presence').selectOption('online');
    // An agent is online now: the visitor sees their place in the queue.
    const status = visitor.getByTestId('kefu-status');
    await eventually(async () => /number 1 in line/.test(await status.textContent()), 'queue position 1');
    await shot(visitor, 'widget-queued');
    await item.click();
    await agent.getByTestId('message').filter({ hasText: 'my tea has not arrived' }).waitFor({ timeout: TIMEOUT_MS });
    await eventually(async () => /vip_level\s*3/.test(await agent.getByTestId('visitor-meta').innerText()), 'VIP meta');
    assert.match(await agent.getByTestId('visitor-meta').innerText(), /orders\s*12/);
    await agent.getByTestId('accept').click();
    await agent.getByTestId('conversation-item').filter({ hasText: 'Wang Fang' }).waitFor({ timeout: TIMEOUT_MS });
    await eventually(async () => (await agent.getByTestId('queue-item').count()) === 0, 'the queue empties');
    const composer = agent.getByTestId('composer');
    // Shift+Enter is a newline, Enter sends.
    await composer.fill('Hi Wang,');
    await composer.press('Shift+Enter');
    await composer.pressSequentially('let me check your order.');
    assert.equal(await agent.getByTestId('message').count(), 1, 'nothing sent yet');
    await composer.press('Enter');
    const reply = agent.getByTestId('message').filter({ hasText: 'let me check' });
    await reply.waitFor({ timeout: TIMEOUT_MS });
    assert.equal(await reply.locator('.text').textContent(), 'Hi Wang,\nlet me check your order.');
    hexCids(sends);
    noProblems(agent);
  });

  test('a profile synced by the business system shows in the console', async () => {
    await gw.api('PUT', '/api/v1/users/visitor/v-wang', API_KEY, { meta: { plan: 'gold', vip_level: '4' } });
    const meta = agent.getByTestId('visitor-meta');
    await eventually(async () => /plan\s*gold/.test(await meta.innerText()), 'the synced meta');
    assert.match(await meta.innerText(), /vip_level\s*4/);
    assert.match(await meta.innerText(), /orders\s*12/, "the token's other keys stay");
    noProblems(agent);
  });

  test('the visitor sees the reply, the agent, and both read states', async () => {
    await visitor.getByTestId('kefu-message').filter({ hasText: 'let me check' }).waitFor({ timeout: TIMEOUT_MS });
    await eventually(async () => /Alice/.test(await visitor.getByTestId('kefu-status').textContent()), 'the agent named');
    // The agent had the conversation open: the visitor's message is read.
    const mine = visitor.getByTestId('kefu-message').filter({ hasText: 'my tea has not arrived' });
    await eventually(async () => (await mine.getAttribute('data-state')) === 'read', 'read by the agent');
    // And the widget is open, so the reply is read too.
    const reply = agent.getByTestId('message').filter({ hasText: 'let me check' });
    await eventually(async () => (await reply.getAttribute('data-state')) === 'read', 'read by the visitor');
    // Typing shows on the other side.
    await visitor.getByTestId('kefu-input').pressSequentially('one mo');
    await eventually(async () => /typing/.test(await agent.locator('#typing').textContent()), 'typing indicator');
    await visitor.getByTestId('kefu-input').fill('');
    await agent.getByTestId('composer').pressSequentially('checking');
    await eventually(async () => /typing/.test(await visitor.locator('#kefu-widget .typing').textContent()), 'agent typing');
    await agent.getByTestId('composer').fill('');
    await shot(agent, 'console-chat');
    await shot(visitor, 'widget-chat');
    noProblems(visitor, agent);
  });

  test('the visitor reloads and keeps the history', async () => {
    await visitor.reload();
    await visitor.getByTestId('kefu-launcher').click();
    const msgs = visitor.getByTestId('kefu-message');
    await msgs.filter({ hasText: 'let me check' }).waitFor({ timeout: TIMEOUT_MS });
    assert.equal(await count(msgs, 'my tea has not arrived'), 1);
    assert.equal(await count(msgs, 'let me check'), 1);
    noProblems(visitor);
  });

  test('kill -9 and restart: both pages reconnect, a message typed meanwhile is delivered once', async () => {
    await gw.kill9();
    const state = agent.getByTestId('connection-state');
    await eventually(async () => (await state.getAttribute('data-state')) === 'reconnecting', 'console reconnecting');
    const input = visitor.getByTestId('kefu-input');
    await input.fill('typed while you were down');
    await input.press('Enter');
    const pending = visitor.getByTestId('kefu-message').filter({ hasText: 'typed while you were down' });
    assert.equal(await pending.getAttribute('data-state'), 'pending');
    await gw.start();
    await eventually(async () => (await state.getAttribute('data-state')) === 'caught-up', 'console caught up', 30000);
    await eventually(async () => ['sent', 'read'].includes(await pending.getAttribute('data-state')), 'the ack', 30000);
    const seen = agent.getByTestId('message');
    await seen.filter({ hasText: 'typed while you were down' }).waitFor({ timeout: TIMEOUT_MS });
    // Catching up both ways: the agent answers, the visitor sees it.
    await agent.getByTestId('composer').fill('Back online.');
    await agent.getByTestId('composer').press('Enter');
    await visitor.getByTestId('kefu-message').filter({ hasText: 'Back online.' }).waitFor({ timeout: TIMEOUT_MS });
    // Once, on both sides, and nothing before it was repeated.
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(await count(seen, 'typed while you were down'), 1);
    assert.equal(await count(seen, 'my tea has not arrived'), 1);
    assert.equal(await count(visitor.getByTestId('kefu-message'), 'typed while you were down'), 1);
    assert.equal(await count(visitor.getByTestId('kefu-message'), 'let me check'), 1);
    noProblems(visitor, agent);
  });

  test('a message left pending when the page is closed is sent once when the visitor comes back', async () => {
    await gw.kill9();
    const input = visitor.getByTestId('kefu-input');
    await input.fill('typed, then the page reloaded');
    await input.press('Enter');
    const pending = visitor.getByTestId('kefu-message').filter({ hasText: 'typed, then the page reloaded' });
    assert.equal(await pending.getAttribute('data-state'), 'pending');
    // The visitor leaves (the page is gone with the gateway down), and
    // comes back once it is up: the stored outbox sends it.
    await visitor.goto('about:blank');
    await gw.start();
    await visitor.goto(`${gw.origin}/demo`);
    await visitor.getByTestId('kefu-launcher').click();
    await pending.waitFor({ timeout: TIMEOUT_MS });
    await eventually(async () => ['sent', 'read'].includes(await pending.getAttribute('data-state')), 'the ack', 30000);
    await agent.getByTestId('message').filter({ hasText: 'typed, then the page reloaded' }).waitFor({ timeout: TIMEOUT_MS });
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(await count(agent.getByTestId('message'), 'typed, then the page reloaded'), 1);
    assert.equal(await count(visitor.getByTestId('kefu-message'), 'typed, then the page reloaded'), 1);
    assert.equal(await count(visitor.getByTestId('kefu-message'), 'my tea has not arrived'), 1);
    noProblems(visitor, agent);
  });

  test('an image goes both ways', async () => {
    await visitor.getByTestId('kefu-file').setInputFiles({ name: 'receipt.png', mimeType: 'image/png', buffer: PNG });
    const img = agent.getByTestId('message').locator('img[data-testid="attachment"]');
    await img.first().waitFor({ timeout: TIMEOUT_MS });
    assert.ok((await img.first().getAttribute('src')).startsWith('data:image/png;base64,'));
    await agent.locator('#file').setInputFiles({ name: 'label.png', mimeType: 'image/png', buffer: PNG });
    await visitor.locator('[data-testid="kefu-attachment"]').nth(1).waitFor({ timeout: TIMEOUT_MS });
    // Larger than the gateway's limit: refused in the widget, nothing sent.
    const before = await visitor.getByTestId('kefu-message').count();
    const big = Buffer.concat([PNG, Buffer.alloc(ATTACHMENT_BYTES_MAX)]);
    await visitor.getByTestId('kefu-file').setInputFiles({ name: 'huge.png', mimeType: 'image/png', buffer: big });
    await eventually(async () => /at most 97 KB/.test(await visitor.getByTestId('kefu-status').textContent()), 'size check');
    assert.equal(await visitor.getByTestId('kefu-message').count(), before);
    noProblems(visitor, agent);
  });

  test('canned replies come from config behind /', async () => {
    const composer = agent.getByTestId('composer');
    await composer.fill('/greet');
    const choice = agent.getByTestId('canned-item').filter({ hasText: 'greeting' });
    await choice.waitFor({ timeout: TIMEOUT_MS });
    await composer.press('Enter');
    assert.match(await composer.inputValue(), /How can I help/);
    await composer.press('Enter');
    await visitor.getByTestId('kefu-message').filter({ hasText: 'How can I help' }).waitFor({ timeout: TIMEOUT_MS });
    noProblems(agent);
  });

  test('a transfer to a second agent, then close', async () => {
    agent2 = await newPage(browser);
    await agent2.goto(`${gw.origin}/console#token=${gw.token('agent', 'b2', '--name', 'Bob')}`);
    await agent2.getByTestId('presence').selectOption('online');
    await agent.getByTestId('transfer').click();
    const bob = agent.locator('[data-testid="transfer-agent"][data-agent="b2"]');
    await bob.waitFor({ timeout: TIMEOUT_MS });
    assert.equal(await bob.textContent(), 'Bob (b2)', 'listed by name');
    await bob.click();
    const item = agent2.locator(`[data-testid="conversation-item"][data-conv="${conv}"]`);
    await item.waitFor({ timeout: TIMEOUT_MS });
    await eventually(async () => (await agent.getByTestId('conversation-item').count()) === 0, 'gone from Alice');
    await eventually(async () => /Bob/.test(await visitor.getByTestId('kefu-status').textContent()), 'Bob named');
    await item.click();
    await agent2.getByTestId('message').filter({ hasText: 'my tea has not arrived' }).waitFor({ timeout: TIMEOUT_MS });
    await agent2.getByTestId('close').click();
    await eventually(async () => /ended/.test(await visitor.getByTestId('kefu-status').textContent()), 'closed');
    noProblems(visitor, agent, agent2);
  });

  test('another conversation: unread count, title badge, notification; Esc closes the pane', async () => {
    const other = await newPage(browser);
    await other.goto(`${gw.origin}/demo`);
    await other.getByTestId('kefu-launcher').click();
    await other.getByTestId('kefu-input').fill('Is the Longjing in stock?');
    await other.getByTestId('kefu-input').press('Enter');
    // Alice takes it, then closes the pane with Esc.
    const item = agent.getByTestId('queue-item').filter({ hasText: 'Visitor' });
    await item.waitFor({ timeout: TIMEOUT_MS });
    const second = await item.getAttribute('data-conv');
    await item.click();
    await agent.getByTestId('accept').click();
    const mine = agent.locator(`[data-testid="conversation-item"][data-conv="${second}"]`);
    await mine.waitFor({ timeout: TIMEOUT_MS });
    await agent.keyboard.press('Escape');
    await agent.locator('#pick').waitFor({ timeout: TIMEOUT_MS });
    assert.equal(await agent.getByTestId('message').count(), 0, 'no conversation open');
    // A message in a conversation not in view: counted, in the title, notified.
    await other.getByTestId('kefu-input').fill('Hello? Anyone?');
    await other.getByTestId('kefu-input').press('Enter');
    await eventually(async () => (await mine.getByTestId('unread').textContent()) === '1', 'unread 1');
    assert.match(await agent.title(), /^\(1\) /);
    assert.deepEqual(await agent.evaluate(() => window.__notified), ['Hello? Anyone?']);
    // Opening it reads it.
    await mine.click();
    await eventually(async () => !/^\(/.test(await agent.title()), 'title badge gone');
    assert.equal(await mine.getByTestId('unread').count(), 0);
    const asked = other.getByTestId('kefu-message').filter({ hasText: 'Hello? Anyone?' });
    await eventually(async () => (await asked.getAttribute('data-state')) === 'read', 'read by Alice');
    // History pages: 55 more messages, then the console reloads and pages back.
    for (let i = 1; i <= 55; i++) {
      await other.getByTestId('kefu-input').fill(`line ${i}`);
      await other.getByTestId('kefu-input').press('Enter');
    }
    const last = other.getByTestId('kefu-message').filter({ hasText: 'line 55' });
    await eventually(async () => ['sent', 'read'].includes(await last.getAttribute('data-state')), 'all acked', 30000);
    await agent.reload();
    await mine.click();
    await agent.getByTestId('message').filter({ hasText: 'line 55' }).waitFor({ timeout: TIMEOUT_MS });
    assert.equal(await agent.getByTestId('message').count(), 50, 'the newest page');
    await agent.locator('#older').click();
    await eventually(async () => (await agent.getByTestId('message').count()) === 57, 'all 57 after paging');
    assert.equal(await count(agent.getByTestId('message'), 'Is the Longjing in stock?'), 1);
    assert.match(await agent.getByTestId('visitor-meta').innerText(), /Visitor/, 'the profile after a reload');
    // Back to its group's queue: gone from Alice's own, waiting again.
    await agent.getByTestId('transfer').click();
    await agent.getByTestId('transfer-group').fill('default');
    await agent.getByTestId('transfer-confirm').click();
    await agent.locator(`[data-testid="queue-item"][data-conv="${second}"]`).waitFor({ timeout: TIMEOUT_MS });
    assert.equal(await mine.count(), 0);
    await agent.locator(`[data-testid="queue-item"][data-conv="${second}"]`).click();
    await agent.getByTestId('accept').click();
    await mine.waitFor({ timeout: TIMEOUT_MS });
    await other.context().close();
    noProblems(agent);
  });

  test('a waiting conversation moved to another group leaves the queue of agents who do not serve it', async () => {
    const console = async (sub, group) => {
      const page = await newPage(browser);
      await page.goto(`${gw.origin}/console#token=${gw.token('agent', sub, '--group', group)}`);
      const state = page.getByTestId('connection-state');
      await eventually(async () => (await state.getAttribute('data-state')) === 'caught-up', `${sub} caught up`);
      return page;
    };
    const [s1, s2, b1] = [await console('s1', 'sales'), await console('s2', 'sales'), await console('b1', 'billing')];
    // A visitor of another site's widget, in a few lines: waits in sales.
    const v = await newPage(browser);
    await v.goto(`${gw.origin}/demo`);
    const waiting = await v.evaluate(() => new Promise((resolve, reject) => {
      const ws = new WebSocket(`ws://${location.host}/ws`, 'kefu.v1.json');
      window.__ws = ws;
      ws.onopen = () => ws.send(JSON.stringify({ type: 'connect', id: 1 }));
      ws.onmessage = (e) => {
        const f = JSON.parse(e.data);
        if (f.type === 'connected') ws.send(JSON.stringify({ type: 'open', id: 2, group: 'sales' }));
        if (f.type === 'conversation' && f.id === 2) resolve(f.conv);
        if (f.type === 'error') reject(new Error(e.data));
      };
    }));
    const item = (page) => page.locator(`[data-testid="queue-item"][data-conv="${waiting}"]`);
    await item(s1).waitFor({ timeout: TIMEOUT_MS });
    await item(s2).waitFor({ timeout: TIMEOUT_MS });
    assert.equal(await item(b1).count(), 0, 'billing does not see sales\' queue');
    // s1 moves it to billing: s2, who saw it wait and does not serve
    // billing, drops it; billing's agent sees it arrive.
    await item(s1).click();
    await s1.getByTestId('transfer').click();
    await s1.getByTestId('transfer-group').fill('billing');
    await s1.getByTestId('transfer-confirm').click();
    await item(b1).waitFor({ timeout: TIMEOUT_MS });
    await eventually(async () => (await item(s2).count()) === 0, 'gone from s2\'s queue');
    // s1 still has it open in the pane, but not in its queue, and it is
    // no longer s1's to take or move: the pane says where it went.
    await eventually(async () => (await item(s1).count()) === 0, 'gone from s1\'s queue');
    await eventually(async () => (await s1.locator('#conv-status').textContent()) === 'moved to billing',
      's1\'s pane says where it went');
    assert.equal(await s1.getByTestId('accept').isHidden(), true, 'no accept for another group\'s queue');
    assert.equal(await s1.getByTestId('transfer').isHidden(), true, 'no transfer either');
    await v.evaluate(() => window.__ws.close());
    noProblems(s1, s2, b1);
    for (const p of [s1, s2, b1, v]) await p.context().close();
  });

  test('the Chinese UI', async () => {
    const zhAgent = await newPage(browser, { locale: 'zh-CN' });
    await zhAgent.goto(`${gw.origin}/console#token=${gw.token('agent', 'c3', '--name', '小李')}`);
    const state = zhAgent.getByTestId('connection-state');
    await eventually(async () => (await state.textContent()) === '已同步', 'caught up in Chinese');
    assert.equal(await zhAgent.getByTestId('presence').locator('option[value="online"]').textContent(), '在线');
    assert.equal(await zhAgent.locator('html').getAttribute('lang'), 'zh-CN');
    const zhVisitor = await newPage(browser, { locale: 'zh-CN' });
    await zhVisitor.goto(`${gw.origin}/demo`);
    await zhVisitor.getByTestId('kefu-launcher').click();
    assert.equal(await zhVisitor.getByTestId('kefu-send').textContent(), '发送');
    await zhVisitor.getByTestId('kefu-input').fill('你好，请问有货吗？');
    await zhVisitor.getByTestId('kefu-input').press('Enter');
    await eventually(async () => /第 1 位/.test(await zhVisitor.getByTestId('kefu-status').textContent()), '排队位置');
    await zhAgent.getByTestId('queue-item').first().waitFor({ timeout: TIMEOUT_MS });
    await shot(zhAgent, 'console-zh');
    await shot(zhVisitor, 'widget-zh');
    noProblems(zhAgent, zhVisitor);
  });

  test('the widget on another site: allowed origins chat, others are refused', async () => {
    const page = await newPage(browser);
    await page.goto(shop.origin);
    await page.getByTestId('kefu-launcher').click();
    await page.getByTestId('kefu-input').fill('Hello from another shop');
    await page.getByTestId('kefu-input').press('Enter');
    const mine = page.getByTestId('kefu-message').filter({ hasText: 'Hello from another shop' });
    await eventually(async () => (await mine.getAttribute('data-state')) === 'sent', 'the ack');
    await shot(page, 'widget-other-site');
    noProblems(page);
    const refused = await newPage(browser);
    await refused.goto(stranger.origin);
    await refused.getByTestId('kefu-launcher').click();
    await refused.getByTestId('kefu-input').fill('Hello from a stranger');
    await refused.getByTestId('kefu-input').press('Enter');
    await new Promise((r) => setTimeout(r, 1500));
    const theirs = refused.getByTestId('kefu-message').filter({ hasText: 'Hello from a stranger' });
    assert.equal(await theirs.getAttribute('data-state'), 'pending', 'never connected');
    assert.match(await refused.getByTestId('kefu-status').textContent(), /connecting/i);
    await page.context().close();
    await refused.context().close();
  });

  test('the console fits a tablet', async () => {
    const tablet = await newPage(browser, { viewport: { width: 820, height: 1180 } });
    // Signed in by pasting a token this time.
    await tablet.goto(`${gw.origin}/console`);
    await tablet.getByTestId('token-input').fill(gw.token('agent', 'd4', '--name', 'Dee'));
    await tablet.getByTestId('signin').click();
    const state = tablet.getByTestId('connection-state');
    await eventually(async () => (await state.getAttribute('data-state')) === 'caught-up', 'caught up');
    await tablet.getByTestId('queue-item').first().waitFor({ timeout: TIMEOUT_MS });
    const width = await tablet.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 820, `no horizontal scroll on a tablet (${width}px)`);
    await shot(tablet, 'console-tablet');
    noProblems(tablet);
  });
});

describe("the README's first run: default configuration", () => {
  let gw;
  let browser;

  before(async () => {
    gw = new Gateway();
    await gw.start();
    browser = await launch();
  });

  after(async () => {
    if (browser) await browser.close();
    if (gw) await gw.stop();
  });

  test('the printed console link and the demo page chat with each other', async () => {
    const agent = await newPage(browser);
    await agent.goto(gw.consoleLink());
    const state = agent.getByTestId('connection-state');
    await eventually(async () => (await state.getAttribute('data-state')) === 'caught-up', 'caught up');
    const visitor = await newPage(browser);
    await visitor.goto(`${gw.origin}/demo`);
    await visitor.getByTestId('kefu-launcher').click();
    await visitor.getByTestId('kefu-input').fill('Do you ship to Shanghai?');
    await visitor.getByTestId('kefu-input').press('Enter');
    // Auto-assign gives it to the (online) default agent, whose console opens it.
    await agent.getByTestId('conversation-item').first().waitFor({ timeout: TIMEOUT_MS });
    await agent.getByTestId('message').filter({ hasText: 'Shanghai' }).waitFor({ timeout: TIMEOUT_MS });
    await agent.getByTestId('composer').fill('Yes, in two days.');
    await agent.getByTestId('composer').press('Enter');
    await visitor.getByTestId('kefu-message').filter({ hasText: 'in two days' }).waitFor({ timeout: TIMEOUT_MS });
    await eventually(async () => /Agent/.test(await visitor.getByTestId('kefu-status').textContent()), 'agent named');
    noProblems(agent, visitor);
  });
});
