// The console's words in English and Chinese, chosen from the browser
// language (navigator.languages): any zh-* gets Chinese.

const en = {
  title: 'kefu console',
  signin: 'Sign in',
  signinHelp: 'Paste an agent token (kefu token --role agent …), or open the link the gateway printed.',
  token: 'Agent token',
  signout: 'Sign out',
  online: 'Online',
  away: 'Away',
  offline: 'Offline',
  capacity: 'Capacity',
  queue: 'Waiting',
  mine: 'My conversations',
  emptyQueue: 'Nobody is waiting.',
  emptyMine: 'No conversations yet.',
  pick: 'Pick a conversation on the left.',
  accept: 'Accept',
  transfer: 'Transfer',
  close: 'Close',
  send: 'Send',
  attach: 'Image',
  composer: 'Type a reply — Enter sends, Shift+Enter adds a line, / for canned replies',
  older: 'Load older messages',
  typing: '{name} is typing…',
  read: 'Read',
  profile: 'Visitor',
  noProfile: 'No profile.',
  transferTo: 'Transfer to',
  agentsOnline: 'Online agents',
  groups: 'Groups',
  group: 'Group',
  cancel: 'Cancel',
  noAgents: 'No other agent is online.',
  waiting: 'waiting {t}',
  position: '#{n}',
  vip: 'VIP {n}',
  queued: 'waiting',
  movedTo: 'moved to {group}',
  assigned: 'assigned',
  closed: 'closed',
  state_connecting: 'connecting…',
  state_reconnecting: 'reconnecting…',
  state_connected: 'connected',
  'state_caught-up': 'caught up',
  state_stopped: 'signed out',
  newMessage: 'New message from {name}',
  tooLarge: 'That file is larger than {n} KB.',
  error: 'Error: {msg}',
  pending: 'sending…',
};

const zh = {
  title: 'kefu 客服台',
  signin: '登录',
  signinHelp: '粘贴客服令牌（kefu token --role agent …），或打开网关打印的链接。',
  token: '客服令牌',
  signout: '退出',
  online: '在线',
  away: '离开',
  offline: '离线',
  capacity: '接待上限',
  queue: '排队中',
  mine: '我的会话',
  emptyQueue: '没有人在排队。',
  emptyMine: '还没有会话。',
  pick: '请在左侧选择一个会话。',
  accept: '接入',
  transfer: '转接',
  close: '结束',
  send: '发送',
  attach: '图片',
  composer: '输入回复 — Enter 发送，Shift+Enter 换行，/ 快捷回复',
  older: '加载更早的消息',
  typing: '{name} 正在输入…',
  read: '已读',
  profile: '访客',
  noProfile: '没有资料。',
  transferTo: '转接给',
  agentsOnline: '在线客服',
  groups: '技能组',
  group: '技能组',
  cancel: '取消',
  noAgents: '没有其他在线客服。',
  waiting: '已等待 {t}',
  position: '第 {n} 位',
  vip: 'VIP {n}',
  queued: '排队中',
  movedTo: '已转至 {group}',
  assigned: '接待中',
  closed: '已结束',
  state_connecting: '连接中…',
  state_reconnecting: '重新连接中…',
  state_connected: '已连接',
  'state_caught-up': '已同步',
  state_stopped: '已退出',
  newMessage: '{name} 发来新消息',
  tooLarge: '文件超过 {n} KB。',
  error: '错误：{msg}',
  pending: '发送中…',
};

export const lang = (navigator.languages && navigator.languages[0]) || navigator.language || 'en';
const words = lang.toLowerCase().startsWith('zh') ? zh : en;

// The word for `key`, with {name}s filled from `args`.
export function t(key, args = {}) {
  const s = words[key] ?? en[key] ?? key;
  return s.replace(/\{(\w+)\}/g, (_, k) => String(args[k] ?? ''));
}

// Fills every [data-i18n] element's text and [data-i18n-placeholder]'s
// placeholder under `root`.
export function translate(root) {
  document.documentElement.lang = words === zh ? 'zh-CN' : 'en';
  for (const el of root.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll('[data-i18n-placeholder]')) {
    el.placeholder = t(el.dataset.i18nPlaceholder);
  }
}
