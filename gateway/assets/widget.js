// kefu's visitor widget: one script tag, no dependencies.
//
//   <script src="https://kefu.example.com/widget.js" async></script>
//
// It draws a launcher and a chat panel inside an open shadow root (so the
// shop's CSS cannot reach in), connects to the gateway it was loaded from
// (kefu.v1.json over /ws), and speaks for one visitor:
// - anonymous by default: the gateway's visitor_id and visitor_key are kept
//   in localStorage, so a reload is the same visitor with the same history;
// - identified with kefu('identify', token), a JWT the shop's server mints;
// - every message waits in a stored outbox under its cid until its `ack`,
//   is shown as pending meanwhile, and is sent again with the same cid
//   after a dropped network, a reload or a gateway restart: the gateway
//   stores a cid once, so the agent never sees it twice.
// Options on the script tag: data-group (the skill group to ask for),
// data-token (an identity token), data-lang (en or zh), data-open (start
// opened). The data-testid attributes are a contract (docs/console.md).
(function () {
  'use strict';
  if (window.__kefuWidget) return;
  window.__kefuWidget = true;

  var script = document.currentScript;
  var base = new URL(script ? script.src : location.href);
  var WS_URL = (base.protocol === 'https:' ? 'wss://' : 'ws://') + base.host + '/ws';
  var STORE_KEY = 'kefu.widget.v1.' + base.host;
  // Until `connected` says the gateway's limit: its default
  // messages.max_attachment_bytes (the gateway checks again).
  var attachmentBytesMax = Number((script && script.dataset.maxAttachmentBytes) || 1048576);
  var HISTORY_PAGE = 50;
  var BACKOFF_MS = [250, 500, 1000, 2000, 4000];
  var TYPING_SEND_MS = 1500;
  var TYPING_SHOW_MS = 3000;
  var NOTICE_MS = 5000;

  var WORDS = {
    en: {
      title: 'Chat with us', open: 'Chat', close: 'Close', send: 'Send', placeholder: 'Type a message…',
      image: 'Send an image', imageShort: 'Image', connecting: 'Connecting…', reconnecting: 'Reconnecting…',
      welcome: 'Ask us anything. We usually answer within minutes.',
      queued: 'Waiting for an agent — you are number {n} in line', queuedNoPos: 'Waiting for an agent…',
      assigned: 'You are chatting with {name}', closed: 'This conversation has ended. Write to start a new one.',
      offline: 'No agent is online right now. Leave a message and we will answer as soon as we can.',
      typing: '{name} is typing…', pending: 'sending…', sent: 'sent', read: 'read', failed: 'not sent: {why}',
      tooLarge: 'Images may be at most {n} KB.',
    },
    zh: {
      title: '在线客服', open: '咨询', close: '关闭', send: '发送', placeholder: '输入消息…',
      image: '发送图片', imageShort: '图片', connecting: '连接中…', reconnecting: '重新连接中…',
      welcome: '有什么可以帮您？我们通常几分钟内回复。',
      queued: '正在为您接入客服 — 您排在第 {n} 位', queuedNoPos: '正在为您接入客服…',
      assigned: '客服 {name} 正在为您服务', closed: '会话已结束，发送消息即可开始新的会话。',
      offline: '当前没有客服在线，请留言，我们会尽快回复。',
      typing: '{name} 正在输入…', pending: '发送中…', sent: '已发送', read: '已读', failed: '发送失败：{why}',
      tooLarge: '图片不能超过 {n} KB。',
    },
  };
  var langs = [(script && script.dataset.lang) || ''].concat(navigator.languages || [navigator.language || 'en']);
  var words = String(langs.filter(Boolean)[0]).toLowerCase().indexOf('zh') === 0 ? WORDS.zh : WORDS.en;
  function t(key, args) {
    return (words[key] || key).replace(/\{(\w+)\}/g, function (_, k) { return args && args[k] != null ? String(args[k]) : ''; });
  }

  // ---- stored state ----------------------------------------------------
  function load() {
    try { return JSON.parse(localStorage.getItem(STORE_KEY)) || {}; } catch (e) { return {}; }
  }
  var saved = load();
  var state = {
    token: (script && script.dataset.token) || saved.token || null,
    visitorId: saved.visitorId || null,
    visitorKey: saved.visitorKey || null,
    group: (script && script.dataset.group) || null,
    conv: saved.conv || null,
    status: null,
    agent: null,
    position: null,
    agentsOnline: null,
    outbox: saved.outbox || [], // [{cid, text, attachment}]
    msgs: {}, // seq or 'cid:…' -> msg
    readByAgent: 0,
    me: null,
    ws: null,
    nextId: 1,
    attempt: 0,
    connected: false,
    opening: false,
    sendIds: {},
    typingUntil: 0,
    typingName: '',
    lastTypingSent: 0,
    typingTimer: null,
    panelOpen: false,
    notice: null,
  };
  function save() {
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify({
        token: state.token, visitorId: state.visitorId, visitorKey: state.visitorKey,
        conv: state.conv, outbox: state.outbox,
      }));
    } catch (e) { /* storage full or disabled: the session still works */ }
  }

  // ---- DOM ---------------------------------------------------------------
  var host = document.createElement('div');
  host.id = 'kefu-widget';
  var root = host.attachShadow({ mode: 'open' });
  var sheet = new CSSStyleSheet();
  sheet.replaceSync([
    ':host{all:initial}',
    '*{box-sizing:border-box;font-family:system-ui,-apple-system,"Segoe UI","PingFang SC","Noto Sans CJK SC",sans-serif}',
    '.launcher{position:fixed;right:20px;bottom:20px;z-index:2147483000;border:none;border-radius:999px;padding:12px 18px;background:#1f6feb;color:#fff;font-size:15px;cursor:pointer;box-shadow:0 4px 14px rgba(0,0,0,.2)}',
    '.panel{position:fixed;right:20px;bottom:80px;z-index:2147483000;width:360px;max-width:calc(100vw - 24px);height:520px;max-height:calc(100vh - 100px);display:flex;flex-direction:column;background:#fff;color:#1d2430;border-radius:12px;box-shadow:0 8px 30px rgba(0,0,0,.25);overflow:hidden;font-size:14px;line-height:1.45}',
    '.panel[hidden],[hidden]{display:none!important}',
    'header{background:#1f6feb;color:#fff;padding:10px 14px;display:flex;flex-direction:column;gap:2px}',
    'header .row{display:flex;justify-content:space-between;align-items:center}',
    'header button{background:none;border:none;color:#fff;font-size:18px;cursor:pointer}',
    '.status{font-size:12px;opacity:.9}',
    '.msgs{flex:1;overflow-y:auto;padding:10px 12px;display:flex;flex-direction:column;gap:8px;background:#f5f6f8}',
    '.welcome{color:#687385;font-size:13px;text-align:center}',
    '.msg{max-width:80%;padding:7px 10px;border-radius:10px;background:#fff;border:1px solid #dde1e6;align-self:flex-start}',
    '.msg.mine{align-self:flex-end;background:#dbeafe;border-color:#bfd5f7}',
    '.msg.bot{background:#fef3c7}',
    '.msg[data-state=pending]{opacity:.6}',
    '.text{white-space:pre-wrap;word-break:break-word}',
    '.meta{font-size:11px;color:#687385}',
    '.msg[data-state=failed] .meta{color:#c62828}',
    'img{display:block;max-width:220px;max-height:220px;border-radius:6px;margin-top:4px}',
    '.typing{min-height:1.3em;font-size:12px;color:#687385;padding:0 12px;background:#f5f6f8}',
    'footer{display:flex;gap:6px;align-items:flex-end;padding:8px;border-top:1px solid #dde1e6}',
    'textarea{flex:1;resize:none;font-size:14px;padding:6px 8px;border:1px solid #dde1e6;border-radius:8px;min-height:38px;max-height:120px}',
    '.file{position:relative;overflow:hidden;border:1px solid #dde1e6;border-radius:8px;padding:7px 9px;cursor:pointer;font-size:13px}',
    '.file input{position:absolute;inset:0;opacity:0;cursor:pointer}',
    'footer button{border:none;background:#1f6feb;color:#fff;border-radius:8px;padding:8px 12px;cursor:pointer}',
  ].join('\n'));
  root.adoptedStyleSheets = [sheet];

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  }
  var launcher = el('button', { class: 'launcher', 'data-testid': 'kefu-launcher', 'aria-expanded': 'false' }, t('open'));
  var panel = el('section', { class: 'panel', role: 'dialog', 'aria-label': t('title') });
  panel.hidden = true;
  var header = el('header');
  var row = el('div', { class: 'row' });
  row.append(el('strong', null, t('title')));
  var closeBtn = el('button', { 'aria-label': t('close'), 'data-testid': 'kefu-close' }, '×');
  row.append(closeBtn);
  var status = el('div', { class: 'status', 'data-testid': 'kefu-status', role: 'status' }, t('connecting'));
  header.append(row, status);
  var list = el('div', { class: 'msgs', 'aria-live': 'polite' });
  var typing = el('div', { class: 'typing' });
  var footer = el('footer');
  var fileLabel = el('label', { class: 'file', title: t('image') }, t('imageShort'));
  var file = el('input', { type: 'file', accept: 'image/*', 'data-testid': 'kefu-file', 'aria-label': t('image') });
  fileLabel.append(file);
  var input = el('textarea', { rows: '1', placeholder: t('placeholder'), 'data-testid': 'kefu-input', 'aria-label': t('placeholder') });
  var sendBtn = el('button', { 'data-testid': 'kefu-send' }, t('send'));
  footer.append(fileLabel, input, sendBtn);
  panel.append(header, list, typing, footer);
  root.append(launcher, panel);

  // ---- connection ------------------------------------------------------
  function wsSend(cmd) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN || !state.connected && cmd.type !== 'connect') return null;
    var id = state.nextId++;
    cmd.id = id;
    state.ws.send(JSON.stringify(cmd));
    return id;
  }

  function maxSeq() {
    var max = 0;
    for (var k in state.msgs) { var s = state.msgs[k].seq; if (s && s > max) max = s; }
    return max;
  }

  function connect() {
    state.connected = false;
    var ws = new WebSocket(WS_URL, 'kefu.v1.json');
    state.ws = ws;
    ws.onopen = function () {
      var cmd = { type: 'connect' };
      if (state.token) cmd.token = state.token;
      else if (state.visitorId && state.visitorKey) { cmd.visitor_id = state.visitorId; cmd.visitor_key = state.visitorKey; }
      var seen = maxSeq();
      if (state.conv && seen > 0) { cmd.resume = {}; cmd.resume[state.conv] = seen; }
      wsSend(cmd);
    };
    ws.onmessage = function (ev) {
      var f;
      try { f = JSON.parse(ev.data); } catch (e) { return; }
      onFrame(f);
    };
    ws.onclose = function (ev) {
      if (state.ws !== ws) return;
      state.ws = null;
      state.connected = false;
      state.opening = false;
      if (ev.code === 4500 && !state.token && state.visitorId) {
        // A key the gateway no longer knows: start over as a new visitor.
        state.visitorId = state.visitorKey = state.conv = null;
        state.msgs = {};
        save();
      } else if (ev.code === 4003 || (ev.code >= 4500 && ev.code <= 4999)) {
        // 4003: the token expired; the page gives a fresh one with
        // kefu('identify', token), and the same one would be refused.
        setStatus(t('failed', { why: ev.reason || ev.code }));
        return;
      }
      setStatus(t('reconnecting'));
      var b = BACKOFF_MS[Math.min(state.attempt, BACKOFF_MS.length - 1)];
      state.attempt++;
      setTimeout(connect, b / 2 + Math.random() * b);
    };
  }

  function onFrame(f) {
    switch (f.type) {
      case 'connected': return onConnected(f);
      case 'conversation': return onConversation(f);
      case 'msg': return onMsg(f, true);
      case 'ack': return onAck(f);
      case 'history': f.messages.forEach(function (m) { onMsg(m, false); }); return render();
      case 'read': if (f.by !== (state.me && state.me.id)) { state.readByAgent = Math.max(state.readByAgent, f.seq); render(); } return;
      case 'typing': if (f.by !== (state.me && state.me.id)) { state.typingUntil = Date.now() + TYPING_SHOW_MS; renderTyping(); setTimeout(renderTyping, TYPING_SHOW_MS + 50); } return;
      case 'error': return onError(f);
      default: return;
    }
  }

  function onConnected(f) {
    state.connected = true;
    state.attempt = 0;
    state.me = f.user;
    if (f.attachment_bytes_max) attachmentBytesMax = f.attachment_bytes_max;
    if (f.visitor_key) { state.visitorId = f.user.id; state.visitorKey = f.visitor_key; }
    var convs = f.conversations || [];
    var open = convs.filter(function (c) { return c.status !== 'closed'; })[0];
    var shown = open || convs[0];
    if (shown && shown.conv !== state.conv) { state.conv = shown.conv; state.msgs = {}; }
    if (!shown && state.conv) { state.conv = null; state.msgs = {}; }
    state.status = open ? open.status : (shown ? 'closed' : null);
    save();
    if (state.conv && maxSeq() === 0) wsSend({ type: 'history', conv: state.conv, limit: HISTORY_PAGE });
    if (open) wsSend({ type: 'open' }); // the current state: agent, queue position
    flush();
    render();
  }

  function onConversation(f) {
    if (state.conv && f.conv !== state.conv && f.status !== 'closed') { state.msgs = {}; }
    if (f.status === 'closed' && f.conv !== state.conv) return;
    state.conv = f.conv;
    state.status = f.status;
    state.agent = f.agent || null;
    state.position = f.queue_position != null ? f.queue_position : (f.status === 'queued' ? state.position : null);
    if (f.agents_online != null) state.agentsOnline = f.agents_online;
    if (f.id != null) state.opening = false;
    save();
    flush();
    render();
  }

  function onMsg(m, live) {
    if (m.conv !== state.conv) return;
    if (m.cid) delete state.msgs['cid:' + m.cid];
    var fresh = !state.msgs[m.seq];
    state.msgs[m.seq] = m;
    if (live && fresh && m.from.role !== 'visitor') {
      state.typingUntil = 0;
      markRead();
    }
    render();
  }

  function onAck(f) {
    var i = indexOfCid(f.cid);
    if (i < 0) return;
    var item = state.outbox.splice(i, 1)[0];
    save();
    delete state.msgs['cid:' + f.cid];
    if (!state.msgs[f.seq]) {
      state.msgs[f.seq] = { conv: f.conv, seq: f.seq, cid: f.cid, ts: f.ts, from: { role: 'visitor', id: state.me.id, name: state.me.name }, text: item.text, attachment: item.attachment };
    }
    render();
  }

  function onError(f) {
    var cid = state.sendIds[f.id];
    if (cid !== undefined) {
      delete state.sendIds[f.id];
      var i = indexOfCid(cid);
      if (i >= 0 && (f.code === 'rate_limited' || f.code === 'unavailable')) {
        setTimeout(flush, 1000);
        return;
      }
      if (i >= 0) {
        // A conversation that closed under us: open a new one and resend.
        if (f.code === 'conflict' || f.code === 'not_found') { state.status = 'closed'; flush(); return; }
        var item = state.outbox.splice(i, 1)[0];
        save();
        var m = state.msgs['cid:' + cid];
        if (m) m.failed = f.message || f.code;
        render();
        return;
      }
    }
    if (state.opening && f.id != null) state.opening = false;
  }

  function indexOfCid(cid) {
    for (var i = 0; i < state.outbox.length; i++) if (state.outbox[i].cid === cid) return i;
    return -1;
  }

  // Sends whatever waits, opening a conversation first if there is none.
  function flush() {
    if (!state.connected || state.outbox.length === 0) return;
    if (!state.conv || state.status === 'closed' || state.status === null) {
      if (!state.opening) {
        state.opening = true;
        var cmd = { type: 'open' };
        if (state.group) cmd.group = state.group;
        wsSend(cmd);
      }
      return;
    }
    state.outbox.forEach(function (item) {
      var cmd = { type: 'send', conv: state.conv, cid: item.cid };
      if (item.text) cmd.text = item.text;
      if (item.attachment) cmd.attachment = item.attachment;
      var id = wsSend(cmd);
      if (id !== null) state.sendIds[id] = item.cid;
    });
  }

  // A send's cid: the time in ms and 40 random bits, in lowercase hex only,
  // which the store packs at 4 bits a symbol (storage/src/cid.rs) where
  // other letters take 6.
  function newCid() {
    var cid = Date.now().toString(16);
    var bytes = new Uint8Array(5);
    if (window.crypto && window.crypto.getRandomValues) window.crypto.getRandomValues(bytes);
    else for (var i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
    for (var j = 0; j < bytes.length; j++) cid += (bytes[j] < 16 ? '0' : '') + bytes[j].toString(16);
    return cid;
  }

  function submit(text, attachment) {
    var cid = newCid();
    var item = { cid: cid, text: text || undefined, attachment: attachment || undefined };
    state.outbox.push(item);
    save();
    if (state.status === 'closed') { state.conv = null; state.msgs = {}; }
    flush();
    render();
  }

  function markRead() {
    if (!state.panelOpen || document.visibilityState !== 'visible' || !state.conv) return;
    var seen = maxSeq();
    if (seen > 0) wsSend({ type: 'read', conv: state.conv, seq: seen });
  }

  // ---- rendering ---------------------------------------------------------
  function setStatus(text, kind) {
    status.textContent = text;
    status.dataset.kind = kind || '';
  }

  // A passing message in the status line (a refused file), over whatever
  // it says otherwise, for NOTICE_MS.
  function notice(text) {
    state.notice = { text: text, until: Date.now() + NOTICE_MS };
    render();
    setTimeout(render, NOTICE_MS + 50);
  }

  function render() {
    if (state.notice && state.notice.until > Date.now()) setStatus(state.notice.text, 'error');
    else if (!state.connected) setStatus(state.attempt ? t('reconnecting') : t('connecting'), 'connecting');
    else if (state.status === 'queued' && state.agentsOnline === false) setStatus(t('offline'), 'offline');
    else if (state.status === 'queued') setStatus(state.position ? t('queued', { n: state.position }) : t('queuedNoPos'), 'queued');
    else if (state.status === 'assigned' && state.agent) setStatus(t('assigned', { name: state.agent.name || state.agent.id }), 'assigned');
    else if (state.status === 'closed') setStatus(t('closed'), 'closed');
    else setStatus(t('welcome'), 'idle');
    var msgs = Object.keys(state.msgs).map(function (k) { return state.msgs[k]; });
    var mine = state.me ? state.me.id : null;
    state.outbox.forEach(function (item) {
      if (!msgs.some(function (m) { return m.cid === item.cid && m.seq; })) {
        msgs.push({ cid: item.cid, seq: null, ts: Date.now(), pending: true, from: { role: 'visitor', id: mine }, text: item.text, attachment: item.attachment });
      }
    });
    Object.keys(state.msgs).forEach(function (k) { if (state.msgs[k].failed) msgs.push(state.msgs[k]); });
    msgs.sort(function (a, b) { return (a.seq || Infinity) - (b.seq || Infinity); });
    var seen = {};
    var nodes = [];
    if (msgs.length === 0) nodes.push(el('p', { class: 'welcome' }, t('welcome')));
    msgs.forEach(function (m) {
      var key = m.seq ? 's' + m.seq : 'c' + m.cid;
      if (seen[key]) return;
      seen[key] = true;
      var own = m.from.role === 'visitor';
      var st = own ? (m.failed ? 'failed' : m.pending ? 'pending' : m.seq <= state.readByAgent ? 'read' : 'sent') : '';
      var div = el('div', { class: 'msg ' + (own ? 'mine' : m.from.role), 'data-testid': 'kefu-message', 'data-from': m.from.role });
      if (st) div.dataset.state = st;
      if (m.text) div.append(el('div', { class: 'text' }, m.text));
      if (m.attachment && /^image\//.test(m.attachment.mime)) {
        var img = el('img', { alt: m.attachment.mime, 'data-testid': 'kefu-attachment' });
        img.src = 'data:' + m.attachment.mime + ';base64,' + m.attachment.data;
        div.append(img);
      }
      var meta = [own ? '' : (m.from.name || ''), st ? t(st, { why: m.failed }) : ''].filter(Boolean).join(' · ');
      if (meta) div.append(el('div', { class: 'meta' }, meta));
      nodes.push(div);
    });
    var atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.replaceChildren.apply(list, nodes);
    if (atBottom) list.scrollTop = list.scrollHeight;
    renderTyping();
  }

  function renderTyping() {
    var on = state.typingUntil > Date.now();
    typing.textContent = on ? t('typing', { name: state.agent ? state.agent.name : '' }) : '';
  }

  // ---- events ------------------------------------------------------------
  function setOpen(open) {
    state.panelOpen = open;
    panel.hidden = !open;
    launcher.setAttribute('aria-expanded', String(open));
    if (open) { input.focus(); markRead(); list.scrollTop = list.scrollHeight; }
  }
  launcher.addEventListener('click', function () { setOpen(!state.panelOpen); });
  closeBtn.addEventListener('click', function () { setOpen(false); });
  panel.addEventListener('keydown', function (e) { if (e.key === 'Escape') { setOpen(false); launcher.focus(); } });
  function sendInput() {
    var text = input.value;
    if (!text.trim()) return;
    input.value = '';
    submit(text, null);
  }
  sendBtn.addEventListener('click', sendInput);
  input.addEventListener('keydown', function (e) {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendInput(); }
  });
  // At most every TYPING_SEND_MS; a keystroke inside that interval is told
  // at its end, so typing that goes on is never left unannounced.
  function typingNow() {
    if (state.typingTimer) return;
    var wait = state.lastTypingSent + TYPING_SEND_MS - Date.now();
    if (wait > 0) {
      state.typingTimer = setTimeout(function () { state.typingTimer = null; typingNow(); }, wait);
      return;
    }
    if (state.conv && state.status !== 'closed' && input.value) {
      state.lastTypingSent = Date.now();
      wsSend({ type: 'typing', conv: state.conv });
    }
  }
  input.addEventListener('input', typingNow);
  file.addEventListener('change', function () {
    var f = file.files[0];
    file.value = '';
    if (!f) return;
    if (f.size > attachmentBytesMax) { notice(t('tooLarge', { n: Math.floor(attachmentBytesMax / 1024) })); return; }
    var r = new FileReader();
    r.onload = function () { submit(null, { mime: f.type || 'application/octet-stream', data: String(r.result).split(',')[1] || '' }); };
    r.readAsDataURL(f);
  });
  document.addEventListener('visibilitychange', markRead);

  // ---- public API: kefu('identify', token), kefu('open'), kefu('close') ---
  function api(cmd, arg) {
    if (cmd === 'identify') {
      if (arg === state.token) return;
      state.token = arg || null;
      state.visitorId = state.visitorKey = state.conv = null;
      state.msgs = {};
      state.outbox = [];
      save();
      if (state.ws) state.ws.close(1000, 'identify');
      else connect();
    } else if (cmd === 'open') setOpen(true);
    else if (cmd === 'close') setOpen(false);
  }
  var queued = (window.kefu && window.kefu.q) || [];
  window.kefu = function () { api.apply(null, arguments); };

  function mount() {
    document.body.append(host);
    render();
    connect();
    queued.forEach(function (args) { api.apply(null, args); });
    if (script && script.dataset.open !== undefined) setOpen(true);
  }
  if (document.body) mount();
  else document.addEventListener('DOMContentLoaded', mount);
})();
