// The agent console: one page, one WebSocket (kefu.v1.json), no build step.
//
// Everything shown is derived from the frames the gateway sends: a map of
// conversations (queued in the agent's groups, or assigned to the agent),
// each with its messages by seq. Sends wait in an outbox under their cid
// until their `ack`, and are sent again with the same cid after a
// reconnect, so a message is stored once however often the network drops.
// The data-testid attributes are a contract (docs/console.md).

import { Conn, newCid, wsUrl } from './conn.js';
import { t, translate } from './i18n.js';

const TOKEN_KEY = 'kefu.console.token';
const PRESENCE_KEY = 'kefu.console.presence';
const CAPACITY_KEY = 'kefu.console.capacity';
const HISTORY_PAGE = 50;
const TYPING_SHOW_MS = 3000;
const TYPING_SEND_MS = 1500;
// Until `connected` says the gateway's limit: its default
// messages.max_attachment_bytes (the gateway checks again: too_large).
const ATTACHMENT_BYTES_DEFAULT = 1024 * 1024;

const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  me: null,
  conn: null,
  convs: new Map(),
  openConv: null,
  agents: new Map(),
  canned: [],
  outbox: new Map(),
  sendIds: new Map(),
  historyIds: new Map(),
  resumeWaiting: new Set(),
  lastTypingSent: 0,
  typingTimer: null,
  cannedIndex: 0,
  attachmentBytesMax: ATTACHMENT_BYTES_DEFAULT,
  // From `connected.groups`: the groups this agent serves; null: all.
  groups: null,
};

function conv(id) {
  let c = state.convs.get(id);
  if (!c) {
    c = {
      conv: id, status: 'queued', agent: null, group: null, visitor: null, position: null,
      lastSeq: 0, msgs: new Map(), unread: 0, since: Date.now(), readBy: 0, typingUntil: 0,
      typingName: '', hasOlder: false, historyAsked: false,
    };
    state.convs.set(id, c);
  }
  return c;
}

// A waiting conversation in a queue this agent serves (a transfer to
// another group's queue is told to the agents who saw it wait, once).
function servedQueue(c) {
  return c.status === 'queued' && (!state.groups || !c.group || state.groups.has(c.group));
}

function isMine(c) {
  return c.status === 'assigned' && c.agent && state.me && c.agent.id === state.me.id;
}

function visitorName(c) {
  if (c.visitor) return c.visitor.name || c.visitor.id;
  for (const m of c.msgs.values()) if (m.from && m.from.role === 'visitor') return m.from.name;
  return c.conv;
}

function vipLevel(c) {
  const v = c.visitor && c.visitor.meta && c.visitor.meta.vip_level;
  return v && v !== '0' ? v : null;
}

// ---- connection ------------------------------------------------------

function hello() {
  const resume = {};
  state.resumeWaiting.clear();
  for (const c of state.convs.values()) {
    if (c.msgs.size > 0 && c.status !== 'closed') {
      resume[c.conv] = maxSeq(c);
      state.resumeWaiting.add(c.conv);
    }
  }
  const cmd = { type: 'connect', token: state.token };
  if (Object.keys(resume).length) cmd.resume = resume;
  return cmd;
}

function maxSeq(c) {
  let max = 0;
  for (const seq of c.msgs.keys()) if (typeof seq === 'number' && seq > max) max = seq;
  return max;
}

function setConnState(s) {
  const el = $('connection-state');
  el.dataset.state = s;
  el.textContent = t('state_' + s);
}

function start(token) {
  state.token = token;
  $('signin').hidden = true;
  $('app').hidden = false;
  state.conn = new Conn({
    url: wsUrl(location.origin),
    hello,
    onFrame,
    onState: (s, code, reason) => {
      setConnState(s);
      if (s === 'stopped') signOut(reason || String(code));
    },
  });
  state.conn.start();
}

function signOut(why) {
  localStorage.removeItem(TOKEN_KEY);
  if (state.conn) state.conn.stop();
  state.conn = null;
  state.convs.clear();
  state.openConv = null;
  $('app').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = why ? t('error', { msg: why }) : '';
}

function send(cmd) {
  return state.conn ? state.conn.send(cmd) : null;
}

// ---- frames ----------------------------------------------------------

function onFrame(f) {
  switch (f.type) {
    case 'connected': return onConnected(f);
    case 'conversation': return onConversation(f);
    case 'msg': return onMsg(f, true);
    case 'ack': return onAck(f);
    case 'history': return onHistory(f);
    case 'resumed': return onResumed(f.conv);
    case 'read': return onRead(f);
    case 'typing': return onTyping(f);
    case 'presence': return onPresence(f);
    case 'canned': state.canned = f.replies || []; return undefined;
    case 'error': return onError(f);
    default: return undefined;
  }
}

function onConnected(f) {
  if (f.role !== 'agent') {
    signOut('not an agent token');
    return;
  }
  localStorage.setItem(TOKEN_KEY, state.token);
  state.me = f.user;
  // The groups this agent serves (none listed: every group); an older
  // gateway does not say, and then every queued conversation it sends is kept.
  state.groups = Array.isArray(f.groups) && f.groups.length ? new Set(f.groups) : null;
  if (f.attachment_bytes_max) state.attachmentBytesMax = f.attachment_bytes_max;
  $('me').textContent = f.user.name || f.user.id;
  const listed = new Set();
  for (const s of f.conversations || []) {
    listed.add(s.conv);
    const c = conv(s.conv);
    c.status = s.status;
    c.lastSeq = s.last_seq;
    if (s.status === 'assigned' && !c.agent) c.agent = { id: state.me.id, name: state.me.name };
    // Only the agent's own are read at once: a long queue would be as many
    // commands at once (and rate-limited); a queued one is read when opened.
    if (!c.historyAsked && c.msgs.size === 0 && s.last_seq > 0 && s.status === 'assigned') askHistory(c);
  }
  // What went elsewhere while we were away is no longer ours to show,
  // except the conversation open in the pane.
  for (const [id, c] of state.convs) {
    if (!listed.has(id) && id !== state.openConv) state.convs.delete(id);
  }
  for (const id of state.resumeWaiting) if (!listed.has(id)) state.resumeWaiting.delete(id);
  const capacity = Number($('capacity').value) || 5;
  send({ type: 'presence', status: $('presence').value, capacity });
  send({ type: 'canned' });
  for (const [cid, item] of state.outbox) sendItem(cid, item);
  setConnState(state.resumeWaiting.size ? 'connected' : 'caught-up');
  render();
}

function onResumed(id) {
  state.resumeWaiting.delete(id);
  if (state.resumeWaiting.size === 0 && $('connection-state').dataset.state === 'connected') {
    setConnState('caught-up');
  }
}

function askHistory(c, before) {
  c.historyAsked = true;
  const cmd = { type: 'history', conv: c.conv, limit: HISTORY_PAGE };
  if (before) cmd.before = before;
  const id = send(cmd);
  if (id !== null) state.historyIds.set(id, cmd);
}

function onConversation(f) {
  const c = conv(f.conv);
  const wasMine = isMine(c);
  c.status = f.status;
  c.agent = f.agent || null;
  c.group = f.group || c.group;
  if (f.visitor) c.visitor = f.visitor;
  c.position = f.queue_position ?? null;
  c.stateSince = f.since ?? null;
  if (!c.historyAsked && c.msgs.size === 0 && (isMine(c) || c.conv === state.openConv)) askHistory(c);
  const gone = c.status === 'closed' || (c.status === 'assigned' && !isMine(c))
    || (c.status === 'queued' && !servedQueue(c));
  if (gone && c.conv !== state.openConv) state.convs.delete(c.conv);
  // Taking a conversation that is open in the pane: what it shows is read.
  if (!wasMine && isMine(c) && state.openConv === c.conv && maxSeq(c) > 0) {
    send({ type: 'read', conv: c.conv, seq: maxSeq(c) });
  }
  if (!wasMine && isMine(c) && state.openConv === null) openConv(c.conv);
  render();
}

function onMsg(m, live) {
  const c = conv(m.conv);
  if (m.seq > c.lastSeq) c.lastSeq = m.seq;
  const fresh = !c.msgs.has(m.seq);
  // Our own send, echoed by a resume or another tab: it replaces the pending copy.
  if (m.cid && c.msgs.has('cid:' + m.cid)) c.msgs.delete('cid:' + m.cid);
  c.msgs.set(m.seq, m);
  if (live && fresh && m.from.role === 'visitor') {
    const looking = state.openConv === m.conv && document.visibilityState === 'visible';
    if (looking) {
      send({ type: 'read', conv: m.conv, seq: m.seq });
    } else {
      c.unread += 1;
      notify(c, m);
    }
    c.typingUntil = 0;
  }
  render();
}

function onAck(f) {
  const item = state.outbox.get(f.cid);
  if (!item) return;
  state.outbox.delete(f.cid);
  const c = conv(f.conv);
  c.msgs.delete('cid:' + f.cid);
  if (!c.msgs.has(f.seq)) {
    c.msgs.set(f.seq, {
      conv: f.conv, seq: f.seq, cid: f.cid, ts: f.ts,
      from: { role: 'agent', id: state.me.id, name: state.me.name },
      text: item.text, attachment: item.attachment,
    });
  }
  if (f.seq > c.lastSeq) c.lastSeq = f.seq;
  render();
}

function onHistory(f) {
  state.historyIds.delete(f.id);
  const c = conv(f.conv);
  for (const m of f.messages) onMsg(m, false);
  const lowest = f.messages.length ? f.messages[0].seq : 1;
  // A page of big attachments is cut by bytes before `limit`: a short page
  // is not the start, seq 1 (or an empty page) is.
  c.hasOlder = lowest > 1;
  render();
}

function onRead(f) {
  if (state.me && f.by === state.me.id) return;
  const c = conv(f.conv);
  c.readBy = Math.max(c.readBy, f.seq);
  render();
}

function onTyping(f) {
  if (state.me && f.by === state.me.id) return;
  const c = state.convs.get(f.conv);
  if (!c) return;
  c.typingUntil = Date.now() + TYPING_SHOW_MS;
  c.typingName = visitorName(c);
  renderTyping();
  setTimeout(renderTyping, TYPING_SHOW_MS + 50);
}

function onPresence(f) {
  const known = state.agents.get(f.agent);
  state.agents.set(f.agent, { status: f.status, name: f.name || (known && known.name) || f.agent });
  if (state.me && f.agent === state.me.id && f.id !== undefined) $('presence').value = f.status;
  if ($('transfer-dialog').open) renderTransferChoices();
}

function onError(f) {
  const asked = state.historyIds.get(f.id);
  if (asked) {
    state.historyIds.delete(f.id);
    if (f.code === 'rate_limited' || f.code === 'unavailable') {
      setTimeout(() => {
        const id = send(asked);
        if (id !== null) state.historyIds.set(id, asked);
      }, 1000);
      return;
    }
  }
  const cid = state.sendIds.get(f.id);
  if (cid !== undefined) {
    state.sendIds.delete(f.id);
    const item = state.outbox.get(cid);
    if (item && (f.code === 'rate_limited' || f.code === 'unavailable')) {
      setTimeout(() => state.outbox.has(cid) && sendItem(cid, item), 1000);
      return;
    }
    state.outbox.delete(cid);
    if (item) {
      const m = conv(item.conv).msgs.get('cid:' + cid);
      if (m) m.failed = f.message;
    }
  }
  toast(t('error', { msg: f.message || f.code }));
  render();
}

// ---- actions ---------------------------------------------------------

function sendItem(cid, item) {
  const cmd = { type: 'send', conv: item.conv, cid };
  if (item.text) cmd.text = item.text;
  if (item.attachment) cmd.attachment = item.attachment;
  const id = send(cmd);
  if (id !== null) state.sendIds.set(id, cid);
}

function submit(text, attachment) {
  const c = state.convs.get(state.openConv);
  if (!c || (!text && !attachment)) return;
  const cid = newCid();
  const item = { conv: c.conv, text, attachment };
  state.outbox.set(cid, item);
  c.msgs.set('cid:' + cid, {
    conv: c.conv, seq: null, cid, ts: Date.now(), pending: true,
    from: { role: 'agent', id: state.me.id, name: state.me.name }, text, attachment,
  });
  sendItem(cid, item);
  render();
}

function openConv(id) {
  state.openConv = id;
  const c = state.convs.get(id);
  if (c) {
    c.unread = 0;
    const seq = maxSeq(c);
    if (seq > 0 && c.status !== 'queued') send({ type: 'read', conv: id, seq });
    if (!c.historyAsked) askHistory(c);
  }
  closeCanned();
  render();
  $('composer').focus();
}

function closePane() {
  state.openConv = null;
  closeCanned();
  render();
}

function notify(c, m) {
  updateTitle();
  if (!('Notification' in window) || Notification.permission !== 'granted') return;
  if (document.visibilityState === 'visible' && state.openConv === c.conv) return;
  const n = new Notification(t('newMessage', { name: m.from.name }), { body: m.text || '', tag: c.conv });
  n.onclick = () => {
    window.focus();
    openConv(c.conv);
  };
}

function askNotifications() {
  if ('Notification' in window && Notification.permission === 'default') Notification.requestPermission();
}

function toast(text) {
  const el = document.createElement('div');
  el.className = 'toast';
  el.setAttribute('role', 'alert');
  el.textContent = text;
  document.body.append(el);
  setTimeout(() => el.remove(), 4000);
}

// ---- rendering -------------------------------------------------------

function updateTitle() {
  let unread = 0;
  for (const c of state.convs.values()) unread += c.unread;
  document.title = (unread ? `(${unread}) ` : '') + t('title');
}

function ago(ms) {
  const s = Math.max(0, Math.floor((Date.now() - ms) / 1000));
  if (s < 60) return s + 's';
  if (s < 3600) return Math.floor(s / 60) + 'm';
  return Math.floor(s / 3600) + 'h' + (Math.floor(s / 60) % 60) + 'm';
}

// Since when a queued conversation waits: the gateway says (`since`); an
// older gateway does not, and then its earliest message in view or when
// this console first saw it stands in.
function firstTs(c) {
  if (c.stateSince) return c.stateSince;
  let ts = c.since;
  for (const m of c.msgs.values()) if (m.ts && m.ts < ts) ts = m.ts;
  return ts;
}

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k === 'className') e.className = v;
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v);
  }
  e.append(...children.filter((x) => x !== null && x !== undefined));
  return e;
}

function render() {
  renderLists();
  renderPane();
  renderProfile();
  updateTitle();
}

function renderLists() {
  const queued = [...state.convs.values()].filter(servedQueue);
  // The router's order: higher VIP first, then opening order (conversation ids grow).
  queued.sort((a, b) => (Number(vipLevel(b) || 0) - Number(vipLevel(a) || 0))
    || (Number(a.conv.slice(1)) - Number(b.conv.slice(1))));
  const q = $('queue');
  q.replaceChildren(...queued.map((c, i) => el('li', {
    className: 'item' + (c.conv === state.openConv ? ' active' : ''),
    'data-testid': 'queue-item', 'data-conv': c.conv, tabindex: '0',
  },
  el('span', { className: 'who', text: visitorName(c) }),
  vipLevel(c) ? el('span', { className: 'vip', 'data-testid': 'vip', text: t('vip', { n: vipLevel(c) }) }) : null,
  el('span', { className: 'pos', 'data-testid': 'queue-position', text: t('position', { n: c.position || i + 1 }) }),
  el('span', { className: 'wait', text: t('waiting', { t: ago(firstTs(c)) }) }))));
  $('queue-count').textContent = queued.length ? String(queued.length) : '';
  $('queue-empty').hidden = queued.length > 0;

  const mine = [...state.convs.values()].filter(isMine);
  mine.sort((a, b) => b.lastSeq - a.lastSeq);
  $('mine').replaceChildren(...mine.map((c) => {
    const last = lastMessage(c);
    return el('li', {
      className: 'item' + (c.conv === state.openConv ? ' active' : ''),
      'data-testid': 'conversation-item', 'data-conv': c.conv, tabindex: '0',
    },
    el('span', { className: 'who', text: visitorName(c) }),
    vipLevel(c) ? el('span', { className: 'vip', text: t('vip', { n: vipLevel(c) }) }) : null,
    c.unread ? el('span', { className: 'unread', 'data-testid': 'unread', text: String(c.unread) }) : null,
    el('span', { className: 'last', text: last ? (last.text || t('attach')) : '' }));
  }));
  $('mine-empty').hidden = mine.length > 0;
}

function lastMessage(c) {
  let best = null;
  for (const m of c.msgs.values()) if (!best || (m.seq ?? Infinity) >= (best.seq ?? Infinity)) best = m;
  return best;
}

function sortedMessages(c) {
  return [...c.msgs.values()].sort((a, b) => (a.seq ?? Infinity) - (b.seq ?? Infinity) || a.ts - b.ts);
}

function renderPane() {
  const c = state.convs.get(state.openConv);
  $('pick').hidden = Boolean(c);
  $('conv').hidden = !c;
  if (!c) {
    $('message-list').replaceChildren();
    return;
  }
  $('conv-title').textContent = visitorName(c);
  // A conversation moved to a queue this agent does not serve stays in the
  // pane if it was open there, but is not theirs to take or move: the
  // router would refuse both, and no more changes of it come here.
  const movedAway = c.status === 'queued' && !servedQueue(c);
  $('conv-status').textContent = movedAway ? t('movedTo', { group: c.group }) : t(c.status);
  $('conv-status').dataset.status = c.status;
  $('accept').hidden = !servedQueue(c);
  $('transfer').hidden = c.status === 'closed' || (c.status === 'assigned' && !isMine(c)) || movedAway;
  $('close').hidden = !isMine(c);
  $('compose').hidden = !isMine(c);
  $('older').hidden = !c.hasOlder;
  const list = $('message-list');
  const atBottom = list.parentElement.scrollHeight - list.parentElement.scrollTop - list.parentElement.clientHeight < 40;
  list.replaceChildren(...sortedMessages(c).map((m) => messageItem(c, m)));
  if (atBottom) list.parentElement.scrollTop = list.parentElement.scrollHeight;
  renderTyping();
}

function messageItem(c, m) {
  const mine = m.from.role === 'agent';
  let status = '';
  if (mine) status = m.pending ? 'pending' : (m.failed ? 'failed' : (m.seq <= c.readBy ? 'read' : 'sent'));
  const li = el('li', {
    className: 'msg ' + (mine ? 'mine' : m.from.role),
    'data-testid': 'message', 'data-from': m.from.role,
  });
  if (m.seq) li.dataset.seq = m.seq;
  if (status) li.dataset.state = status;
  if (m.text) li.append(el('div', { className: 'text', text: m.text }));
  if (m.attachment) li.append(attachmentView(m.attachment));
  const meta = [m.from.name, m.ts ? new Date(m.ts).toLocaleTimeString() : ''];
  if (status === 'pending') meta.push(t('pending'));
  if (status === 'read') meta.push(t('read'));
  if (status === 'failed') meta.push(m.failed);
  li.append(el('div', { className: 'meta', text: meta.filter(Boolean).join(' · ') }));
  return li;
}

function attachmentView(a) {
  if (a.mime && a.mime.startsWith('image/')) {
    const img = el('img', { className: 'preview', alt: a.mime, 'data-testid': 'attachment' });
    img.src = `data:${a.mime};base64,${a.data}`;
    return img;
  }
  return el('span', { className: 'file', text: a.mime });
}

function renderTyping() {
  const c = state.convs.get(state.openConv);
  const on = c && c.typingUntil > Date.now();
  $('typing').textContent = on ? t('typing', { name: c.typingName }) : '';
}

function renderProfile() {
  const c = state.convs.get(state.openConv);
  const dl = $('profile-meta');
  if (!c) {
    $('profile-name').textContent = '';
    dl.replaceChildren();
    return;
  }
  $('profile-name').textContent = visitorName(c);
  const meta = (c.visitor && c.visitor.meta) || {};
  const rows = Object.entries(meta).flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v })]);
  if (c.group) rows.unshift(el('dt', { text: t('group') }), el('dd', { text: c.group }));
  dl.replaceChildren(...rows);
}

// ---- canned replies --------------------------------------------------

function cannedMatches() {
  const v = $('composer').value;
  if (!v.startsWith('/')) return [];
  const q = v.slice(1).toLowerCase();
  return state.canned.filter((r) => r.name.toLowerCase().includes(q) || r.text.toLowerCase().includes(q));
}

function renderCanned() {
  const matches = cannedMatches();
  const ul = $('canned');
  ul.hidden = matches.length === 0;
  state.cannedIndex = Math.min(state.cannedIndex, Math.max(0, matches.length - 1));
  ul.replaceChildren(...matches.map((r, i) => {
    const li = el('li', {
      className: i === state.cannedIndex ? 'active' : '', 'data-testid': 'canned-item', 'data-name': r.name,
    }, el('strong', { text: '/' + r.name }), el('span', { text: r.text }));
    li.addEventListener('mousedown', (e) => {
      e.preventDefault();
      useCanned(r);
    });
    return li;
  }));
}

function useCanned(r) {
  $('composer').value = r.text;
  closeCanned();
}

function closeCanned() {
  $('canned').hidden = true;
  state.cannedIndex = 0;
}

// ---- transfer --------------------------------------------------------

function openTransfer() {
  if (!state.convs.get(state.openConv)) return;
  renderTransferChoices();
  $('transfer-group').value = '';
  $('transfer-dialog').showModal();
}

// The choices follow presence while the dialog is open: an agent who comes
// online appears, one who leaves goes.
function renderTransferChoices() {
  const c = state.convs.get(state.openConv);
  if (!c) return;
  const agents = [...state.agents].filter(([id, a]) => a.status === 'online' && id !== state.me.id);
  $('transfer-agents').replaceChildren(...(agents.length ? agents.map(([id, a]) => {
    const label = a.name === id ? id : `${a.name} (${id})`;
    const b = el('button', { type: 'button', 'data-testid': 'transfer-agent', 'data-agent': id, text: label });
    b.addEventListener('click', () => doTransfer(c.conv, id));
    return el('li', {}, b);
  }) : [el('li', { className: 'empty', text: t('noAgents') })]));
  const groups = new Set([...state.convs.values()].map((x) => x.group).filter(Boolean));
  $('transfer-groups').replaceChildren(...[...groups].map((g) => {
    const b = el('button', { type: 'button', 'data-testid': 'transfer-group-choice', text: g });
    b.addEventListener('click', () => doTransfer(c.conv, 'group:' + g));
    return el('li', {}, b);
  }));
}

function doTransfer(id, to) {
  send({ type: 'transfer', conv: id, to });
  $('transfer-dialog').close();
}

// ---- wiring ----------------------------------------------------------

function wire() {
  translate(document);
  $('presence').value = localStorage.getItem(PRESENCE_KEY) || 'online';
  $('capacity').value = localStorage.getItem(CAPACITY_KEY) || '5';
  $('signin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    askNotifications();
    const token = $('token-input').value.trim();
    if (token) start(token);
  });
  $('signout').addEventListener('click', () => signOut());
  const presence = () => {
    localStorage.setItem(PRESENCE_KEY, $('presence').value);
    localStorage.setItem(CAPACITY_KEY, $('capacity').value);
    askNotifications();
    send({ type: 'presence', status: $('presence').value, capacity: Number($('capacity').value) || 5 });
  };
  $('presence').addEventListener('change', presence);
  $('capacity').addEventListener('change', presence);
  for (const list of [$('queue'), $('mine')]) {
    list.addEventListener('click', (e) => {
      const li = e.target.closest('li[data-conv]');
      if (li) openConv(li.dataset.conv);
    });
    list.addEventListener('keydown', (e) => {
      const li = e.target.closest('li[data-conv]');
      if (li && e.key === 'Enter') openConv(li.dataset.conv);
    });
  }
  $('accept').addEventListener('click', () => send({ type: 'accept', conv: state.openConv }));
  $('close').addEventListener('click', () => send({ type: 'close', conv: state.openConv }));
  $('transfer').addEventListener('click', openTransfer);
  $('transfer-form').addEventListener('submit', (e) => {
    const group = $('transfer-group').value.trim();
    if (e.submitter && e.submitter.value === 'go' && group) doTransfer(state.openConv, 'group:' + group);
  });
  $('older').addEventListener('click', () => {
    const c = state.convs.get(state.openConv);
    if (c) askHistory(c, Math.min(...[...c.msgs.keys()].filter((k) => typeof k === 'number')));
  });
  $('compose').addEventListener('submit', (e) => {
    e.preventDefault();
    sendComposer();
  });
  const composer = $('composer');
  composer.addEventListener('keydown', (e) => {
    const matches = $('canned').hidden ? [] : cannedMatches();
    if (matches.length && (e.key === 'ArrowDown' || e.key === 'ArrowUp')) {
      e.preventDefault();
      state.cannedIndex = (state.cannedIndex + (e.key === 'ArrowDown' ? 1 : matches.length - 1)) % matches.length;
      renderCanned();
      return;
    }
    if (matches.length && (e.key === 'Enter' || e.key === 'Tab') && !e.shiftKey) {
      e.preventDefault();
      useCanned(matches[state.cannedIndex]);
      return;
    }
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendComposer();
    }
  });
  composer.addEventListener('input', () => {
    renderCanned();
    typing();
  });
  $('file').addEventListener('change', async () => {
    const file = $('file').files[0];
    $('file').value = '';
    if (!file) return;
    if (file.size > state.attachmentBytesMax) {
      toast(t('tooLarge', { n: Math.floor(state.attachmentBytesMax / 1024) }));
      return;
    }
    const data = await toBase64(file);
    submit('', { mime: file.type || 'application/octet-stream', data });
  });
  document.addEventListener('keydown', (e) => {
    if (e.key !== 'Escape') return;
    if (!$('canned').hidden) closeCanned();
    else if ($('transfer-dialog').open) return;
    else closePane();
  });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && state.openConv) openConv(state.openConv);
  });
  setInterval(renderLists, 10000);

  const fromLink = new URLSearchParams(location.hash.slice(1)).get('token');
  if (fromLink) history.replaceState(null, '', location.pathname + location.search);
  const token = fromLink || localStorage.getItem(TOKEN_KEY);
  if (token) start(token);
  else $('signin').hidden = false;
}

// Tells the visitor the agent is typing, at most every TYPING_SEND_MS; a
// keystroke inside that interval is told at its end, so typing that goes
// on is never left unannounced.
function typing() {
  if (state.typingTimer) return;
  const wait = state.lastTypingSent + TYPING_SEND_MS - Date.now();
  if (wait > 0) {
    state.typingTimer = setTimeout(() => {
      state.typingTimer = null;
      typing();
    }, wait);
    return;
  }
  if (state.openConv && $('composer').value && !$('compose').hidden) {
    state.lastTypingSent = Date.now();
    send({ type: 'typing', conv: state.openConv });
  }
}

function sendComposer() {
  const text = $('composer').value;
  if (!text.trim()) return;
  $('composer').value = '';
  closeCanned();
  submit(text, null);
}

function toBase64(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).split(',', 2)[1] || '');
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

wire();
