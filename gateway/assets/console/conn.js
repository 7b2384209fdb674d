// A kefu.v1.json WebSocket that comes back by itself.
//
// The console keeps one of these. It opens /ws on the page's own origin,
// sends `connect` (built fresh by `hello()` each time, so a resume map
// reflects what the page has seen), hands every frame to `onFrame`, and
// after a close that allows it (not 4500-4999, nor 4003: token expired)
// reconnects with a growing, jittered back-off. Commands sent while the socket is down are not queued
// here: the caller keeps what must survive (its outbox) and resends it on
// `connected`, with the same cid, so the gateway stores it once.

const BACKOFF_MS = [250, 500, 1000, 2000, 4000];

export class Conn {
  constructor({ url, hello, onFrame, onState }) {
    this.url = url;
    this.hello = hello;
    this.onFrame = onFrame;
    this.onState = onState;
    this.ws = null;
    this.nextId = 1;
    this.attempt = 0;
    this.stopped = false;
    this.timer = null;
  }

  start() {
    this.stopped = false;
    this.open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, 'bye');
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  open() {
    this.onState(this.attempt === 0 ? 'connecting' : 'reconnecting');
    const ws = new WebSocket(this.url, 'kefu.v1.json');
    this.ws = ws;
    ws.onopen = () => {
      this.send(this.hello());
    };
    ws.onmessage = (ev) => {
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (frame.type === 'connected') this.attempt = 0;
      this.onFrame(frame);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.stopped) return;
      // 4003: the token expired; the same token would only be refused.
      if (ev.code === 4003 || (ev.code >= 4500 && ev.code <= 4999)) {
        this.onState('stopped', ev.code, ev.reason);
        return;
      }
      this.onState('reconnecting');
      const base = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
      this.attempt += 1;
      this.timer = setTimeout(() => this.open(), base / 2 + Math.random() * base);
    };
  }

  // Sends a command with a fresh id (returned), or returns null when the
  // socket is down.
  send(cmd) {
    if (!this.isOpen) return null;
    const id = this.nextId++;
    this.ws.send(JSON.stringify({ ...cmd, id }));
    return id;
  }
}

export function wsUrl(origin) {
  const u = new URL(origin);
  return (u.protocol === 'https:' ? 'wss://' : 'ws://') + u.host + '/ws';
}

// A client message id that is unique enough for one user's sends.
export function newCid() {
  const bytes = new Uint8Array(5);
  crypto.getRandomValues(bytes);
  // The time in ms and 40 random bits, in lowercase hex only: the store
  // packs such a cid at 4 bits a symbol (storage/src/cid.rs), where other
  // letters take 6 (12 bytes here against 20 with a base-36 time).
  return Date.now().toString(16) + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}
